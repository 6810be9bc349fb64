//! The integer model's threads: the calling thread plus `threads - 1` workers (`threads`:
//! `RAYON_NUM_THREADS` when set, else the machine's parallelism), as onnxruntime counts its
//! intra-op threads. Work is split into chunks handed out one at a time to whichever thread is
//! free, the caller included.
//!
//! At batch 1 a layer takes tens of microseconds and waking a sleeping thread about as long,
//! so workers spin for [`SPIN`] after each job before they sleep (onnxruntime's threads spin
//! too), and the caller spins while the last chunks finish. A forward running while another
//! thread's forward holds the workers runs on its own thread alone.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

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

/// A job as the workers see it: a borrowed closure with its lifetime erased. [`Pool::run`]
/// does not return before every worker is done with it.
type Job = *const (dyn Fn() + Sync + 'static);

struct Pool {
    /// Held by the thread whose job the workers run.
    busy: Mutex<()>,
    /// Bumped once per job, after `job_meta` is set.
    epoch: AtomicUsize,
    /// The current job (a fat pointer: behind a lock rather than in one atomic).
    job_meta: Mutex<Option<JobBox>>,
    /// Workers not yet done with the current job.
    pending: AtomicUsize,
    /// A worker's panic, handed to the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Sleeping workers wait here for the epoch to move.
    sleep: Mutex<()>,
    wake: Condvar,
    sleeping: AtomicUsize,
    workers: usize,
}

/// The current job's pointer, sendable to workers (the pool's protocol keeps it alive).
#[derive(Clone, Copy)]
struct JobBox(Job);
// SAFETY: the pointee is `Sync` and outlives every use (see `Pool::run`).
unsafe impl Send for JobBox {}

impl Pool {
    fn get() -> Option<&'static Pool> {
        static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
        *POOL.get_or_init(|| {
            let workers = threads().saturating_sub(1);
            if workers == 0 {
                return None;
            }
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                busy: Mutex::new(()),
                epoch: AtomicUsize::new(0),
                job_meta: Mutex::new(None),
                pending: AtomicUsize::new(0),
                panic: Mutex::new(None),
                sleep: Mutex::new(()),
                wake: Condvar::new(),
                sleeping: AtomicUsize::new(0),
                workers,
            }));
            for i in 0..workers {
                let spawned = std::thread::Builder::new()
                    .name(format!("burn-qat-int-{i}"))
                    .spawn(move || pool.work());
                if spawned.is_err() {
                    // No workers at all rather than a pool that waits for missing ones.
                    return None;
                }
            }
            Some(pool)
        })
    }

    /// A worker: waits for each new epoch (spinning, then sleeping) and runs its job.
    fn work(&self) {
        let mut seen = 0;
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                if self.epoch.load(Ordering::Acquire) != seen {
                    break;
                }
                spins = spins.wrapping_add(1);
                // The clock is read once per 256 spins.
                if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                self.sleeping.fetch_add(1, Ordering::SeqCst);
                while self.epoch.load(Ordering::SeqCst) == seen {
                    guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                self.sleeping.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            seen = self.epoch.load(Ordering::Acquire);
            let job = self
                .job_meta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|j| j.0);
            if let Some(job) = job {
                // SAFETY: the job outlives this call: `run` waits for `pending` to reach 0.
                let job = unsafe { &*job };
                if let Err(p) = catch_unwind(AssertUnwindSafe(job)) {
                    // The first panic of a job is kept (the slot is emptied by every `run`).
                    let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(p);
                    } else {
                        drop(slot);
                        std::mem::forget(p);
                    }
                }
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Runs `job` on the caller and every worker at once; returns when all are done. `None`
    /// when another thread holds the workers (the caller then runs alone).
    fn run(&self, job: &(dyn Fn() + Sync)) -> Option<()> {
        // A panic re-raised below poisons `busy`; the pool stays usable.
        let _busy = match self.busy.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // SAFETY: only the lifetime is erased; the workers drop every use of the pointer
        // before `pending` reaches 0, and this function waits for that below.
        let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn() + Sync), Job>(job) };
        *self.job_meta.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobBox(erased));
        self.pending.store(self.workers, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(job));
        let start = Instant::now();
        let mut spins = 0u32;
        while self.pending.load(Ordering::Acquire) > 0 {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self.job_meta.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Always taken, so that a worker's panic never surfaces in a later job.
        let theirs = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = mine {
            drop(theirs);
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
        Some(())
    }
}

/// Splits `out` into chunks of `chunk` values and runs `f(index, chunk, scratch)` on every
/// chunk, on up to [`threads`] threads (the caller is one), each with its own `S` scratch.
pub(crate) fn for_each_chunk<T: Send, S: Default>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut S) + Sync,
) {
    let chunk = chunk.max(1);
    let count = out.len().div_ceil(chunk);
    let chunks = Mutex::new(out.chunks_mut(chunk).enumerate());
    let work = || {
        let mut scratch = S::default();
        loop {
            // Nothing panics while the lock is held; a poisoned lock still hands out chunks.
            let next = chunks.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((i, c)) = next else { break };
            f(i, c, &mut scratch);
        }
    };
    if count > 1
        && let Some(pool) = Pool::get()
        && pool.run(&work).is_some()
    {
        return;
    }
    work();
}

/// Runs `f` once on every thread of the pool and once on the caller (only on the caller when
/// there is no pool, or while another call holds it).
pub(crate) fn on_every_thread(f: &(dyn Fn() + Sync)) {
    if let Some(pool) = Pool::get()
        && pool.run(f).is_some()
    {
        return;
    }
    f();
}
