//! Buffers that a decode step streams in full: every packed weight and every layer's KV pool. On Linux their
//! memory is offered to transparent huge pages (`madvise(MADV_HUGEPAGE)` before the first write), so that streaming
//! them walks one page table entry per 2 MiB instead of per 4 KiB: the one-row decode step reads every weight once
//! and is bound by how fast memory streams (`docs/benchmarks.md`, "Less work between the products, and huge
//! pages"). Where the kernel's setting is `never`, or elsewhere than Linux, the advice is skipped or ignored and the
//! buffers are ordinary.

use std::alloc::Layout;

/// Bytes per transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Element types whose all-zero bytes are the value zero.
///
/// # Safety
/// An all-zero bit pattern must be a valid value of the type.
pub(crate) unsafe trait ZeroBits: Copy {}

// SAFETY: all-zero bits are +0.0 in each of these formats.
unsafe impl ZeroBits for f32 {}
// SAFETY: as above.
unsafe impl ZeroBits for half::f16 {}
// SAFETY: as above.
unsafe impl ZeroBits for half::bf16 {}

/// `len` zeros from the allocator's zeroed memory, so a large vector takes no memory until its pages are written
/// (a KV pool sized for the worst case fills as sequences use it), with its whole 2 MiB pages offered to
/// transparent huge pages before anything is written to them (a page the kernel has already backed keeps its size
/// until `khugepaged` collapses it, so the advice comes first). `None` when `len` values exceed the address space.
pub(crate) fn zeroed_huge_page_vec<T: ZeroBits>(len: usize) -> Option<Vec<T>> {
    let layout = Layout::array::<T>(len).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout's size is not zero.
    let start = unsafe { std::alloc::alloc_zeroed(layout) };
    if start.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    advise_huge_pages(start, layout.size());
    // SAFETY: `start` was allocated by the global allocator with the layout of `len` values of `T`, and all of them
    // are zero bytes, a valid `T` by `ZeroBits`.
    Some(unsafe { Vec::from_raw_parts(start.cast::<T>(), len, len) })
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
    // SAFETY: the range lies within an allocation this process owns and has not written, and MADV_HUGEPAGE changes
    // no content, only how the kernel may back the pages.
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
    fn a_huge_page_vector_holds_zeros_at_any_size_and_refuses_an_impossible_one() {
        for len in [0, 1, 1000, HUGE_PAGE / 4 + 3, 3 * HUGE_PAGE / 4] {
            let mut values = zeroed_huge_page_vec::<f32>(len).expect("fits");
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|&v| v.to_bits() == 0));
            values.iter_mut().for_each(|v| *v = 1.5);
            assert!(values.iter().all(|&v| v == 1.5));
        }
        let halves = zeroed_huge_page_vec::<half::bf16>(HUGE_PAGE).expect("fits");
        assert!(halves.iter().all(|&v| v == half::bf16::ZERO));
        assert!(zeroed_huge_page_vec::<f32>(usize::MAX / 2).is_none());
    }
}
