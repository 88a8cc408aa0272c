//! f32 buffers that start on a 64-byte boundary: a cache line, and one AVX-512 vector.
//!
//! Why: a `Vec<f32>` is only 16-byte aligned (glibc's large allocations sit 16 bytes past a page),
//! so unless it happens to start on a cache line, every 64-byte vector load from it straddles two
//! lines. The 1×1 kernel loads two weight vectors per multiply-add step: the same 12 × 32 kernel
//! on warm caches ran 130–172 GFLOP/s from aligned panels and 94–120 from the same panels 16 bytes
//! off (FMA peak 170), and the engine at 224 px took 10% less time per image once its weights and
//! activations were aligned (`bench/RESULTS.md` §13, session 12). Where every panel, tap row and
//! activation row is a multiple of 16 floats (Lite0 and Lite1 channel counts all are; Lite2 has a
//! few that are not, which costs speed only), aligning the start aligns every vector after it.

use std::ops::{Deref, DerefMut};

/// Floats per 64 bytes.
const LINE: usize = 16;

/// A growable f32 buffer whose first element is 64-byte aligned; derefs to its `len` floats.
#[derive(Default)]
pub struct Aligned {
    v: Vec<f32>,
    /// Index in `v` of the first element (the first 64-byte boundary).
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut a = Self::default();
        a.grow(len);
        a
    }

    /// At least `len` floats: the values held are kept, new ones are zero.
    pub fn grow(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        if self.off + len > self.v.len() {
            // Zeros written here, not left to calloc's untouched pages: the page faults happen
            // now, not inside the first kernel that writes the buffer (which a per-layer clock
            // would then charge for them).
            let mut v = Vec::with_capacity(len + LINE - 1);
            v.resize(len + LINE - 1, 0f32);
            let off = v.as_ptr().align_offset(LINE * 4);
            v[off..off + self.len].copy_from_slice(&self.v[self.off..self.off + self.len]);
            self.v = v;
            self.off = off;
        }
        self.len = len;
    }
}

impl Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
}

impl DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every buffer starts on a 64-byte boundary, growing keeps the values and adds zeros.
    #[test]
    fn starts_on_a_cache_line_and_grows_keeping_values() {
        for len in [0, 1, 15, 16, 17, 1000, 40_000, 300_000] {
            let x: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let mut a = Aligned::zeroed(len);
            a.copy_from_slice(&x);
            assert_eq!(&a[..], &x[..]);
            if len > 0 {
                assert_eq!(a.as_ptr() as usize % 64, 0, "len {len}");
            }
            a.grow(len + 37);
            assert_eq!(a.as_ptr() as usize % 64, 0, "len {len} grown");
            assert_eq!(&a[..len], &x[..]);
            assert!(a[len..].iter().all(|&v| v == 0.0));
            a.grow(3);
            assert_eq!(a.len(), len + 37, "a smaller grow keeps the length");
        }
    }
}
