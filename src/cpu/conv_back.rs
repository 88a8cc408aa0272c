//! The training pass's backward through a convolution and the BatchNorm after it, once the
//! BatchNorm's column sums are known: the BatchNorm's second half (`dz = g·(v − md − x̂·mdx)`, see
//! [`crate::cpu::norm`]) fused with the convolution's gradients, so that `dz` never goes to memory
//! on the large early layers.
//!
//! - A 1×1 convolution ([`pointwise_back`]) with enough rows runs in parts of rows: each part's
//!   `dz` is computed into a scratch buffer that stays in the core's L2, then its share of the
//!   weight gradient (`dzᵀ·x`) and its rows of the input gradient (`dz·w`) are two single-threaded
//!   products over it. The parts depend on the shape alone and their weight-gradient sums are added
//!   in part order, so the result does not depend on the number of threads. Layers with few rows
//!   (the deep 4×4 ones) run the BatchNorm pass and the `gemm` crate's threaded products instead.
//! - A depthwise convolution ([`depthwise_back`]) runs per image: the image's `dz` into scratch,
//!   then [`dw_back_one`].

use crate::cpu::depthwise_back::{DwBack, dw_back_one};
use crate::cpu::gemm::{gemm_rm, gemm_uninit, matmul_nn, matmul_tn};
use crate::cpu::norm::{BackCols, Cols, norm_back, norm_back_into};
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

/// A 1×1 convolution's operands: its input `x` (`[rows][k]`) and weights `w` (`[n][k]`).
#[derive(Clone, Copy)]
pub struct Pointwise<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub rows: usize,
    pub n: usize,
    pub k: usize,
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
    let Pointwise { x, w, rows, n, k } = p;
    assert!(d.len() == rows * n && norm.z.len() == d.len() && x.len() >= rows * k);
    let part = part_rows(n);
    if rows < 4 * part {
        let mut d = d;
        norm_back(&mut d, norm.z, n, norm.cols, norm.mask, norm.back);
        let wg = matmul_tn(&d, rows, n, x, k);
        let dx = if need_dx {
            matmul_nn(&d, rows, n, w, k)
        } else {
            Vec::new()
        };
        pool::give(d);
        return (wg, dx);
    }
    let job = |i: usize, scratch: &mut Vec<f32>, dx: Option<&mut [MaybeUninit<f32>]>| {
        let r0 = i * part;
        let r = part.min(rows - r0);
        scratch.resize(r * n, 0.0);
        let dz = &mut scratch[..r * n];
        let (zp, dp) = (&norm.z[r0 * n..][..r * n], &d[r0 * n..][..r * n]);
        norm_back_into(dp, zp, dz, n, norm.cols, norm.mask, norm.back);
        let mut g = vec![0f32; n * k];
        let xp = &x[r0 * k..][..r * k];
        gemm_rm(
            &mut g,
            [n, k, r],
            dz,
            [1, n as isize],
            xp,
            [k as isize, 1],
            false,
            false,
        );
        if let Some(dx) = dx {
            gemm_uninit(dx, [r, k, n], dz, [n as isize, 1], w, [k as isize, 1]);
        }
        g
    };
    let parts = rows.div_ceil(part);
    let mut dx = pool::take(if need_dx { rows * k } else { 0 });
    let sums: Vec<Vec<f32>> = if need_dx {
        dx.spare_capacity_mut()[..rows * k]
            .par_chunks_mut(part * k)
            .enumerate()
            .map_init(Vec::new, |s, (i, o)| job(i, s, Some(o)))
            .collect()
    } else {
        (0..parts)
            .into_par_iter()
            .map_init(Vec::new, |s, i| job(i, s, None))
            .collect()
    };
    if need_dx {
        // SAFETY: every part's product wrote its `r·k` floats, and the parts cover all `rows`.
        unsafe { dx.set_len(rows * k) };
    }
    pool::give(d);
    let mut sums = sums.into_iter();
    let mut wg = sums.next().expect("at least four parts");
    for s in sums {
        wg.iter_mut().zip(s).for_each(|(a, b)| *a += b);
    }
    (wg, dx)
}

/// A depthwise convolution's shape and tap-major weights `[k·k][c]`, over `n` images `[h][h][c]` →
/// `[ho][ho][c]`.
#[derive(Clone, Copy)]
pub struct Depthwise<'a> {
    pub x: &'a [f32],
    pub wt: &'a [f32],
    pub n: usize,
    pub h: usize,
    pub ho: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
}

