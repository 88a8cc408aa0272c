//! BatchNorm (+ ReLU6) over channels-last rows `[rows][c]`: the per-element kernels of the forward
//! and backward passes and the threaded column reductions (f64 sums per task) they need.

use crate::cpu::simd::multiversion;
use rayon::prelude::*;

/// Rows per task of the threaded row passes.
pub const ROWS_PER_TASK: usize = 512;

multiversion!(fn mask_dot => mask_dot_k(d: &mut [f32], x: &[f32], c: usize, gamma: &[f32], beta: &[f32], mask: bool, s: &mut [f64], sx: &mut [f64]));
multiversion!(fn moments => moments_k(x: &[f32], c: usize, s: &mut [f64], s2: &mut [f64]));
multiversion!(pub fn norm_rows => norm_rows_k(z: &mut [f32], a: &mut [f32], c: usize, mean: &[f32], invstd: &[f32], gamma: &[f32], beta: &[f32], relu6: bool));
multiversion!(pub fn norm_back_rows => norm_back_rows_k(d: &mut [f32], x: &[f32], c: usize, g: &[f32], md: &[f32], mdx: &[f32]));

/// Zeroes `d` where the BatchNorm output `γ·x̂ + β` is outside ReLU6's (0, 6) when `mask` (γ, β) is given,
/// and returns the column sums of `d` and `d·x̂` (accumulated in f64 per task).
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
            mask_dot(dc, xc, c, gamma, beta, mask.is_some(), &mut s, &mut sx);
            (s, sx)
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    (
        a.into_iter().map(|v| v as f32).collect(),
        b.into_iter().map(|v| v as f32).collect(),
    )
}

/// Per-column sums of x and x² over rows (f64).
pub fn col_moments(x: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    x.par_chunks(ROWS_PER_TASK * c)
        .map(|xc| {
            let mut s = vec![0f64; c];
            let mut s2 = vec![0f64; c];
            moments(xc, c, &mut s, &mut s2);
            (s, s2)
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs)
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

/// ReLU6 mask on `d` (where `γ·x̂ + β` is outside (0, 6), when `mask`), and column sums of d, d·x̂.
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
) {
    let (gamma, beta, s, sx) = (&gamma[..c], &beta[..c], &mut s[..c], &mut sx[..c]);
    for (dr, xr) in d.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((((dv, &xv), &g), &b), sa), sb) in dr
            .iter_mut()
            .zip(xr)
            .zip(gamma)
            .zip(beta)
            .zip(s.iter_mut())
            .zip(sx.iter_mut())
        {
            let y = g * xv + b;
            let v = if !mask || (y > 0.0 && y < 6.0) {
                *dv
            } else {
                0.0
            };
            *dv = v;
            *sa += v as f64;
            *sb += (v * xv) as f64;
        }
    }
}

/// Column sums of x and x².
#[inline(always)]
fn moments_k(x: &[f32], c: usize, s: &mut [f64], s2: &mut [f64]) {
    let (s, s2) = (&mut s[..c], &mut s2[..c]);
    for r in x.chunks_exact(c) {
        for ((&v, a), b) in r.iter().zip(s.iter_mut()).zip(s2.iter_mut()) {
            let v = v as f64;
            *a += v;
            *b += v * v;
        }
    }
}

/// `z ← x̂ = (z − μ)·invstd`, `a ← γ·x̂ + β` (ReLU6'd when `relu6`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn norm_rows_k(
    z: &mut [f32],
    a: &mut [f32],
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
            *av = if relu6 { y.clamp(0.0, 6.0) } else { y };
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
