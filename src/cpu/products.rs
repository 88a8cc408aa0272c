//! Exact search's inner loop as one kernel: for a block of queries and a run of database rows,
//! `e = ‖x‖² − 2 q·x` for every pair, and a call back for each pair whose `e` is below the query's
//! bound (the rest of a squared distance, `‖q‖²`, is the same for every row of a query, so the
//! bound is its current k-th best minus `‖q‖²`; most pairs lose to it).
//!
//! Why not a matrix product and then a scan of its output (what [`crate::search::index`] does where
//! this kernel is missing): there, `gemm` packs every block of database rows again for each block
//! of queries, and a 512 × 1,024 tile of products (2 MB) goes out to the L3 cache and comes back
//! for the scan. Here the products never leave registers, and the database is read as it lies:
//! the queries are the packed side (`2 × LANES` of them side by side per dimension, packed once
//! per call), a database value is broadcast. A 6-row × `2 × LANES`-query tile is 12 accumulators:
//! per dimension 2 vector loads, 6 broadcasts and 12 fused multiply-adds, so it runs at the FMA
//! units' rate.

#[cfg(target_arch = "x86_64")]
use crate::cpu::aligned::Aligned;
#[cfg(target_arch = "x86_64")]
use crate::cpu::simd::{F32x8, F32x16, LessMask};

/// Floats per cache line.
#[cfg(target_arch = "x86_64")]
const LINE: usize = 16;
/// Database rows per register tile.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 6;
/// Bytes of database rows per cache block: every query group passes over the block while it sits
/// in L1 (32 KB on the machines measured, shared with one packed query group).
#[cfg(target_arch = "x86_64")]
const BLOCK_BYTES: usize = 96 * 1024;

