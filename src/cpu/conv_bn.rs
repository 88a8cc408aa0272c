//! The training pass's convolutions fused with the BatchNorm around them, so that the large
//! early activations go to memory fewer times.
//!
//! - Backward, once a BatchNorm's column sums are known: its second half (`dz = g·(v − md −
//!   x̂·mdx)`, see [`crate::cpu::norm`]) is fused with the convolution's gradients, so `dz` never
//!   goes to memory on the large layers. A 1×1 convolution ([`pointwise_back`]) with enough rows
//!   runs in parts of rows: each part's `dz` is computed into a scratch buffer that stays in the
//!   core's L2, then its share of the weight gradient (`dzᵀ·x`) and its rows of the input gradient
//!   (`dz·w`) are two single-threaded products over it. The parts depend on the shape alone and
//!   their weight-gradient sums are added in part order, so the result does not depend on the
//!   number of threads. Layers with few rows (the deep 4×4 ones) run the BatchNorm pass and the
//!   `gemm` crate's threaded products instead. A depthwise convolution ([`depthwise_back`]) runs
//!   per image: the image's `dz` into scratch, then [`dw_back_one`].
//! - A depthwise convolution after an expansion reads the expansion's BatchNorm + ReLU6 output,
//!   which is never stored: forward ([`depthwise_forward`]) and backward compute each image's
//!   input into scratch from the expansion's `z`. The backward also adds up, per image while its
//!   input gradient is in cache, the expansion BatchNorm's column sums, added in image order.

use crate::cpu::depthwise::{DwArgs, depthwise};
use crate::cpu::depthwise_back::{DwBack, dw_back_one};
use crate::cpu::gemm::{add_in_order, gemm_rm, gemm_uninit, matmul_nn, matmul_nt, matmul_tn};
use crate::cpu::norm::{
    BackCols, Cols, Moments, Sums, masked_sums_add, norm_back, norm_back_into, norm_rows, normalise,
};
use crate::cpu::pool;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The BatchNorm's part of a backward: its input `z` (`[rows][c]`), its numbers, whether ReLU6
/// followed it (the mask), and the backward's per-channel factors.
#[derive(Clone, Copy)]
pub struct NormBack<'a> {
    pub z: &'a [f32],
    pub cols: Cols<'a>,
    pub mask: bool,
    pub back: BackCols<'a>,
}

/// A 1×1 convolution's operands: its input `x` (`[rows][k]`), or with `x_norm` ReLU6(BatchNorm(`x`))
/// with those numbers (`x` is then the depthwise convolution's `z`), and weights `w` (`[n][k]`).
#[derive(Clone, Copy)]
pub struct Pointwise<'a> {
    pub x: &'a [f32],
    pub x_norm: Option<Cols<'a>>,
    pub w: &'a [f32],
    pub rows: usize,
    pub n: usize,
    pub k: usize,
}

/// Runs `f` on ReLU6(BatchNorm(`x`)) (`[rows][c]`, the numbers `cols`), computed into this thread's
/// scratch slot 1.
fn normalised<R>(x: &[f32], c: usize, cols: Cols, f: impl FnOnce(&[f32]) -> R) -> R {
    pool::with_scratch(1, x.len(), |a| {
        // SAFETY: `norm_rows` writes every element, and f32 has no invalid bit patterns.
        let out = unsafe { &mut *(a as *mut [f32] as *mut [MaybeUninit<f32>]) };
        norm_rows(x, out, c, cols, true);
        f(a)
    })
}

impl Pointwise<'_> {
    /// Runs `f` on rows `r0..r0 + r` of the input: a slice of `x`, or those rows normalised in
    /// scratch slot 1.
    fn input_rows<R>(&self, r0: usize, r: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let x = &self.x[r0 * self.k..][..r * self.k];
        match self.x_norm {
            None => f(x),
            Some(cols) => normalised(x, self.k, cols, f),
        }
    }

    /// Runs `f` on the whole input: `x`, or all of it normalised into a pool buffer.
    fn whole_input<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let x = &self.x[..self.rows * self.k];
        match self.x_norm {
            None => f(x),
            Some(cols) => {
                let mut a = pool::take(x.len());
                normalise(
                    x,
                    &mut a.spare_capacity_mut()[..x.len()],
                    self.k,
                    cols,
                    true,
                );
                // SAFETY: `normalise` wrote every one of the floats.
                unsafe { a.set_len(x.len()) };
                let r = f(&a);
                pool::give(a);
                r
            }
        }
    }
}

