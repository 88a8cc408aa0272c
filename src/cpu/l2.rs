//! Squared Euclidean distance: the portable kernel (exact search, near-duplicates) and the one the
//! ANN graph walk calls per neighbour, AVX-512F or AVX2 + FMA hand-written and picked once at run
//! time as a function pointer (the walk calls it millions of times per second, one 128–1280-d pair
//! at a time, so it is chosen once rather than per call as [`crate::cpu::simd`] does for whole
//! blocks), with the portable kernel as the fallback; a four-rows-at-once form of it for the walk's
//! neighbour lists (more loads in flight per pass over the query); and a prefetch hint.

/// `fn(a, b) -> ‖a − b‖²`; `a` and `b` have the same length.
pub type L2Fn = fn(&[f32], &[f32]) -> f32;

/// The fastest kernel this CPU supports.
pub fn l2_kernel() -> L2Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return |a, b| unsafe { x86::l2_avx512(a, b) };
        }
        if crate::cpu::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return |a, b| unsafe { x86::l2_avx2(a, b) };
        }
    }
    sq_l2
}

/// `fn(q, rows, next) -> [‖q − rows[u]‖²]`: four distances in one pass over `q`, each equal to
/// [`L2Fn`]'s for the same pair (same accumulation order); `next` are the rows wanted after these,
/// fetched into the cache meanwhile (pass `rows` again when there are none).
pub type L2x4Fn = fn(&[f32], [&[f32]; 4], [&[f32]; 4]) -> [f32; 4];

/// The four-row kernel for this CPU: AVX-512F, else four calls of [`l2_kernel`]'s.
pub fn l2x4_kernel() -> L2x4Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return |q, r, nx| unsafe { x86::l2x4_avx512(q, r, nx) };
        }
    }
    l2x4_each
}

fn l2x4_each(q: &[f32], rows: [&[f32]; 4], next: [&[f32]; 4]) -> [f32; 4] {
    let l2 = l2_kernel();
    for r in next {
        prefetch(r, 8);
    }
    rows.map(|r| l2(q, r))
}

/// Squared Euclidean distance, portable: eight independent accumulators let the compiler
/// vectorise without reassociation flags.
#[inline]
pub fn sq_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

