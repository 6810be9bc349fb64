//! The integer model's threads: the calling thread plus a pool of `threads - 1` workers
//! (`threads`: `RAYON_NUM_THREADS` when set, else the machine's parallelism), as onnxruntime
//! counts its intra-op threads. Work is split into chunks handed out one at a time to whichever
//! thread is free, the caller included; the caller spins briefly for the last chunks instead
//! of sleeping on a lock (at batch 1 a layer takes tens of microseconds, a wake-up about as
//! long).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Threads that run a forward, the caller included.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The workers besides the caller (`None` with one thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        (threads() > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads() - 1)
                    .thread_name(|i| format!("burn-qat-int-{i}"))
                    .build()
                    .ok()
            })
            .flatten()
    })
    .as_ref()
}

/// How long the caller spins for helpers still working before it blocks.
const SPIN: Duration = Duration::from_micros(200);

/// Splits `out` into chunks of `chunk` values and runs `f(index, chunk, scratch)` on every
/// chunk, on up to [`threads`] threads (the caller is one), each with its own `S` scratch.
pub(crate) fn for_each_chunk<T: Send, S: Default>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut S) + Sync,
) {
    let chunk = chunk.max(1);
    let count = out.len().div_ceil(chunk);
    let helpers = threads().min(count).saturating_sub(1);
    let pool = pool().filter(|_| helpers > 0);
    let Some(pool) = pool else {
        let mut scratch = S::default();
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            f(i, c, &mut scratch);
        }
        return;
    };
    let chunks = Mutex::new(out.chunks_mut(chunk).enumerate());
    let finished = AtomicUsize::new(0);
    let work = || {
        let mut scratch = S::default();
        loop {
            // Nothing panics while the lock is held; a poisoned lock still hands out chunks.
            let next = chunks.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((i, c)) = next else { break };
            f(i, c, &mut scratch);
            finished.fetch_add(1, Ordering::Release);
        }
    };
    pool.in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| work());
        }
        work();
        let start = Instant::now();
        while finished.load(Ordering::Acquire) < count && start.elapsed() < SPIN {
            std::hint::spin_loop();
        }
    });
}
