//! BatchNorm (+ ReLU6) over channels-last rows `[rows][c]`: the per-element kernels of the forward
//! and backward passes and the threaded column reductions they need. The reductions add up to
//! [`BLOCK`] rows in f32 (full-width vectors) and the blocks' sums in f64.
//!
//! The training pass keeps a layer's input `z` and its [`Cols`], not x̂: every backward kernel
//! recomputes `x̂ = (z − μ)·invstd` (the same f32 operations as the forward, so the same bits) and
//! the ReLU6 mask from it, which saves writing x̂ and the masked gradient back to memory.

use crate::cpu::simd::multiversion;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per task of the threaded row passes.
pub const ROWS_PER_TASK: usize = 512;
/// Rows a column reduction sums in f32 before adding the block's sum to its f64 total.
pub const BLOCK: usize = 32;

/// A BatchNorm layer's per-channel numbers as the row kernels read them: the normalisation
/// (μ, 1/σ) and the affine part (γ, β), each `c` long.
#[derive(Clone, Copy)]
pub struct Cols<'a> {
    pub mean: &'a [f32],
    pub invstd: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
}

impl<'a> Cols<'a> {
    /// The four slices cut to `c`.
    #[inline(always)]
    fn cut(self, c: usize) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
        (
            &self.mean[..c],
            &self.invstd[..c],
            &self.gamma[..c],
            &self.beta[..c],
        )
    }
}

/// The backward pass's per-channel factors: `d ← g·(v − md − x̂·mdx)`, with `v` the (masked) gradient.
#[derive(Clone, Copy)]
pub struct BackCols<'a> {
    pub g: &'a [f32],
    pub md: &'a [f32],
    pub mdx: &'a [f32],
}

multiversion!(fn mask_dot_any => mask_dot_k(d: &[f32], z: &[f32], c: usize, p: Cols, mask: bool, s: &mut [f64], sx: &mut [f64], part: &mut [f32]));
multiversion!(fn moments => moments_k(x: &[f32], c: usize, shift: &[f32], s: &mut [f64], s2: &mut [f64], part: &mut [f32]));
multiversion!(pub fn norm_rows => norm_rows_k(z: &[f32], a: &mut [MaybeUninit<f32>], c: usize, p: Cols, relu6: bool));
multiversion!(fn norm_back_rows => norm_back_rows_k(d: &mut [f32], z: &[f32], c: usize, p: Cols, mask: bool, b: BackCols));
multiversion!(pub fn norm_back_into => norm_back_into_k(d: &[f32], z: &[f32], out: &mut [f32], c: usize, p: Cols, mask: bool, b: BackCols));

/// [`mask_dot_k`], by the AVX-512 kernel where the CPU has it: the same operations on each value
/// in the same order (so the same bits), but a row's last channels as one masked vector where
/// the compiled loop runs them one by one (24 or 40 channels: a scalar tail of 8 per row).
#[allow(clippy::too_many_arguments)]
fn mask_dot(
    d: &[f32],
    z: &[f32],
    c: usize,
    p: Cols,
    mask: bool,
    s: &mut [f64],
    sx: &mut [f64],
    part: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::mask_dot(d, z, c, p, mask, s, sx) };
    }
    mask_dot_any(d, z, c, p, mask, s, sx, part)
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// `a ← γ·x̂ + β` (ReLU6'd when `relu6`) with `x̂ = (z − μ)·invstd`, threaded over row blocks;
/// writes every element of `a` (as long as `z`).
pub fn normalise(z: &[f32], a: &mut [MaybeUninit<f32>], c: usize, p: Cols, relu6: bool) {
    assert_eq!(z.len(), a.len());
    z.par_chunks(ROWS_PER_TASK * c)
        .zip(a.par_chunks_mut(ROWS_PER_TASK * c))
        .for_each(|(zc, ac)| norm_rows(zc, ac, c, p, relu6));
}

/// BatchNorm backward over the rows, threaded: `d ← g·(v − md − x̂·mdx)`, where `v` is `d` with
/// the ReLU6 mask applied when `mask` (zero where `γ·x̂ + β` is outside (0, 6)).
pub fn norm_back(d: &mut [f32], z: &[f32], c: usize, p: Cols, mask: bool, b: BackCols) {
    assert_eq!(z.len(), d.len());
    d.par_chunks_mut(ROWS_PER_TASK * c)
        .zip(z.par_chunks(ROWS_PER_TASK * c))
        .for_each(|(dc, zc)| norm_back_rows(dc, zc, c, p, mask, b));
}

/// The column sums of a BatchNorm backward's first half: of `v` and of `v·x̂` ([`masked_col_dot`]).
pub type Sums = (Vec<f32>, Vec<f32>);

