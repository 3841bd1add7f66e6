//! Fuzz-style property runs on stable Rust: every case draws its input from its own seeded ChaCha stream (so a
//! failure names a seed that replays it alone), runs under a measured allocation and time, and may not panic.
//!
//! A suite runs a fixed, small number of cases in CI ([`Mode::Ci`]) and millions in its long mode ([`Mode::Long`],
//! an `#[ignore]` test: `cargo test -- --ignored`); `KOSMOS_FUZZ_CASES` overrides either count. Memory is measured by
//! [`CountingAllocator`], which the test binary installs as its `#[global_allocator]`; it counts per thread, so
//! tests running in parallel do not see each other's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;

/// The longest a case may take: a generous bound (cases take microseconds to milliseconds), so that only a
/// runaway loop or an unbounded allocation fails it, never a loaded machine.
pub const MAX_CASE_TIME: Duration = Duration::from_secs(1);

thread_local! {
    static CURRENT_BYTES: Cell<usize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting the bytes each thread holds and their peak. Install it in a test binary with
/// `#[global_allocator] static ALLOCATOR: kosmos_testkit::fuzz::CountingAllocator = CountingAllocator;`.
#[derive(Debug)]
pub struct CountingAllocator;

fn note_alloc(bytes: usize) {
    let _ = CURRENT_BYTES.try_with(|current| {
        let now = current.get().saturating_add(bytes);
        current.set(now);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_dealloc(bytes: usize) {
    // Memory freed by another thread than the one that allocated it counts as freed here (saturating at zero).
    let _ = CURRENT_BYTES.try_with(|current| current.set(current.get().saturating_sub(bytes)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters touch only
// const-initialised thread-local cells, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` has too.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            note_alloc(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            note_alloc(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` was allocated by `System` with `layout` (every allocation goes through it).
        unsafe { System.dealloc(pointer, layout) };
        note_dealloc(layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            note_dealloc(layout.size());
            note_alloc(new_size);
        }
        moved
    }
}

/// Runs `work` and returns its result with the most bytes the calling thread held at once during it, above what
/// it held before. Meaningful only where [`CountingAllocator`] is the global allocator ([`run`] checks it is).
pub fn peak_bytes_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let before = CURRENT_BYTES.with(Cell::get);
    PEAK_BYTES.with(|peak| peak.set(before));
    let result = work();
    let peak = PEAK_BYTES.with(Cell::get);
    (result, peak.saturating_sub(before))
}

/// Whether allocations on this thread are being counted.
fn counting_is_installed() -> bool {
    let (_, peak) = peak_bytes_during(|| std::hint::black_box(vec![1u8; 4096]));
    peak >= 4096
}

/// Which budget a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The fixed, small budget of CI.
    Ci,
    /// The long mode (an `#[ignore]` test).
    Long,
}

/// One suite: its name, base seed and case counts.
#[derive(Debug, Clone, Copy)]
pub struct Suite<'a> {
    /// Printed with the case count, and named in failures.
    pub name: &'a str,
    /// Case `i` draws from `ChaCha8Rng::seed_from_u64(seed + i)`.
    pub seed: u64,
    /// Cases in CI.
    pub ci_cases: u64,
    /// Cases in the long mode.
    pub long_cases: u64,
}

impl Suite<'_> {
    /// The cases of a run in `mode`, or `KOSMOS_FUZZ_CASES` when set.
    pub fn cases(&self, mode: Mode) -> u64 {
        let configured = std::env::var("KOSMOS_FUZZ_CASES")
            .ok()
            .and_then(|value| value.parse().ok());
        match (configured, mode) {
            (Some(cases), _) => cases,
            (None, Mode::Ci) => self.ci_cases,
            (None, Mode::Long) => self.long_cases,
        }
    }
}

/// What a finished suite measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Cases run.
    pub cases: u64,
    /// The slowest case.
    pub slowest: Duration,
    /// The most bytes one case held at once.
    pub peak_bytes: usize,
}

/// Runs the cases of `suite` in `mode` and prints the count, the slowest case and the largest peak. `case` returns
/// the most bytes it may hold at once (its limit, computed from its input); a case that panics, holds more, or
/// takes longer than [`MAX_CASE_TIME`] fails the suite with its seed.
pub fn run(suite: Suite<'_>, mode: Mode, mut case: impl FnMut(&mut ChaCha8Rng) -> usize) -> Report {
    let cases = suite.cases(mode);
    assert!(
        counting_is_installed(),
        "{}: install kosmos_testkit::fuzz::CountingAllocator as the test binary's #[global_allocator]",
        suite.name
    );
    let mut report = Report {
        cases: 0,
        slowest: Duration::ZERO,
        peak_bytes: 0,
    };
    for index in 0..cases {
        let seed = suite.seed.wrapping_add(index);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let started = Instant::now();
        let (outcome, peak) =
            peak_bytes_during(|| catch_unwind(AssertUnwindSafe(|| case(&mut rng))));
        let elapsed = started.elapsed();
        let limit = match outcome {
            Ok(limit) => limit,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                panic!("{}: case with seed {seed} panicked: {message}", suite.name);
            }
        };
        assert!(
            peak <= limit,
            "{}: case with seed {seed} held {peak} bytes at once, above its limit of {limit}",
            suite.name
        );
        assert!(
            elapsed <= MAX_CASE_TIME,
            "{}: case with seed {seed} took {elapsed:?}, above {MAX_CASE_TIME:?}",
            suite.name
        );
        report.cases += 1;
        report.slowest = report.slowest.max(elapsed);
        report.peak_bytes = report.peak_bytes.max(peak);
    }
    // Straight to the stderr handle: libtest captures `println!` and `eprintln!` of passing tests, and CI should
    // show every suite's case count.
    let _ = writeln!(
        std::io::stderr(),
        "{}: {} cases (seeds {}..{}), slowest {:.1} ms, largest peak {} bytes",
        suite.name,
        report.cases,
        suite.seed,
        suite.seed.wrapping_add(cases),
        report.slowest.as_secs_f64() * 1e3,
        report.peak_bytes
    );
    report
}
