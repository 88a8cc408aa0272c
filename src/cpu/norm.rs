//! BatchNorm (+ ReLU6) over channels-last rows `[rows][c]`: the per-element kernels of the forward
//! and backward passes and the threaded column reductions they need. The reductions add up to
//! [`BLOCK`] rows in f32 (full-width vectors) and the blocks' sums in f64.

use crate::cpu::simd::multiversion;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per task of the threaded row passes.
pub const ROWS_PER_TASK: usize = 512;
/// Rows a column reduction sums in f32 before adding the block's sum to its f64 total.
pub const BLOCK: usize = 32;

multiversion!(fn mask_dot => mask_dot_k(d: &mut [f32], x: &[f32], c: usize, gamma: &[f32], beta: &[f32], mask: bool, s: &mut [f64], sx: &mut [f64], part: &mut [f32]));
multiversion!(fn moments => moments_k(x: &[f32], c: usize, shift: &[f32], s: &mut [f64], s2: &mut [f64], part: &mut [f32]));
multiversion!(pub fn norm_rows => norm_rows_k(z: &mut [f32], a: &mut [MaybeUninit<f32>], c: usize, mean: &[f32], invstd: &[f32], gamma: &[f32], beta: &[f32], relu6: bool));
multiversion!(pub fn norm_back_rows => norm_back_rows_k(d: &mut [f32], x: &[f32], c: usize, g: &[f32], md: &[f32], mdx: &[f32]));

