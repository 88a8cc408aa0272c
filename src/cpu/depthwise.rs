//! Depthwise convolution kernels, channels-last with tap-major weights `[k·k][c]`: the forward pass
//! (bias and ReLU6 fused) and the backward pass of one image.

use crate::cpu::simd::{madd, multiversion};

pub struct DwArgs<'a> {
    pub x: &'a [f32],
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    /// Tap-major weights `[k·k][c]`.
    pub wt: &'a [f32],
    pub bias: &'a [f32],
    /// Clamp the outputs to [0, 6] (ReLU6).
    pub relu6: bool,
}

multiversion!(
/// Depthwise convolution of one `[h][w][c]` image into `[ho][wo][c]` (padding k/2), with the CPU's
/// widest vector instructions.
pub fn depthwise => dw_generic::<FMA>(a: &DwArgs, out: &mut [f32]));

/// One block of `CB` channels starting at `c0` for output pixel (oy, ox).
#[inline(always)]
fn dw_pixel<const CB: usize, const FMA: bool>(
    a: &DwArgs,
    c0: usize,
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
    iy0: isize,
    ix0: isize,
    out: &mut [f32],
) {
    let c = a.c;
    let mut acc = [0f32; CB];
    acc.copy_from_slice(&a.bias[c0..c0 + CB]);
    for dy in ky {
        let iy = (iy0 + dy as isize) as usize;
        for dx in kx.clone() {
            let ix = (ix0 + dx as isize) as usize;
            let src = &a.x[(iy * a.w + ix) * c + c0..][..CB];
            let wr = &a.wt[(dy * a.k + dx) * c + c0..][..CB];
            for t in 0..CB {
                acc[t] = madd::<FMA>(acc[t], src[t], wr[t]);
            }
        }
    }
    let o = &mut out[..CB];
    if a.relu6 {
        for t in 0..CB {
            o[t] = acc[t].clamp(0.0, 6.0);
        }
    } else {
        o.copy_from_slice(&acc);
    }
}

#[inline(always)]
fn dw_generic<const FMA: bool>(a: &DwArgs, out: &mut [f32]) {
    let (k, s, c) = (a.k, a.stride, a.c);
    let p = (k / 2) as isize;
    let ho = (a.h + 2 * (k / 2) - k) / s + 1;
    let wo = (a.w + 2 * (k / 2) - k) / s + 1;
    let taps = |o: usize, side: usize| {
        let i0 = (o * s) as isize - p;
        let lo = (-i0).max(0) as usize;
        let hi = ((side as isize - i0).min(k as isize)).max(0) as usize;
        (i0, lo..hi)
    };
    for oy in 0..ho {
        let (iy0, ky) = taps(oy, a.h);
        for ox in 0..wo {
            let (ix0, kx) = taps(ox, a.w);
            let o = &mut out[(oy * wo + ox) * c..(oy * wo + ox + 1) * c];
            let mut c0 = 0;
            while c0 + 32 <= c {
                dw_pixel::<32, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 32;
            }
            while c0 + 8 <= c {
                dw_pixel::<8, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 8;
            }
            while c0 < c {
                dw_pixel::<1, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 1;
            }
        }
    }
}

/// One image's depthwise backward: its input `[h][h][c]`, the output gradient `[ho][ho][c]`, the
/// tap-major weights.
pub struct DwBack<'a> {
    pub x: &'a [f32],
    pub dz: &'a [f32],
    pub h: usize,
    pub ho: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub wt: &'a [f32],
}

multiversion!(pub fn dw_back_one => dw_back::<FMA>(a: &DwBack, dx: &mut [f32], dw: &mut [f32]));

/// Adds one image's weight gradient to `dw` and (unless `dx` is empty) writes its input gradient.
#[inline(always)]
fn dw_back<const FMA: bool>(a: &DwBack, dx: &mut [f32], dw: &mut [f32]) {
    let (k, s, c, h) = (a.k, a.stride, a.c, a.h);
    let p = (k / 2) as isize;
    let need_dx = !dx.is_empty();
    for oy in 0..a.ho {
        for ox in 0..a.ho {
            let g = &a.dz[(oy * a.ho + ox) * c..][..c];
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - p;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * s + kx) as isize - p;
                    if ix < 0 || ix >= h as isize {
                        continue;
                    }
                    let off = (iy as usize * h + ix as usize) * c;
                    let tap = (ky * k + kx) * c;
                    let xin = &a.x[off..off + c];
                    let dwr = &mut dw[tap..tap + c];
                    for j in 0..c {
                        dwr[j] = madd::<FMA>(dwr[j], g[j], xin[j]);
                    }
                    if need_dx {
                        let wr = &a.wt[tap..tap + c];
                        let dxr = &mut dx[off..off + c];
                        for j in 0..c {
                            dxr[j] = madd::<FMA>(dxr[j], g[j], wr[j]);
                        }
                    }
                }
            }
        }
    }
}