/// The column sums of `v` and `v·x̂`, where `x̂ = (z − μ)·invstd` and `v` is `d` with the ReLU6 mask
/// applied when `mask` (zero where `γ·x̂ + β` is outside (0, 6)). Reads only.
pub fn masked_col_dot(d: &[f32], z: &[f32], c: usize, p: Cols, mask: bool) -> Sums {
    assert_eq!(z.len(), d.len());
    let (a, b) = d
        .par_chunks(ROWS_PER_TASK * c)
        .zip(z.par_chunks(ROWS_PER_TASK * c))
        .map(|(dc, zc)| {
            let mut s = vec![0f64; c];
            let mut sx = vec![0f64; c];
            let mut part = vec![0f32; 2 * c];
            mask_dot(dc, zc, c, p, mask, &mut s, &mut sx, &mut part);
            (s, sx)
        })
        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
    (
        a.into_iter().map(|v| v as f32).collect(),
        b.into_iter().map(|v| v as f32).collect(),
    )
}

/// [`masked_col_dot`] of one slice on the calling thread, added to the f64 totals `s`, `sx` (`c` each).
pub fn masked_sums_add(
    d: &[f32],
    z: &[f32],
    c: usize,
    p: Cols,
    mask: bool,
    s: &mut [f64],
    sx: &mut [f64],
) {
    assert_eq!(z.len(), d.len());
    let mut part = vec![0f32; 2 * c];
    mask_dot(d, z, c, p, mask, s, sx, &mut part);
}

/// Column statistics of some rows `[rows][c]`: their number, and per column the mean and the sum
/// of squared deviations (f64). Statistics of parts merge exactly into those of the whole
/// ([`Moments::merge`], Chan et al.), so a producer can take them from each part of its output
/// while it is in cache, and adding the parts in a fixed order gives the same bits on any number
/// of threads.
pub struct Moments {
    rows: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    /// The statistics of `x` (at least one row), on the calling thread. The sums are of `x − k`
    /// and `(x − k)²` with `k` the first row, so a column whose mean is large against its spread
    /// loses no precision to `E[x²] − E[x]²`.
    pub fn of(x: &[f32], c: usize) -> Self {
        let shift = &x[..c];
        let (mut s1, mut s2) = (vec![0f64; c], vec![0f64; c]);
        let mut part = vec![0f32; 2 * c];
        moments(x, c, shift, &mut s1, &mut s2, &mut part);
        let r = (x.len() / c) as f64;
        let mean = s1
            .iter()
            .zip(shift)
            .map(|(s, &k)| k as f64 + s / r)
            .collect();
        let m2 = s1
            .iter()
            .zip(&s2)
            .map(|(a, b)| (b - a * a / r).max(0.0))
            .collect();
        Self { rows: r, mean, m2 }
    }

    /// The statistics of `x` (at least one row), threaded: [`Moments::of`] fixed blocks of rows,
    /// merged in order.
    pub fn of_rows(x: &[f32], c: usize) -> Self {
        let parts: Vec<Moments> = x
            .par_chunks(ROWS_PER_TASK * c)
            .map(|xc| Moments::of(xc, c))
            .collect();
        Moments::merged(parts)
    }

    /// Adds the statistics of more rows.
    pub fn merge(&mut self, o: &Moments) {
        let n = self.rows + o.rows;
        for ((m, q), (om, oq)) in self
            .mean
            .iter_mut()
            .zip(&mut self.m2)
            .zip(o.mean.iter().zip(&o.m2))
        {
            let delta = om - *m;
            *m += delta * o.rows / n;
            *q += oq + delta * delta * self.rows * o.rows / n;
        }
        self.rows = n;
    }

    /// The statistics of parts merged in their order (at least one).
    pub fn merged(parts: impl IntoIterator<Item = Moments>) -> Moments {
        let mut parts = parts.into_iter();
        let mut all = parts.next().expect("statistics of at least one part");
        parts.for_each(|p| all.merge(&p));
        all
    }

    /// Per-column mean and (biased) variance.
    pub fn mean_var(&self) -> (Vec<f32>, Vec<f32>) {
        let mean = self.mean.iter().map(|&m| m as f32).collect();
        let var = self.m2.iter().map(|&q| (q / self.rows) as f32).collect();
        (mean, var)
    }
}

/// Per-column mean and (biased) variance over the rows of `x` (at least one row).
pub fn col_moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    Moments::of_rows(x, c).mean_var()
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

/// The ReLU6 mask and x̂ of one element: `(x̂, v)` with `v = d` unless `mask` and `γ·x̂ + β` is
/// outside (0, 6), then 0. The same operations as the forward's [`norm_rows_k`].
#[inline(always)]
fn masked(d: f32, z: f32, m: f32, is: f32, g: f32, b: f32, mask: bool) -> (f32, f32) {
    let xh = (z - m) * is;
    let y = g * xh + b;
    let v = if !mask || (y > 0.0 && y < 6.0) {
        d
    } else {
        0.0
    };
    (xh, v)
}