/// A 1×1 convolution forward, `z = input · wᵀ` (`[rows][n]`), and with `stats` the column
/// [`Moments`] of `z` for the BatchNorm after it. With enough rows it runs in parts of rows, each
/// part's input normalised into scratch (with `x_norm`) and its statistics taken while its output
/// is in cache; otherwise one threaded product.
pub fn pointwise_forward(p: Pointwise, stats: bool) -> (Vec<f32>, Option<Moments>) {
    let Pointwise { w, rows, n, k, .. } = p;
    assert!(p.x.len() >= rows * k && w.len() >= n * k);
    let part = part_rows(n.max(k));
    if rows < 4 * part {
        let z = p.whole_input(|x| matmul_nt(x, rows, k, w, n));
        let m = stats.then(|| Moments::of_rows(&z, n));
        return (z, m);
    }
    let mut z = pool::take(rows * n);
    let parts: Vec<Option<Moments>> = z.spare_capacity_mut()[..rows * n]
        .par_chunks_mut(part * n)
        .enumerate()
        .map(|(i, zp)| {
            let r = zp.len() / n;
            p.input_rows(i * part, r, |xp| {
                gemm_uninit(zp, [r, n, k], xp, [k as isize, 1], w, [1, k as isize])
            });
            // SAFETY: the product wrote every float of the part.
            let zp = unsafe { &*(zp as *const [MaybeUninit<f32>] as *const [f32]) };
            stats.then(|| Moments::of(zp, n))
        })
        .collect();
    // SAFETY: the parts cover all `rows·n` floats, each written by its product.
    unsafe { z.set_len(rows * n) };
    let m = stats.then(|| Moments::merged(parts.into_iter().flatten()));
    (z, m)
}

/// Rows of a part of [`pointwise_back`] for `n` output channels: a part's `dz` is about 512 KB.
pub fn part_rows(n: usize) -> usize {
    ((1usize << 17) / n.max(1) / 64 * 64).clamp(256, 4096)
}

/// The gradients of a 1×1 convolution followed by BatchNorm, from `d`, the gradient at the
/// BatchNorm's output (`[rows][n]`, before the ReLU6 mask): the weight gradient `[n][k]` and, when
/// `need_dx`, the input gradient `[rows][k]` (else empty). `d` goes back to the buffer pool.
pub fn pointwise_back(
    d: Vec<f32>,
    norm: NormBack,
    p: Pointwise,
    need_dx: bool,
) -> (Vec<f32>, Vec<f32>) {
    let Pointwise { w, rows, n, k, .. } = p;
    assert!(d.len() == rows * n && norm.z.len() == d.len() && p.x.len() >= rows * k);
    let part = part_rows(n.max(k));
    if rows < 4 * part {
        let mut d = d;
        norm_back(&mut d, norm.z, n, norm.cols, norm.mask, norm.back);
        let wg = p.whole_input(|x| matmul_tn(&d, rows, n, x, k));
        let dx = if need_dx {
            matmul_nn(&d, rows, n, w, k)
        } else {
            Vec::new()
        };
        pool::give(d);
        return (wg, dx);
    }
    let job = |i: usize, dx: Option<&mut [MaybeUninit<f32>]>| {
        let r0 = i * part;
        let r = part.min(rows - r0);
        pool::with_scratch(0, r * n, |dz| {
            let (zp, dp) = (&norm.z[r0 * n..][..r * n], &d[r0 * n..][..r * n]);
            norm_back_into(dp, zp, dz, n, norm.cols, norm.mask, norm.back);
            let mut g = vec![0f32; n * k];
            p.input_rows(r0, r, |xp| {
                gemm_rm(
                    &mut g,
                    [n, k, r],
                    dz,
                    [1, n as isize],
                    xp,
                    [k as isize, 1],
                    false,
                    false,
                )
            });
            if let Some(dx) = dx {
                gemm_uninit(dx, [r, k, n], dz, [n as isize, 1], w, [k as isize, 1]);
            }
            g
        })
    };
    let parts = rows.div_ceil(part);
    let mut dx = pool::take(if need_dx { rows * k } else { 0 });
    let sums: Vec<Vec<f32>> = if need_dx {
        dx.spare_capacity_mut()[..rows * k]
            .par_chunks_mut(part * k)
            .enumerate()
            .map(|(i, o)| job(i, Some(o)))
            .collect()
    } else {
        (0..parts).into_par_iter().map(|i| job(i, None)).collect()
    };
    if need_dx {
        // SAFETY: every part's product wrote its `r·k` floats, and the parts cover all `rows`.
        unsafe { dx.set_len(rows * k) };
    }
    pool::give(d);
    (add_in_order(sums), dx)
}