/// Whether this CPU has the kernel (AVX2 + FMA, or AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::simd::has_avx2_fma() || std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// For every query `t` (`queries`: `bound.len()` rows of `dim`) and row `j` of `rows` (`x2.len()`
/// rows of `dim`, `x2[j]` its squared norm) with `e = x2[j] − 2 q_t·x_j < bound[t]`, calls
/// `hit(t, j, e)`, which returns `t`'s new bound (rows in order, so a tightened bound applies to
/// the rows after). NaN never passes. Panics when [`available`] is false.
pub fn products_below(
    queries: &[f32],
    dim: usize,
    rows: &[f32],
    x2: &[f32],
    bound: &mut [f32],
    hit: &mut dyn FnMut(usize, usize, f32) -> f32,
) {
    assert!(
        dim > 0 && queries.len() == bound.len() * dim && rows.len() == x2.len() * dim,
        "products_below: shapes do not match"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (and AVX2 + FMA with it); the shapes are checked above.
            return unsafe { tiled_avx512(queries, dim, rows, x2, bound, hit) };
        }
        if crate::cpu::simd::has_avx2_fma() {
            // SAFETY: as above, AVX2 + FMA.
            return unsafe { tiled_avx2(queries, dim, rows, x2, bound, hit) };
        }
    }
    panic!("products_below: this CPU lacks AVX2 + FMA; check `available()` first");
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tiled_avx512(
    queries: &[f32],
    dim: usize,
    rows: &[f32],
    x2: &[f32],
    bound: &mut [f32],
    hit: &mut dyn FnMut(usize, usize, f32) -> f32,
) {
    // SAFETY: the caller's: this CPU has the instructions, the shapes match.
    unsafe { tiled::<F32x16>(queries, dim, rows, x2, bound, hit) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiled_avx2(
    queries: &[f32],
    dim: usize,
    rows: &[f32],
    x2: &[f32],
    bound: &mut [f32],
    hit: &mut dyn FnMut(usize, usize, f32) -> f32,
) {
    // SAFETY: as above.
    unsafe { tiled::<F32x8>(queries, dim, rows, x2, bound, hit) }
}

/// Hints the CPU to fetch the cache line holding `p` into L1 (never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const f32) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: a prefetch is a hint; it reads nothing architecturally, at any address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// The kernel for vector `V`: queries packed `2 × LANES` to a group, dimension-major; padding
/// queries get bound −∞, so they never pass.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tiled<V: LessMask>(
    queries: &[f32],
    dim: usize,
    rows: &[f32],
    x2: &[f32],
    bound: &mut [f32],
    hit: &mut dyn FnMut(usize, usize, f32) -> f32,
) {
    let lanes = V::LANES;
    let g = 2 * lanes;
    let nq = bound.len();
    let n = x2.len();
    let groups = nq.div_ceil(g);
    let mut packed = Aligned::zeroed(groups * dim * g);
    for (t, q) in queries.chunks_exact(dim).enumerate() {
        let base = (t / g) * dim * g + t % g;
        for (d, &v) in q.iter().enumerate() {
            packed[base + d * g] = v;
        }
    }
    let mut bnd = Aligned::zeroed(groups * g);
    bnd.fill(f32::NEG_INFINITY);
    bnd[..nq].copy_from_slice(bound);
    let block = (BLOCK_BYTES / (dim * 4)).max(1).div_ceil(TILE_ROWS) * TILE_ROWS;
    let mut e = [0f32; 32];
    for b0 in (0..n).step_by(block) {
        let b1 = (b0 + block).min(n);
        for grp in 0..groups {
            // SAFETY (all pointer arithmetic below): `qp` walks group `grp`'s `dim × g` packed
            // floats; each row pointer stays on a row `< n` (the last valid one repeats in a short
            // tile), read for `d < dim`; `bp` covers the group's `g` bounds.
            let qp = unsafe { packed.as_ptr().add(grp * dim * g) };
            let bp = unsafe { bnd.as_mut_ptr().add(grp * g) };
            for r0 in (b0..b1).step_by(TILE_ROWS) {
                let valid = (b1 - r0).min(TILE_ROWS);
                let p: [*const f32; TILE_ROWS] = std::array::from_fn(|t| unsafe {
                    rows.as_ptr().add((r0 + t.min(valid - 1)) * dim)
                });
                let mut acc = [[unsafe { V::splat(0.0) }; 2]; TILE_ROWS];
                for c in (0..dim).step_by(LINE) {
                    // The next tile's rows, a cache line each per line of this tile's: rows come
                    // from L2 (the block does not fit in L1 beside the query group), and the
                    // broadcasts stalled on them (perf: samples on the multiply-adds after them).
                    for pt in p {
                        prefetch(pt.wrapping_add(TILE_ROWS * dim + c));
                    }
                    for d in c..(c + LINE).min(dim) {
                        let (a0, a1) =
                            unsafe { (V::load(qp.add(d * g)), V::load(qp.add(d * g + lanes))) };
                        for t in 0..TILE_ROWS {
                            let x = unsafe { V::splat(*p[t].add(d)) };
                            acc[t][0] = unsafe { V::fmadd(x, a0, acc[t][0]) };
                            acc[t][1] = unsafe { V::fmadd(x, a1, acc[t][1]) };
                        }
                    }
                }
                for (t, a) in acc.iter().enumerate().take(valid) {
                    let j = r0 + t;
                    let (e0, e1, mask) = unsafe {
                        let (m2, xs) = (V::splat(-2.0), V::splat(x2[j]));
                        let (e0, e1) = (V::fmadd(a[0], m2, xs), V::fmadd(a[1], m2, xs));
                        let m = V::lt_mask(e0, V::load(bp))
                            | (V::lt_mask(e1, V::load(bp.add(lanes))) << lanes);
                        (e0, e1, m)
                    };
                    if mask == 0 {
                        continue;
                    }
                    unsafe {
                        e0.store(e.as_mut_ptr());
                        e1.store(e.as_mut_ptr().add(lanes));
                    }
                    let mut m = mask;
                    while m != 0 {
                        let lane = m.trailing_zeros() as usize;
                        m &= m - 1;
                        let q = grp * g + lane;
                        let nb = hit(q, j, e[lane]);
                        unsafe { *bp.add(lane) = nb };
                    }
                }
            }
        }
    }
    bound.copy_from_slice(&bnd[..nq]);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn rnd(s: &mut u32) -> f32 {
        *s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        (*s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }

    /// Every pair below a fixed bound is reported with `e` within rounding of the f64 value, and
    /// no pair clearly above it; odd shapes (queries not a multiple of a group, rows not of a
    /// tile, dimensions not of a vector) included.
    #[test]
    fn reports_exactly_the_pairs_below_the_bound() {
        if !available() {
            return;
        }
        for (nq, n, dim) in [
            (37, 101, 13),
            (16, 6, 8),
            (1, 1, 1),
            (70, 300, 64),
            (33, 50, 130),
        ] {
            let mut s = (nq * 1000 + n + dim) as u32;
            let q: Vec<f32> = (0..nq * dim).map(|_| rnd(&mut s)).collect();
            let x: Vec<f32> = (0..n * dim).map(|_| rnd(&mut s)).collect();
            let x2: Vec<f32> = x
                .chunks(dim)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect();
            let exact = |t: usize, j: usize| -> f64 {
                let dot: f64 = (0..dim)
                    .map(|d| q[t * dim + d] as f64 * x[j * dim + d] as f64)
                    .sum();
                x2[j] as f64 - 2.0 * dot
            };
            // A bound per query near the middle of its values, so about half the pairs pass.
            let mut bound: Vec<f32> = (0..nq)
                .map(|t| exact(t, 0) as f32 + 0.01 * t as f32)
                .collect();
            let fixed = bound.clone();
            let mut seen = vec![false; nq * n];
            products_below(&q, dim, &x, &x2, &mut bound, &mut |t, j, e| {
                assert!(!seen[t * n + j], "pair ({t}, {j}) reported twice");
                seen[t * n + j] = true;
                let want = exact(t, j);
                assert!(
                    (e as f64 - want).abs() < 1e-4,
                    "({t}, {j}): e {e}, exact {want}"
                );
                fixed[t]
            });
            assert_eq!(bound, fixed, "{nq}×{n}×{dim}: the bounds returned are kept");
            for t in 0..nq {
                for j in 0..n {
                    let want = exact(t, j);
                    let b = fixed[t] as f64;
                    if want < b - 1e-4 {
                        assert!(
                            seen[t * n + j],
                            "{nq}×{n}×{dim}: ({t}, {j}) {want} < {b} missed"
                        );
                    } else if want > b + 1e-4 {
                        assert!(
                            !seen[t * n + j],
                            "{nq}×{n}×{dim}: ({t}, {j}) {want} ≥ {b} reported"
                        );
                    }
                }
            }
        }
    }

    /// A bound tightened by `hit` applies to the rows after it: with the bound set to the `e` of
    /// each hit, a query sees only a strictly decreasing sequence of values.
    #[test]
    fn a_tightened_bound_applies_to_later_rows() {
        if !available() {
            return;
        }
        let (nq, n, dim) = (20, 200, 24);
        let mut s = 5;
        let q: Vec<f32> = (0..nq * dim).map(|_| rnd(&mut s)).collect();
        let x: Vec<f32> = (0..n * dim).map(|_| rnd(&mut s)).collect();
        let x2: Vec<f32> = x
            .chunks(dim)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let mut bound = vec![f32::INFINITY; nq];
        let mut last = vec![(f32::INFINITY, 0usize); nq];
        products_below(&q, dim, &x, &x2, &mut bound, &mut |t, j, e| {
            assert!(e < last[t].0 && (j > last[t].1 || last[t].0.is_infinite()));
            last[t] = (e, j);
            e
        });
        for t in 0..nq {
            assert_eq!(bound[t], last[t].0);
        }
    }
}