/// Hints the CPU to fetch the first `lines` cache lines of `v`.
#[inline(always)]
pub fn prefetch(v: &[f32], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = v.as_ptr() as *const i8;
        let n = lines.min(v.len().div_ceil(16));
        for l in 0..n {
            _mm_prefetch::<_MM_HINT_T0>(p.add(l * 64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, lines);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn l2_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1, mut s2, mut s3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let mut i = 0;
        unsafe {
            while i + 64 <= n {
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                let d1 = _mm512_sub_ps(
                    _mm512_loadu_ps(pa.add(i + 16)),
                    _mm512_loadu_ps(pb.add(i + 16)),
                );
                let d2 = _mm512_sub_ps(
                    _mm512_loadu_ps(pa.add(i + 32)),
                    _mm512_loadu_ps(pb.add(i + 32)),
                );
                let d3 = _mm512_sub_ps(
                    _mm512_loadu_ps(pa.add(i + 48)),
                    _mm512_loadu_ps(pb.add(i + 48)),
                );
                s0 = _mm512_fmadd_ps(d0, d0, s0);
                s1 = _mm512_fmadd_ps(d1, d1, s1);
                s2 = _mm512_fmadd_ps(d2, d2, s2);
                s3 = _mm512_fmadd_ps(d3, d3, s3);
                i += 64;
            }
            while i + 16 <= n {
                let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                s0 = _mm512_fmadd_ps(d, d, s0);
                i += 16;
            }
            if i < n {
                let m: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as u16;
                let d = _mm512_sub_ps(
                    _mm512_maskz_loadu_ps(m, pa.add(i)),
                    _mm512_maskz_loadu_ps(m, pb.add(i)),
                );
                s1 = _mm512_fmadd_ps(d, d, s1);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)))
    }

    /// Four rows against `q`, each summed exactly as [`l2_avx512`] sums one (four accumulators
    /// over 64-value steps, then 16-value steps into the first, the masked tail into the second),
    /// so each result equals it bit for bit; the `next` rows are prefetched line by line at the
    /// same offsets as this pass reads, so they are in cache when their turn comes.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // `l` and `u` index registers and offsets together
    pub unsafe fn l2x4_avx512(q: &[f32], rows: [&[f32]; 4], next: [&[f32]; 4]) -> [f32; 4] {
        let n = rows.iter().fold(q.len(), |m, r| m.min(r.len()));
        let nn = next.iter().fold(n, |m, r| m.min(r.len()));
        let pq = q.as_ptr();
        let pr = rows.map(|r| r.as_ptr());
        let pn = next.map(|r| r.as_ptr() as *const i8);
        let z = _mm512_setzero_ps();
        let mut s = [[z; 4]; 4];
        let mut i = 0;
        unsafe {
            while i + 64 <= n {
                if i + 64 <= nn {
                    for p in pn {
                        for l in 0..4 {
                            _mm_prefetch::<_MM_HINT_T0>(p.add((i + 16 * l) * 4));
                        }
                    }
                }
                for l in 0..4 {
                    let x = _mm512_loadu_ps(pq.add(i + 16 * l));
                    for u in 0..4 {
                        let d = _mm512_sub_ps(x, _mm512_loadu_ps(pr[u].add(i + 16 * l)));
                        s[u][l] = _mm512_fmadd_ps(d, d, s[u][l]);
                    }
                }
                i += 64;
            }
            while i + 16 <= n {
                let x = _mm512_loadu_ps(pq.add(i));
                for u in 0..4 {
                    let d = _mm512_sub_ps(x, _mm512_loadu_ps(pr[u].add(i)));
                    s[u][0] = _mm512_fmadd_ps(d, d, s[u][0]);
                }
                i += 16;
            }
            if i < n {
                let m: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as u16;
                let x = _mm512_maskz_loadu_ps(m, pq.add(i));
                for u in 0..4 {
                    let d = _mm512_sub_ps(x, _mm512_maskz_loadu_ps(m, pr[u].add(i)));
                    s[u][1] = _mm512_fmadd_ps(d, d, s[u][1]);
                }
            }
        }
        s.map(|a| {
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[0], a[1]),
                _mm512_add_ps(a[2], a[3]),
            ))
        })
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1, mut s2, mut s3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        unsafe {
            while i + 32 <= n {
                let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                let d1 = _mm256_sub_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                );
                let d2 = _mm256_sub_ps(
                    _mm256_loadu_ps(pa.add(i + 16)),
                    _mm256_loadu_ps(pb.add(i + 16)),
                );
                let d3 = _mm256_sub_ps(
                    _mm256_loadu_ps(pa.add(i + 24)),
                    _mm256_loadu_ps(pb.add(i + 24)),
                );
                s0 = _mm256_fmadd_ps(d0, d0, s0);
                s1 = _mm256_fmadd_ps(d1, d1, s1);
                s2 = _mm256_fmadd_ps(d2, d2, s2);
                s3 = _mm256_fmadd_ps(d3, d3, s3);
                i += 32;
            }
            while i + 8 <= n {
                let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                s0 = _mm256_fmadd_ps(d, d, s0);
                i += 8;
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut r = _mm_cvtss_f32(h);
        while i < n {
            let d = a[i] - b[i];
            r += d * d;
            i += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_scalar() {
        for n in [1usize, 7, 8, 15, 16, 17, 63, 64, 100, 128, 1280, 1283] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let (x, y) = (l2_kernel()(&a, &b), sq_l2(&a, &b));
            assert!((x - y).abs() <= 1e-4 * y.max(1.0), "n={n}: {x} vs {y}");
        }
    }

    #[test]
    fn four_rows_at_once_equal_one_at_a_time_bit_for_bit() {
        for n in [1usize, 7, 16, 17, 63, 64, 65, 100, 128, 1280, 1283] {
            let row = |k: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * (k + 3)) as f32 * 0.173).sin() * (k + 1) as f32)
                    .collect()
            };
            let q = row(9);
            let r: Vec<Vec<f32>> = (0..8).map(row).collect();
            let rows = [&r[0][..], &r[1], &r[2], &r[3]];
            let next = [&r[4][..], &r[5], &r[6], &r[7]];
            let one = l2_kernel();
            for kernel in [l2x4_kernel(), l2x4_each as L2x4Fn] {
                let got = kernel(&q, rows, next);
                for u in 0..4 {
                    assert_eq!(
                        got[u].to_bits(),
                        one(&q, rows[u]).to_bits(),
                        "n={n} row {u}"
                    );
                }
            }
        }
    }
}
