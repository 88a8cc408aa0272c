//! The threads that share one lone image (batch 1: a search request) as a team for the whole image:
//! the image's thread hands each layer's parts to the team and the others wait for the next layer
//! by spinning, not sleeping.
//!
//! Why: with rayon's fork-join per layer, the pool's other thread falls asleep between layers and
//! every layer (about 66 per Lite0 image) pays a wake-up; on this project's 2-core VM that cost
//! more than the split saved (bench/RESULTS.md §13). ONNX Runtime's thread pool spins between
//! operators for the same reason. The helpers spin only while an image is in flight.
//!
//! No deadlock when the pool has no idle thread: parts are claimed, not assigned, and the image's
//! own thread claims parts too, so a layer finishes even if no helper ever joins.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// A layer's work: `part` of the layer's parts (each part writes only its own outputs).
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// State word: generation (bits 16..), parts of the current job (8..16), next part to claim (0..8).
const STOP: u64 = u64::MAX;

pub struct Team {
    state: AtomicU64,
    done: AtomicUsize,
    /// A part panicked on a helper: the layer's thread panics in turn instead of waiting forever.
    failed: AtomicBool,
    /// The current generation's job; written by the image's thread only while no part of the
    /// previous job is running (see [`Team::run`]), read by a thread only after it claimed a
    /// part of this generation.
    job: UnsafeCell<Option<Job<'static>>>,
    /// Threads in the team, the image's own included.
    threads: usize,
}

// SAFETY: `job` is written and read under the protocol documented on the field: a write happens
// before the Release store that opens a generation, a read only after an Acquire claim in it, and
// the next write only after every claimed part of the generation reported done (Acquire).
unsafe impl Sync for Team {}

impl Team {
    /// A team of `threads` (the image's own thread and `threads − 1` helpers), at most 255.
    pub fn new(threads: usize) -> Self {
        Self {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            threads: threads.clamp(1, 255),
        }
    }

    /// Threads in the team: the number of parts a layer is cut into.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `body` (the image, on this thread) with `threads − 1` helpers on the rayon pool
    /// taking parts of each [`Team::run`] it calls; the helpers leave when `body` returns.
    pub fn with<R: Send>(threads: usize, body: impl FnOnce(&Team) -> R + Send) -> R {
        let team = Team::new(threads);
        let t = &team;
        rayon::scope(|s| {
            for _ in 1..t.threads {
                s.spawn(move |_| t.help());
            }
            // The helpers leave when the body returns or panics.
            let _stop = Stop(t);
            body(t)
        })
    }

    /// Runs `job(0..parts)` over the team and returns when every part is done. Called by the
    /// image's thread only, one job at a time.
    pub fn run(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        assert!(parts < 256, "at most 255 parts");
        if parts == 0 {
            return;
        }
        let generation = (self.state.load(Ordering::Relaxed) >> 16) + 1;
        // SAFETY: the lifetime is erased only while this call runs: every part that reads the
        // job is done before it returns (the wait below), and a thread reads `job` only after
        // claiming a part of this generation.
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(job));
        }
        self.done.store(0, Ordering::Relaxed);
        self.state
            .store(generation << 16 | (parts as u64) << 8, Ordering::Release);
        while self.claim_one() {}
        while self.done.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
        assert!(
            !self.failed.load(Ordering::Acquire),
            "a part of this layer panicked on another thread"
        );
    }

    /// Claims and runs one part of the current generation; false when none is left (or stop).
    fn claim_one(&self) -> bool {
        let mut st = self.state.load(Ordering::Acquire);
        loop {
            let (parts, next) = ((st >> 8) & 0xff, st & 0xff);
            if st == STOP || next >= parts {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: a part of this generation is claimed and not yet reported done, so
                    // the job is the one `run` stored and stays alive (see the field's docs).
                    let job = unsafe { (*self.job.get()).expect("a job in a claimed generation") };
                    if catch_unwind(AssertUnwindSafe(|| job(next as usize))).is_err() {
                        self.failed.store(true, Ordering::Release);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    return true;
                }
                Err(now) => st = now,
            }
        }
    }

    /// A helper: takes parts until the image is done.
    fn help(&self) {
        while self.state.load(Ordering::Acquire) != STOP {
            if !self.claim_one() {
                std::hint::spin_loop();
            }
        }
    }
}

/// `f(rows, part)` over `rows` rows of `row_len` floats at the start of `out`, cut into one
/// contiguous range per thread of `team` (a multiple of `align` rows each, but the last); no
/// team: one plain call on this thread.
pub fn in_parts(
    out: &mut [f32],
    rows: usize,
    row_len: usize,
    team: Option<&Team>,
    align: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    let out = &mut out[..rows * row_len];
    let parts = team.map_or(1, Team::threads);
    let per = rows.div_ceil(parts).next_multiple_of(align.max(1));
    let Some(team) = team.filter(|_| parts > 1 && per < rows) else {
        return f(0..rows, out);
    };
    let shared = SharedOut(out.as_mut_ptr());
    team.run(rows.div_ceil(per), &|i| {
        let r = i * per..((i + 1) * per).min(rows);
        // SAFETY: `out` is borrowed mutably for this whole call and part i is rows r only.
        let o = unsafe {
            std::slice::from_raw_parts_mut(shared.get().add(r.start * row_len), r.len() * row_len)
        };
        f(r, o)
    });
}

/// An output buffer that the parts of one split layer write in disjoint rows or columns.
pub struct SharedOut(pub *mut f32);
// SAFETY: only used by the engine's `pw` and by `in_parts`, whose parts write disjoint rows or columns while
// they hold the buffer.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Sends the helpers away when dropped.
struct Stop<'a>(&'a Team);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.state.store(STOP, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every part of every job runs exactly once, whatever thread takes it, with 1–4 threads and
    /// jobs of 0–7 parts back to back (each job's parts see the previous job's writes).
    #[test]
    fn every_part_runs_once_per_job() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for threads in 1..=4 {
            let counts: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
            let total = pool.install(|| {
                Team::with(threads, |team| {
                    let mut total = 0;
                    for round in 0..2000 {
                        let parts = round % 8;
                        let before: Vec<u32> =
                            counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                        team.run(parts, &|p| {
                            counts[p].fetch_add(1, Ordering::Relaxed);
                        });
                        for (p, c) in counts.iter().enumerate() {
                            let want = before[p] + u32::from(p < parts);
                            assert_eq!(c.load(Ordering::Relaxed), want, "round {round} part {p}");
                        }
                        total += parts;
                    }
                    total
                })
            });
            let ran: u32 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            assert_eq!(ran as usize, total, "{threads} threads");
        }
    }

    /// A part that panics, on whichever thread, ends in a panic of the caller, not a hang.
    #[test]
    fn a_panicking_part_is_a_panic_not_a_hang() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for bad in 0..2 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| {
                    Team::with(2, |team| {
                        for _ in 0..100 {
                            team.run(2, &|p| assert!(p != bad, "part {p} fails"));
                        }
                    })
                })
            }));
            assert!(r.is_err(), "part {bad} panicking went unnoticed");
        }
    }
}