/// A depthwise convolution's shape and tap-major weights `[k·k][c]`, over `n` images `[h][h][c]` →
/// `[ho][ho][c]`. Its input is `x`, or with `x_norm` ReLU6(BatchNorm(`x`)) with those numbers (`x`
/// is then the expansion's `z`).
#[derive(Clone, Copy)]
pub struct Depthwise<'a> {
    pub x: &'a [f32],
    pub x_norm: Option<Cols<'a>>,
    pub wt: &'a [f32],
    pub n: usize,
    pub h: usize,
    pub ho: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
}

impl Depthwise<'_> {
    /// Runs `f` on image `img`'s input: a slice of `x`, or its normalised rows in scratch slot 1.
    fn input<R>(&self, img: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let per = self.h * self.h * self.c;
        let x = &self.x[img * per..(img + 1) * per];
        match self.x_norm {
            None => f(x),
            Some(cols) => normalised(x, self.c, cols, f),
        }
    }
}

/// The depthwise convolution forward (no bias), threaded over images: `[n][ho][ho][c]`, and with
/// `stats` its column [`Moments`], each image's taken while its output is in cache and merged in
/// image order.
pub fn depthwise_forward(a: Depthwise, stats: bool) -> (Vec<f32>, Option<Moments>) {
    let (h, c, per_out) = (a.h, a.c, a.ho * a.ho * a.c);
    assert!(a.x.len() >= a.n * h * h * c);
    let zeros = vec![0f32; c];
    let len = a.n * per_out;
    let mut out = pool::take(len);
    let parts: Vec<Option<Moments>> = out.spare_capacity_mut()[..len]
        .par_chunks_mut(per_out)
        .enumerate()
        .map(|(i, o)| {
            let o = pool::zeroed(o);
            a.input(i, |x| {
                let args = DwArgs {
                    x,
                    y0: 0,
                    h,
                    w: h,
                    c,
                    k: a.k,
                    stride: a.stride,
                    wt: a.wt,
                    bias: &zeros,
                    relu6: false,
                };
                depthwise(&args, o);
            });
            stats.then(|| Moments::of(o, c))
        })
        .collect();
    // SAFETY: every image's part was zero-filled by `zeroed` (the chunks cover them).
    unsafe { out.set_len(len) };
    let m = stats.then(|| Moments::merged(parts.into_iter().flatten()));
    (out, m)
}

/// [`Sums`] in f64, before they are added up.
type Sums64 = (Vec<f64>, Vec<f64>);

