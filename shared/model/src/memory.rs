//! Buffers that a decode step streams in full: every packed weight and every layer's KV pool. On Linux their
//! memory is offered to transparent huge pages (`madvise(MADV_HUGEPAGE)` before the first write), so that streaming
//! them walks one page table entry per 2 MiB instead of per 4 KiB: the one-row decode step reads every weight once
//! and is bound by how fast memory streams (`docs/benchmarks.md`, "Huge pages"). Where the kernel's setting is
//! `never`, or elsewhere than Linux, the advice is skipped or ignored and the buffers are ordinary.

/// Bytes per transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// A vector of `len` copies of `value` whose 2 MiB-aligned part was offered to transparent huge pages before it was
/// written (a page the kernel has already backed keeps its size until `khugepaged` collapses it, so the advice comes
/// first). Small vectors hold no aligned 2 MiB and are returned as ordinary ones.
pub(crate) fn huge_page_vec<T: Clone>(len: usize, value: T) -> Vec<T> {
    let mut values: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(values.as_ptr().cast::<u8>(), len * std::mem::size_of::<T>());
    values.resize(len, value);
    values
}

/// Offers the whole 2 MiB pages within `len` bytes from `start` to transparent huge pages. Advice only: a refusal
/// changes nothing but the page size, so its error is ignored.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *const u8, len: usize) {
    let first = (start as usize).next_multiple_of(HUGE_PAGE);
    let end = (start as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end <= first {
        return;
    }
    // SAFETY: the range lies within an allocation this process owns (a vector's capacity, not yet written), and
    // MADV_HUGEPAGE changes no content, only how the kernel may back the pages.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *const u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_page_vector_holds_its_values_at_any_size() {
        for len in [0, 1, 1000, HUGE_PAGE / 4 + 3, 3 * HUGE_PAGE / 4] {
            let values = huge_page_vec(len, 1.5f32);
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|&v| v == 1.5));
        }
    }
}
