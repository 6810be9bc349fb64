//! The hostile-input harness of `tests/tests/hostile.rs`, run in release (no overflow checks,
//! the kernels' fast paths as users get them): mutated integer models that load must never
//! panic or disagree with the reference kernels, and their forwards must allocate no more than
//! their budget estimate (a counting allocator measures them). Not a timing benchmark: it prints the tally and
//! exits non-zero on any finding. CI runs it after the release build:
//! `target/release/deps/hostile-<hash> [cases] [seed]` (default 30,000 cases).

#[path = "../../../tests/tests/common/hostile_harness.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes allocated now and the most since the last reset:
/// the harness checks each accepted model's forwards against its memory estimate.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the same arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: every allocation comes from `System` (above), with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`; `new_size` is the caller's, checked by the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grown = new_size - layout.size();
                let now = NOW.fetch_add(grown, Ordering::Relaxed) + grown;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                NOW.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn reset() -> usize {
    let now = NOW.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let cases = args.first().copied().unwrap_or(30_000) as usize;
    let seed = args.get(1).copied().unwrap_or(0x5EED_B0A7);
    let probe = harness::Probe { reset, peak };
    let tally = harness::run(cases, seed, Some(&probe));
    println!(
        "release: {} cases: {} refused, {} accepted ({} refused at run time), {} findings, slowest accepted case {:?}, \
         most memory a forward allocated {:.2} times its estimate per item",
        tally.cases,
        tally.refused,
        tally.accepted,
        tally.run_errors,
        tally.findings.len(),
        tally.slowest,
        tally.memory_ratio
    );
    for f in tally.findings.iter().take(40) {
        println!("{f}");
    }
    if !tally.findings.is_empty() {
        std::process::exit(1);
    }
}