/// The gradients of a depthwise convolution followed by BatchNorm, from `d`, the gradient at the
/// BatchNorm's output (`[n][ho][ho][c]`, before the ReLU6 mask): the input gradient (when `need_dx`,
/// else empty), the tap-major weight gradient (images' shares added in image order), and with
/// `x_norm` and `need_dx` the expansion BatchNorm's column sums of the input gradient (masked, as
/// [`crate::cpu::norm::masked_col_dot`] of it against `x`). Threaded over images; `d` goes back to
/// the buffer pool.
pub fn depthwise_back(
    d: Vec<f32>,
    norm: NormBack,
    a: Depthwise,
    need_dx: bool,
) -> (Vec<f32>, Vec<f32>, Option<Sums>) {
    let Depthwise {
        x, n, h, ho, c, k, ..
    } = a;
    let per_in = h * h * c;
    let per_out = ho * ho * c;
    assert!(d.len() == n * per_out && norm.z.len() == d.len() && x.len() >= n * per_in);
    let sums = need_dx && a.x_norm.is_some();
    let len = if need_dx { n * per_in } else { 0 };
    let mut dx = pool::take(len);
    // One image: its weight-gradient share, and the expansion's column sums when `sums`.
    let job = |img: usize, dxi: &mut [MaybeUninit<f32>]| {
        let mut dw = vec![0f32; k * k * c];
        pool::with_scratch(0, per_out, |dz| {
            let (dp, zp) = (
                &d[img * per_out..][..per_out],
                &norm.z[img * per_out..][..per_out],
            );
            norm_back_into(dp, zp, dz, c, norm.cols, norm.mask, norm.back);
            a.input(img, |xi| {
                let b = DwBack {
                    x: xi,
                    dz,
                    h,
                    ho,
                    c,
                    k,
                    stride: a.stride,
                    wt: a.wt,
                };
                dw_back_one(&b, dxi, &mut dw);
            })
        });
        let s = match (sums, a.x_norm) {
            (true, Some(cols)) => {
                // SAFETY: `dw_back_one` wrote every float of the image's input gradient.
                let dxi = unsafe { &*(dxi as *const [MaybeUninit<f32>] as *const [f32]) };
                let (mut s, mut sx) = (vec![0f64; c], vec![0f64; c]);
                let xi = &x[img * per_in..(img + 1) * per_in];
                masked_sums_add(dxi, xi, c, cols, true, &mut s, &mut sx);
                Some((s, sx))
            }
            _ => None,
        };
        (dw, s)
    };
    let per: Vec<(Vec<f32>, Option<Sums64>)> = if need_dx && len > 0 {
        let r = dx.spare_capacity_mut()[..len]
            .par_chunks_mut(per_in)
            .enumerate()
            .map(|(img, dxi)| job(img, dxi))
            .collect();
        // SAFETY: `dw_back_one` wrote every float of every image's part (the chunks cover them).
        unsafe { dx.set_len(len) };
        r
    } else {
        (0..n)
            .into_par_iter()
            .map(|img| job(img, &mut []))
            .collect()
    };
    pool::give(d);
    let (dws, per_sums): (Vec<Vec<f32>>, Vec<Option<Sums64>>) = per.into_iter().unzip();
    let dw = add_in_order(std::iter::once(vec![0f32; k * k * c]).chain(dws));
    let (mut s, mut sx) = (vec![0f64; c], vec![0f64; c]);
    for (a, b) in per_sums.iter().flatten() {
        s.iter_mut().zip(a).for_each(|(p, q)| *p += q);
        sx.iter_mut().zip(b).for_each(|(p, q)| *p += q);
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, dw, sums.then(|| (f32s(s), f32s(sx))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::norm::tests::noise;

    /// Both paths of [`pointwise_forward`] and [`pointwise_back`] (parts, and the plain one for few
    /// rows), with the input as given and normalised on the fly, with and without the input
    /// gradient, against f64 references: z = input·wᵀ and its column statistics; dz = g·(v − md −
    /// x̂·mdx), dzᵀ·input and dz·w.
    #[test]
    fn pointwise_passes_match_an_f64_reference_in_parts_and_whole() {
        let (n, k) = (96, 24);
        let part = part_rows(n.max(k));
        let mean: Vec<f32> = noise(n, 1).iter().map(|v| v * 0.1).collect();
        let invstd: Vec<f32> = noise(n, 2).iter().map(|v| 1.5 + v).collect();
        let gamma: Vec<f32> = noise(n, 3).iter().map(|v| 3.0 * v).collect();
        let beta: Vec<f32> = noise(n, 4).iter().map(|v| 1.0 + v).collect();
        let (g, md, mdx) = (noise(n, 5), noise(n, 6), noise(n, 7));
        let w = noise(n * k, 8);
        // The input's own BatchNorm numbers (for `x_norm`), with values clamped at 0 and 6.
        let xm: Vec<f32> = noise(k, 12).iter().map(|v| v * 0.2).collect();
        let xs: Vec<f32> = noise(k, 13).iter().map(|v| 4.0 + 2.0 * v).collect();
        let xg: Vec<f32> = noise(k, 14).iter().map(|v| 2.0 * v).collect();
        let xb: Vec<f32> = noise(k, 15).iter().map(|v| 3.0 + 3.0 * v).collect();
        let xcols = Cols {
            mean: &xm,
            invstd: &xs,
            gamma: &xg,
            beta: &xb,
        };
        // 4 parts and a partial fifth; then fewer rows than four parts (the plain path).
        for rows in [4 * part + 77, 3 * part] {
            let (d, z, x) = (noise(rows * n, 9), noise(rows * n, 10), noise(rows * k, 11));
            for x_norm in [None, Some(xcols)] {
                let input: Vec<f32> = match x_norm {
                    None => x.clone(),
                    Some(_) => (0..rows * k)
                        .map(|i| {
                            let j = i % k;
                            (xg[j] * ((x[i] - xm[j]) * xs[j]) + xb[j]).clamp(0.0, 6.0)
                        })
                        .collect(),
                };
                let p = Pointwise {
                    x: &x,
                    x_norm,
                    w: &w,
                    rows,
                    n,
                    k,
                };
                let what = format!("rows {rows}, normalised input {}", x_norm.is_some());
                // Forward.
                let (got_z, m) = pointwise_forward(p, true);
                let mut fz = vec![0f64; rows * n];
                for r in 0..rows {
                    for j in 0..n {
                        fz[r * n + j] = (0..k)
                            .map(|c| input[r * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                    }
                }
                for (i, (a, b)) in got_z.iter().zip(&fz).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{what}: z {i}: {a} vs {b}"
                    );
                }
                let (gm, gv) = m.expect("statistics asked for").mean_var();
                for j in 0..n {
                    let col = (0..rows).map(|r| fz[r * n + j]);
                    let mu = col.clone().sum::<f64>() / rows as f64;
                    let var = col.map(|v| (v - mu) * (v - mu)).sum::<f64>() / rows as f64;
                    assert!(
                        (gm[j] as f64 - mu).abs() < 1e-4 * (1.0 + mu.abs()),
                        "{what}: mean {j}"
                    );
                    assert!(
                        (gv[j] as f64 - var).abs() < 1e-3 * var,
                        "{what}: var {j}: {} vs {var}",
                        gv[j]
                    );
                }
                // Backward.
                let (mut wg, mut dx) = (vec![0f64; n * k], vec![0f64; rows * k]);
                for r in 0..rows {
                    for j in 0..n {
                        let i = r * n + j;
                        let xh = (z[i] - mean[j]) * invstd[j];
                        let y = gamma[j] * xh + beta[j];
                        let v = if y > 0.0 && y < 6.0 { d[i] } else { 0.0 };
                        let dz = (g[j] * (v - md[j] - xh * mdx[j])) as f64;
                        for c in 0..k {
                            wg[j * k + c] += dz * input[r * k + c] as f64;
                            dx[r * k + c] += dz * w[j * k + c] as f64;
                        }
                    }
                }
                let norm = NormBack {
                    z: &z,
                    cols: Cols {
                        mean: &mean,
                        invstd: &invstd,
                        gamma: &gamma,
                        beta: &beta,
                    },
                    mask: true,
                    back: BackCols {
                        g: &g,
                        md: &md,
                        mdx: &mdx,
                    },
                };
                for need_dx in [true, false] {
                    let (got_wg, got_dx) = pointwise_back(d.clone(), norm, p, need_dx);
                    let scale = wg.iter().fold(0f64, |m, v| m.max(v.abs()));
                    assert_eq!(got_wg.len(), n * k);
                    for (i, (a, b)) in got_wg.iter().zip(&wg).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4 * scale,
                            "{what}: weight gradient {i}: {a} vs {b}"
                        );
                    }
                    if need_dx {
                        assert_eq!(got_dx.len(), rows * k);
                        for (i, (a, b)) in got_dx.iter().zip(&dx).enumerate() {
                            assert!(
                                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                                "{what}: input gradient {i}: {a} vs {b}"
                            );
                        }
                    } else {
                        assert!(got_dx.is_empty());
                    }
                }
            }
        }
    }
}