/// The gradients of a depthwise convolution followed by BatchNorm, from `d`, the gradient at the
/// BatchNorm's output (`[n][ho][ho][c]`, before the ReLU6 mask): the input gradient (when `need_dx`,
/// else empty) and the tap-major weight gradient, threaded over images with per-task weight sums.
/// `d` goes back to the buffer pool.
pub fn depthwise_back(
    d: Vec<f32>,
    norm: NormBack,
    a: Depthwise,
    need_dx: bool,
) -> (Vec<f32>, Vec<f32>) {
    let Depthwise {
        x, n, h, ho, c, k, ..
    } = a;
    let per_in = h * h * c;
    let per_out = ho * ho * c;
    assert!(d.len() == n * per_out && norm.z.len() == d.len() && x.len() >= n * per_in);
    let len = if need_dx { n * per_in } else { 0 };
    let mut dx = pool::take(len);
    let job = |img: usize, dxi: &mut [MaybeUninit<f32>], dw: &mut [f32], dz: &mut Vec<f32>| {
        dz.resize(per_out, 0.0);
        let (dp, zp) = (
            &d[img * per_out..][..per_out],
            &norm.z[img * per_out..][..per_out],
        );
        norm_back_into(dp, zp, dz, c, norm.cols, norm.mask, norm.back);
        let b = DwBack {
            x: &x[img * per_in..(img + 1) * per_in],
            dz,
            h,
            ho,
            c,
            k,
            stride: a.stride,
            wt: a.wt,
        };
        dw_back_one(&b, dxi, dw);
    };
    let zero = || (vec![0f32; k * k * c], Vec::new());
    let add = |(mut a, s): (Vec<f32>, Vec<f32>), (b, _): (Vec<f32>, Vec<f32>)| {
        a.iter_mut().zip(b).for_each(|(p, q)| *p += q);
        (a, s)
    };
    let (dw, _) = if need_dx && len > 0 {
        let dw = dx.spare_capacity_mut()[..len]
            .par_chunks_mut(per_in)
            .enumerate()
            .fold(zero, |(mut dw, mut s), (img, dxi)| {
                job(img, dxi, &mut dw, &mut s);
                (dw, s)
            })
            .reduce(zero, add);
        // SAFETY: `dw_back_one` wrote every float of every image's part (the chunks cover them).
        unsafe { dx.set_len(len) };
        dw
    } else {
        (0..n)
            .into_par_iter()
            .fold(zero, |(mut dw, mut s), img| {
                job(img, &mut [], &mut dw, &mut s);
                (dw, s)
            })
            .reduce(zero, add)
    };
    pool::give(d);
    (dx, dw)
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

    /// Both paths of [`pointwise_back`] (parts, and the plain one for few rows), with and without
    /// the input gradient, against an f64 reference of dz = g·(v − md − x̂·mdx), dzᵀ·x and dz·w.
    #[test]
    fn pointwise_back_matches_an_f64_reference_in_parts_and_whole() {
        let (n, k) = (96, 24);
        let part = part_rows(n);
        let mean: Vec<f32> = noise(n, 1).iter().map(|v| v * 0.1).collect();
        let invstd: Vec<f32> = noise(n, 2).iter().map(|v| 1.5 + v).collect();
        let gamma: Vec<f32> = noise(n, 3).iter().map(|v| 3.0 * v).collect();
        let beta: Vec<f32> = noise(n, 4).iter().map(|v| 1.0 + v).collect();
        let (g, md, mdx) = (noise(n, 5), noise(n, 6), noise(n, 7));
        let w = noise(n * k, 8);
        // 4 parts and a partial fifth; then fewer rows than four parts (the plain path).
        for rows in [4 * part + 77, 3 * part] {
            let (d, z, x) = (noise(rows * n, 9), noise(rows * n, 10), noise(rows * k, 11));
            let (mut wg, mut dx) = (vec![0f64; n * k], vec![0f64; rows * k]);
            for r in 0..rows {
                for j in 0..n {
                    let i = r * n + j;
                    let xh = (z[i] - mean[j]) * invstd[j];
                    let y = gamma[j] * xh + beta[j];
                    let v = if y > 0.0 && y < 6.0 { d[i] } else { 0.0 };
                    let dz = (g[j] * (v - md[j] - xh * mdx[j])) as f64;
                    for c in 0..k {
                        wg[j * k + c] += dz * x[r * k + c] as f64;
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
            let p = Pointwise {
                x: &x,
                w: &w,
                rows,
                n,
                k,
            };
            for need_dx in [true, false] {
                let (got_wg, got_dx) = pointwise_back(d.clone(), norm, p, need_dx);
                let scale = wg.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (i, (a, b)) in got_wg.iter().zip(&wg).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4 * scale,
                        "rows {rows}: weight gradient {i}: {a} vs {b}"
                    );
                }
                assert_eq!(got_wg.len(), n * k);
                if need_dx {
                    assert_eq!(got_dx.len(), rows * k);
                    for (i, (a, b)) in got_dx.iter().zip(&dx).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "rows {rows}: input gradient {i}: {a} vs {b}"
                        );
                    }
                } else {
                    assert!(got_dx.is_empty());
                }
            }
        }
    }
}