/// Zeroes `d` where the BatchNorm output `γ·x̂ + β` is outside ReLU6's (0, 6) when `mask` (γ, β) is given,
/// and returns the column sums of `d` and `d·x̂`.
pub fn masked_col_dot(
    d: &mut [f32],
    x: &[f32],
    c: usize,
    mask: Option<(&[f32], &[f32])>,
) -> (Vec<f32>, Vec<f32>) {
    let unused = vec![0f32; c];
    let (gamma, beta) = match mask {
        Some((g, b)) => (g, b),
        None => (&unused[..], &unused[..]),
    };
    let (a, b) = d
        .par_chunks_mut(ROWS_PER_TASK * c)
        .zip(x.par_chunks(ROWS_PER_TASK * c))
        .map(|(dc, xc)| {
            let mut s = vec![0f64; c];
            let mut sx = vec![0f64; c];
            let mut part = vec![0f32; 2 * c];
            mask_dot(
                dc,
                xc,
                c,
                gamma,
                beta,
                mask.is_some(),
                &mut s,
                &mut sx,
                &mut part,
            );
            (s, sx)
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    (
        a.into_iter().map(|v| v as f32).collect(),
        b.into_iter().map(|v| v as f32).collect(),
    )
}

/// Per-column mean and (biased) variance over the rows of `x` (at least one row). The sums are of
/// `x − k` and `(x − k)²` with `k` the first row, so a column whose mean is large against its
/// spread loses no precision to `E[x²] − E[x]²`.
pub fn col_moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let shift = &x[..c];
    let (s1, s2) = x
        .par_chunks(ROWS_PER_TASK * c)
        .map(|xc| {
            let mut s = vec![0f64; c];
            let mut s2 = vec![0f64; c];
            let mut part = vec![0f32; 2 * c];
            moments(xc, c, shift, &mut s, &mut s2, &mut part);
            (s, s2)
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    let r = (x.len() / c) as f64;
    let mean = s1
        .iter()
        .zip(shift)
        .map(|(s, &k)| (k as f64 + s / r) as f32);
    let var = s1
        .iter()
        .zip(&s2)
        .map(|(a, b)| (b / r - (a / r) * (a / r)).max(0.0) as f32);
    (mean.collect(), var.collect())
}

/// Element-wise sum of two pairs of per-column sums.
fn add_pairs(
    (mut a, mut b): (Vec<f64>, Vec<f64>),
    (x, y): (Vec<f64>, Vec<f64>),
) -> (Vec<f64>, Vec<f64>) {
    a.iter_mut().zip(x).for_each(|(p, q)| *p += q);
    b.iter_mut().zip(y).for_each(|(p, q)| *p += q);
    (a, b)
}

/// ReLU6 mask on `d` (where `γ·x̂ + β` is outside (0, 6), when `mask`), and column sums of d, d·x̂
/// added to `s`, `sx`: per [`BLOCK`] rows in f32 (in `part`, 2·c floats), then in f64.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mask_dot_k(
    d: &mut [f32],
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    mask: bool,
    s: &mut [f64],
    sx: &mut [f64],
    part: &mut [f32],
) {
    let (gamma, beta, s, sx) = (&gamma[..c], &beta[..c], &mut s[..c], &mut sx[..c]);
    let (ps, psx) = part[..2 * c].split_at_mut(c);
    for (db, xb) in d.chunks_mut(BLOCK * c).zip(x.chunks(BLOCK * c)) {
        ps.fill(0.0);
        psx.fill(0.0);
        for (dr, xr) in db.chunks_exact_mut(c).zip(xb.chunks_exact(c)) {
            for (((((dv, &xv), &g), &b), sa), sb) in dr
                .iter_mut()
                .zip(xr)
                .zip(gamma)
                .zip(beta)
                .zip(ps.iter_mut())
                .zip(psx.iter_mut())
            {
                let y = g * xv + b;
                let v = if !mask || (y > 0.0 && y < 6.0) {
                    *dv
                } else {
                    0.0
                };
                *dv = v;
                *sa += v;
                *sb += v * xv;
            }
        }
        add_block(s, ps);
        add_block(sx, psx);
    }
}

/// Column sums of `x − shift` and `(x − shift)²` added to `s`, `s2`: per [`BLOCK`] rows in f32 (in
/// `part`, 2·c floats), then in f64.
#[inline(always)]
fn moments_k(x: &[f32], c: usize, shift: &[f32], s: &mut [f64], s2: &mut [f64], part: &mut [f32]) {
    let (shift, s, s2) = (&shift[..c], &mut s[..c], &mut s2[..c]);
    let (ps, ps2) = part[..2 * c].split_at_mut(c);
    for xb in x.chunks(BLOCK * c) {
        ps.fill(0.0);
        ps2.fill(0.0);
        for r in xb.chunks_exact(c) {
            for (((&v, &k), a), b) in r.iter().zip(shift).zip(ps.iter_mut()).zip(ps2.iter_mut()) {
                let v = v - k;
                *a += v;
                *b += v * v;
            }
        }
        add_block(s, ps);
        add_block(s2, ps2);
    }
}

/// `total += part`, element-wise in f64.
#[inline(always)]
fn add_block(total: &mut [f64], part: &[f32]) {
    total
        .iter_mut()
        .zip(part)
        .for_each(|(t, &p)| *t += p as f64);
}

/// `z ← x̂ = (z − μ)·invstd`, `a ← γ·x̂ + β` (ReLU6'd when `relu6`): every element of `a` written.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn norm_rows_k(
    z: &mut [f32],
    a: &mut [MaybeUninit<f32>],
    c: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    relu6: bool,
) {
    let (mean, invstd, gamma, beta) = (&mean[..c], &invstd[..c], &gamma[..c], &beta[..c]);
    for (zr, ar) in z.chunks_exact_mut(c).zip(a.chunks_exact_mut(c)) {
        for (((((zv, av), &m), &is), &g), &b) in zr
            .iter_mut()
            .zip(ar.iter_mut())
            .zip(mean)
            .zip(invstd)
            .zip(gamma)
            .zip(beta)
        {
            let xh = (*zv - m) * is;
            *zv = xh;
            let y = g * xh + b;
            av.write(if relu6 { y.clamp(0.0, 6.0) } else { y });
        }
    }
}

/// BatchNorm backward per element: `d ← g·(d − md − x̂·mdx)`.
#[inline(always)]
fn norm_back_rows_k(d: &mut [f32], x: &[f32], c: usize, g: &[f32], md: &[f32], mdx: &[f32]) {
    let (g, md, mdx) = (&g[..c], &md[..c], &mdx[..c]);
    for (dr, xr) in d.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for ((((dv, &xv), &gg), &m), &mx) in dr.iter_mut().zip(xr).zip(g).zip(md).zip(mdx) {
            *dv = gg * (*dv - m - xv * mx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn moments_match_two_pass_f64_even_with_a_large_mean() {
        // 1,100 rows: two tasks, the second with a partial block; column 0 has mean 1000 and a
        // spread of 0.01, where E[x²] − E[x]² in f32 would lose everything.
        let (rows, c) = (1100, 3);
        let mut x = noise(rows * c, 7);
        for r in 0..rows {
            x[r * c] = 1000.0 + 0.01 * x[r * c];
            x[r * c + 2] = 5.0 * x[r * c + 2] - 2.0;
        }
        let (mean, var) = col_moments(&x, c);
        for j in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| x[r * c + j] as f64).collect();
            let m = col.iter().sum::<f64>() / rows as f64;
            let v = col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / rows as f64;
            assert!(
                ((mean[j] as f64 - m) / m.abs().max(1.0)).abs() < 1e-6,
                "mean {j}: {} vs {m}",
                mean[j]
            );
            assert!(
                ((var[j] as f64 - v) / v).abs() < 1e-4,
                "var {j}: {} vs {v}",
                var[j]
            );
        }
    }

    #[test]
    fn masked_sums_match_f64_over_blocks_and_tasks() {
        let (rows, c) = (1100, 5);
        let x = noise(rows * c, 11);
        let d0 = noise(rows * c, 13);
        let gamma = [2.0, 1.0, 3.0, 0.5, 8.0];
        let beta = [0.5, 3.0, 1.0, -0.2, 2.0];
        for mask in [false, true] {
            let mut d = d0.clone();
            let (s, sx) = masked_col_dot(&mut d, &x, c, mask.then_some((&gamma[..], &beta[..])));
            let (mut es, mut esx) = (vec![0f64; c], vec![0f64; c]);
            for i in 0..rows * c {
                let j = i % c;
                let y = gamma[j] * x[i] + beta[j];
                let v = if !mask || (y > 0.0 && y < 6.0) {
                    d0[i]
                } else {
                    0.0
                };
                assert_eq!(d[i], v, "masked gradient at {i}");
                es[j] += v as f64;
                esx[j] += (v * x[i]) as f64;
            }
            for j in 0..c {
                assert!(
                    (s[j] as f64 - es[j]).abs() < 1e-4,
                    "sum {j}: {} vs {}",
                    s[j],
                    es[j]
                );
                assert!(
                    (sx[j] as f64 - esx[j]).abs() < 1e-4,
                    "dot {j}: {} vs {}",
                    sx[j],
                    esx[j]
                );
            }
        }
    }
}