/// Column sums of `v` and `v·x̂` (see [`masked`]) added to `s`, `sx`: per [`BLOCK`] rows in f32 (in
/// `part`, 2·c floats), then in f64.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mask_dot_k(
    d: &[f32],
    z: &[f32],
    c: usize,
    p: Cols,
    mask: bool,
    s: &mut [f64],
    sx: &mut [f64],
    part: &mut [f32],
) {
    let (mean, invstd, gamma, beta) = p.cut(c);
    let (s, sx) = (&mut s[..c], &mut sx[..c]);
    let (ps, psx) = part[..2 * c].split_at_mut(c);
    for (db, zb) in d.chunks(BLOCK * c).zip(z.chunks(BLOCK * c)) {
        ps.fill(0.0);
        psx.fill(0.0);
        for (dr, zr) in db.chunks_exact(c).zip(zb.chunks_exact(c)) {
            for j in 0..c {
                let (xh, v) = masked(dr[j], zr[j], mean[j], invstd[j], gamma[j], beta[j], mask);
                ps[j] += v;
                psx[j] += v * xh;
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

/// `a ← γ·x̂ + β` (ReLU6'd when `relu6`), `x̂ = (z − μ)·invstd`: every element of `a` written.
#[inline(always)]
fn norm_rows_k(z: &[f32], a: &mut [MaybeUninit<f32>], c: usize, p: Cols, relu6: bool) {
    let (mean, invstd, gamma, beta) = p.cut(c);
    for (zr, ar) in z.chunks_exact(c).zip(a.chunks_exact_mut(c)) {
        let ar = &mut ar[..c];
        for j in 0..c {
            let xh = (zr[j] - mean[j]) * invstd[j];
            let y = gamma[j] * xh + beta[j];
            ar[j].write(if relu6 { y.clamp(0.0, 6.0) } else { y });
        }
    }
}

/// BatchNorm backward per element: `d ← g·(v − md − x̂·mdx)` (see [`masked`] for `x̂`, `v`).
#[inline(always)]
fn norm_back_rows_k(d: &mut [f32], z: &[f32], c: usize, p: Cols, mask: bool, b: BackCols) {
    let (mean, invstd, gamma, beta) = p.cut(c);
    let (g, md, mdx) = (&b.g[..c], &b.md[..c], &b.mdx[..c]);
    for (dr, zr) in d.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
        let dr = &mut dr[..c];
        for j in 0..c {
            let (xh, v) = masked(dr[j], zr[j], mean[j], invstd[j], gamma[j], beta[j], mask);
            dr[j] = g[j] * (v - md[j] - xh * mdx[j]);
        }
    }
}

/// [`norm_back_rows_k`] into `out` (as long as `d`), leaving `d` as it is.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn norm_back_into_k(
    d: &[f32],
    z: &[f32],
    out: &mut [f32],
    c: usize,
    p: Cols,
    mask: bool,
    b: BackCols,
) {
    let (mean, invstd, gamma, beta) = p.cut(c);
    let (g, md, mdx) = (&b.g[..c], &b.md[..c], &b.mdx[..c]);
    assert!(z.len() == d.len() && out.len() == d.len());
    for ((dr, zr), or) in d
        .chunks_exact(c)
        .zip(z.chunks_exact(c))
        .zip(out.chunks_exact_mut(c))
    {
        let (dr, or) = (&dr[..c], &mut or[..c]);
        for j in 0..c {
            let (xh, v) = masked(dr[j], zr[j], mean[j], invstd[j], gamma[j], beta[j], mask);
            or[j] = g[j] * (v - md[j] - xh * mdx[j]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
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
    fn masked_sums_and_backward_match_a_scalar_reference_over_blocks_and_tasks() {
        // 1,100 rows: three tasks, the last with a partial block; x̂ is recomputed from z, μ, 1/σ.
        let (rows, c) = (1100, 5);
        let z = noise(rows * c, 11);
        let d0 = noise(rows * c, 13);
        let gamma = [2.0, 1.0, 3.0, 0.5, 8.0];
        let beta = [0.5, 3.0, 1.0, -0.2, 2.0];
        let mean = [0.1, -0.2, 0.0, 0.3, -0.05];
        let invstd = [1.5, 0.7, 2.0, 1.0, 3.0];
        let p = Cols {
            mean: &mean,
            invstd: &invstd,
            gamma: &gamma,
            beta: &beta,
        };
        let (g, md, mdx) = (
            [0.5, 2.0, 1.0, 3.0, 0.25],
            [0.01, -0.02, 0.03, 0.0, 0.1],
            [0.2, 0.1, -0.3, 0.05, 0.0],
        );
        let b = BackCols {
            g: &g,
            md: &md,
            mdx: &mdx,
        };
        for mask in [false, true] {
            let (s, sx) = masked_col_dot(&d0, &z, c, p, mask);
            let mut d = d0.clone();
            norm_back(&mut d, &z, c, p, mask, b);
            let mut into = vec![f32::NAN; d0.len()];
            norm_back_into(&d0, &z, &mut into, c, p, mask, b);
            assert_eq!(into, d, "out of place = in place (mask {mask})");
            let (mut es, mut esx) = (vec![0f64; c], vec![0f64; c]);
            let mut zeroed = 0;
            for i in 0..rows * c {
                let j = i % c;
                let xh = (z[i] - mean[j]) * invstd[j];
                let y = gamma[j] * xh + beta[j];
                let v = if !mask || (y > 0.0 && y < 6.0) {
                    d0[i]
                } else {
                    zeroed += 1;
                    0.0
                };
                let want = g[j] * (v - md[j] - xh * mdx[j]);
                assert_eq!(d[i], want, "backward at {i} (mask {mask})");
                es[j] += v as f64;
                esx[j] += (v * xh) as f64;
            }
            assert_eq!(zeroed > 0, mask, "the mask must bite in this data");
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

    /// The column sums (the AVX-512 kernel where the CPU has it) are, bit for bit, the plain
    /// per-value loop: f32 sums over each block of rows in row order, then f64, for channel counts
    /// that leave masked tails (5, 24, 40, 100) and that do not (16, 96), and a partial last block.
    #[test]
    fn column_sums_are_the_plain_loop_bit_for_bit() {
        for c in [5, 16, 24, 40, 96, 100] {
            let rows = 2 * BLOCK + 7;
            let (z, d) = (noise(rows * c, c as u64), noise(rows * c, 7 + c as u64));
            let cols: Vec<Vec<f32>> = (0..4)
                .map(|i| {
                    noise(c, 100 + i)
                        .iter()
                        .map(|v| 1.5 * v + 0.5 * (i % 2) as f32 + 0.5)
                        .collect()
                })
                .collect();
            let (mean, invstd, gamma, beta) = (&cols[0], &cols[1], &cols[2], &cols[3]);
            let p = Cols {
                mean,
                invstd,
                gamma,
                beta,
            };
            for mask in [false, true] {
                let (mut s, mut sx) = (vec![0.5f64; c], vec![-0.25f64; c]);
                masked_sums_add(&d, &z, c, p, mask, &mut s, &mut sx);
                let (mut es, mut esx) = (vec![0.5f64; c], vec![-0.25f64; c]);
                for r0 in (0..rows).step_by(BLOCK) {
                    let (mut ps, mut psx) = (vec![0f32; c], vec![0f32; c]);
                    for r in r0..(r0 + BLOCK).min(rows) {
                        for j in 0..c {
                            let i = r * c + j;
                            let xh = (z[i] - mean[j]) * invstd[j];
                            let y = gamma[j] * xh + beta[j];
                            let v = if !mask || (y > 0.0 && y < 6.0) {
                                d[i]
                            } else {
                                0.0
                            };
                            ps[j] += v;
                            psx[j] += v * xh;
                        }
                    }
                    for j in 0..c {
                        es[j] += ps[j] as f64;
                        esx[j] += psx[j] as f64;
                    }
                }
                assert_eq!(s, es, "sums, {c} channels, mask {mask}");
                assert_eq!(sx, esx, "dots, {c} channels, mask {mask}");
            }
        }
    }

    #[test]
    fn normalise_writes_every_element_as_the_scalar_formula() {
        let (rows, c) = (1100, 3);
        let z = noise(rows * c, 5);
        let (mean, invstd) = ([0.2, -0.1, 0.0], [4.0, 1.0, 9.0]);
        let (gamma, beta) = ([1.0, 2.0, -3.0], [0.5, 0.0, 2.0]);
        let p = Cols {
            mean: &mean,
            invstd: &invstd,
            gamma: &gamma,
            beta: &beta,
        };
        for relu6 in [false, true] {
            let mut a = vec![MaybeUninit::new(f32::NAN); rows * c];
            normalise(&z, &mut a, c, p, relu6);
            for i in 0..rows * c {
                let j = i % c;
                let y = gamma[j] * ((z[i] - mean[j]) * invstd[j]) + beta[j];
                let want = if relu6 { y.clamp(0.0, 6.0) } else { y };
                // SAFETY: set to NaN above, and `normalise` writes every element.
                assert_eq!(
                    unsafe { a[i].assume_init() },
                    want,
                    "at {i} (relu6 {relu6})"
                );
            }
        }
    }
}
