//! The training pass's large buffers, kept from one step for the next. A step at 128 px allocates
//! and frees about a hundred activation and gradient buffers of tens of MB; the allocator gives
//! buffers that large back to the kernel (`munmap`) and maps fresh ones for the next step, and
//! the page faults and the kernel's zeroing of every fresh page took about a tenth of the step
//! (perf). Here a freed buffer waits in a free list and the next request of about its size takes
//! it back. The trainer empties the list at the end of each epoch ([`clear`]). A taken buffer's
//! values are stale: every user writes what it reads first ([`zeroed`] for those that add up).

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// Buffers below this many floats (1 MiB) are left to the allocator.
const MIN: usize = 1 << 18;

/// A free list of buffers.
pub struct Pool {
    free: Mutex<Vec<Vec<f32>>>,
}

/// The training pass's pool.
pub static BUFFERS: Pool = Pool::new();

/// [`Pool::take`] from [`BUFFERS`].
pub fn take(len: usize) -> Vec<f32> {
    BUFFERS.take(len)
}

/// A copy of `x` in a buffer from [`BUFFERS`].
pub fn copy_of(x: &[f32]) -> Vec<f32> {
    let mut v = take(x.len());
    v.extend_from_slice(x);
    v
}

/// [`Pool::give`] to [`BUFFERS`].
pub fn give(v: Vec<f32>) {
    BUFFERS.give(v)
}

/// [`Pool::poison`] of [`BUFFERS`].
pub fn poison() {
    BUFFERS.poison()
}

/// [`Pool::clear`] of [`BUFFERS`].
pub fn clear() {
    BUFFERS.clear()
}

impl Pool {
    pub const fn new() -> Self {
        Self {
            free: Mutex::new(Vec::new()),
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
        // A panic elsewhere while the list was held leaves it consistent (a push or a removal).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty vector with room for at least `len` floats: a kept buffer of `len` to
    /// `len + len/8` floats when there is one (the smallest), else a new allocation. Its spare
    /// capacity holds old values; callers write it before `set_len`, as with `Vec::with_capacity`.
    pub fn take(&self, len: usize) -> Vec<f32> {
        if len >= MIN {
            let mut free = self.list();
            let fit = free
                .iter()
                .enumerate()
                .filter(|(_, v)| (len..=len + len / 8).contains(&v.capacity()))
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fit {
                return free.swap_remove(i);
            }
        }
        Vec::with_capacity(len)
    }

    /// Keeps `v`'s memory for a later [`Pool::take`] (when it is large enough to be worth it).
    pub fn give(&self, mut v: Vec<f32>) {
        if v.capacity() >= MIN {
            v.clear();
            self.list().push(v);
        }
    }

    /// Frees every kept buffer.
    pub fn clear(&self) {
        let kept = std::mem::take(&mut *self.list());
        drop(kept);
    }

    /// Fills every kept buffer's memory with NaN, so that a kernel that reads a value it did not
    /// write shows in its results (the tests' check of the buffers' reuse).
    pub fn poison(&self) {
        for v in self.list().iter_mut() {
            v.resize(v.capacity(), f32::NAN);
            v.clear();
        }
    }

    /// Floats held by kept buffers.
    pub fn kept(&self) -> usize {
        self.list().iter().map(|v| v.capacity()).sum()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

/// Zero-fills `part` and gives it back initialised.
pub fn zeroed(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    part.iter_mut().for_each(|v| {
        v.write(0.0);
    });
    // SAFETY: every element was just written; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A new vector of `n` images of `per` floats, each image's part zero-filled by the thread that
/// then hands it to `f` (with its index) while it is in that core's cache: no serial zero-filling
/// pass over the whole buffer first.
pub fn per_image(n: usize, per: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let len = n * per;
    let mut v = take(len);
    if len > 0 {
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, part)| f(i, zeroed(part)));
    }
    // SAFETY: every one of the `len` floats was zero-filled by `zeroed` (the chunks cover them).
    unsafe { v.set_len(len) };
    v
}

/// Scratch buffers per thread ([`with_scratch`]).
const SLOTS: usize = 2;

thread_local! {
    static SCRATCH: [std::cell::RefCell<Vec<f32>>; SLOTS] = const {
        [const { std::cell::RefCell::new(Vec::new()) }; SLOTS]
    };
}

/// Runs `f` on this thread's scratch buffer number `slot` (< 2) of `len` floats, kept for the
/// thread's next call: no allocation, page faults or zero-filling per call. The values are stale
/// (zeros the first time, then whatever the last user left): `f` writes what it reads first. `f`
/// must not ask for the same slot again.
pub fn with_scratch<R>(slot: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut v = s[slot].borrow_mut();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// Hands finished buffers back to the pool for the next step.
pub fn give_all<const N: usize>(bufs: [Vec<f32>; N]) {
    bufs.into_iter().for_each(give);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_buffer_of_about_the_size_is_taken_back() {
        let pool = Pool::new();
        let len = MIN * 3 + 17;
        let v = pool.take(len);
        let p = v.as_ptr();
        pool.give(v);
        assert_eq!(pool.kept(), len);
        // Too large for this request (over an eighth more): a new buffer.
        let small = pool.take(len / 2 + 1);
        assert_ne!(small.as_ptr(), p);
        // Within an eighth: the kept one, empty.
        let again = pool.take(len - len / 10);
        assert_eq!(again.as_ptr(), p);
        assert!(again.is_empty() && again.capacity() >= len);
        assert_eq!(pool.kept(), 0);
        // Small buffers are not kept; clear frees the rest.
        pool.give(vec![0f32; 100]);
        assert_eq!(pool.kept(), 0);
        pool.give(again);
        pool.give(small);
        assert!(pool.kept() >= len + len / 2);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }
}
