//! Depthwise convolution forward kernels, channels-last with tap-major weights `[k·k][c]` (bias and
//! ReLU6 fused). The backward pass is in [`crate::cpu::depthwise_back`].

use crate::cpu::simd::{madd, multiversion};
use std::ops::Range;

pub struct DwArgs<'a> {
    /// Input rows `y0..` of the `[h][w][c]` image (all rows from `y0` that the requested output
    /// rows read; `y0` is 0 for a whole image).
    pub x: &'a [f32],
    /// The image row held at `x`'s first row: a band of rows computed just before (the engine's
    /// fused blocks). Padding still follows the whole image's `h`.
    pub y0: usize,
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

/// Depthwise convolution of one `[h][w][c]` image into `[ho][wo][c]` (padding k/2), with the CPU's
/// widest vector instructions: with 3×3 or 5×5 kernels, the register-blocked kernel of [`wide`] on
/// AVX-512 (channels in sixteens) or AVX2 + FMA (in eights); otherwise the portable one.
pub fn depthwise(a: &DwArgs, out: &mut [f32]) {
    depthwise_rows(a, 0..out_rows(a), out)
}

/// Output rows of `a`'s convolution.
pub fn out_rows(a: &DwArgs) -> usize {
    (a.h + 2 * (a.k / 2) - a.k) / a.stride + 1
}

/// Output rows `rows` only, into `out` (which starts at row `rows.start`): parts of one image on
/// several threads. Each pixel is computed exactly as [`depthwise`] computes it.
pub fn depthwise_rows(a: &DwArgs, rows: Range<usize>, out: &mut [f32]) {
    let rows = rows.start..rows.end.min(out_rows(a));
    #[cfg(target_arch = "x86_64")]
    if a.k == 3 || a.k == 5 {
        if a.c.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the kernel reads and writes inside the slices (checked).
            unsafe { wide::depthwise16(a, rows, out) };
            return;
        }
        if a.c.is_multiple_of(8) && crate::cpu::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; as above.
            unsafe { wide::depthwise8(a, rows, out) };
            return;
        }
    }
    depthwise_rows_portable(a, rows, out)
}

/// The portable depthwise kernel (any k and c): per output pixel, every channel block over the taps.
pub fn depthwise_portable(a: &DwArgs, out: &mut [f32]) {
    depthwise_rows_portable(a, 0..out_rows(a), out)
}

multiversion!(
fn depthwise_rows_portable => dw_generic::<FMA>(a: &DwArgs, rows: Range<usize>, out: &mut [f32]));

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
            let src = &a.x[((iy - a.y0) * a.w + ix) * c + c0..][..CB];
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
fn dw_generic<const FMA: bool>(a: &DwArgs, rows: Range<usize>, out: &mut [f32]) {
    let (k, s, c) = (a.k, a.stride, a.c);
    let p = (k / 2) as isize;
    let wo = (a.w + 2 * (k / 2) - k) / s + 1;
    let r0 = rows.start;
    let taps = |o: usize, side: usize| {
        let i0 = (o * s) as isize - p;
        let lo = (-i0).max(0) as usize;
        let hi = ((side as isize - i0).min(k as isize)).max(0) as usize;
        (i0, lo..hi)
    };
    for oy in rows {
        let (iy0, ky) = taps(oy, a.h);
        for ox in 0..wo {
            let (ix0, kx) = taps(ox, a.w);
            let at = (oy - r0) * wo + ox;
            let o = &mut out[at * c..(at + 1) * c];
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

/// Depthwise forward in vectors of [`Simd::LANES`] channels (AVX-512's 16 or AVX2's 8): for one
/// output row and one vector of channels, the k×k weight vectors are loaded once (in registers on
/// AVX-512; AVX2's 16 registers hold a 3×3 kernel's) while the row is swept four pixels at a time
/// (four independent accumulators), so each tap costs one load and one fused multiply-add; the
/// portable kernel reloads every weight for every pixel. Border pixels take the same taps through
/// a bounds-checked loop.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::DwArgs;
    use crate::cpu::simd::{F32x8, F32x16, Simd};
    use std::ops::Range;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn depthwise16(a: &DwArgs, oy: Range<usize>, out: &mut [f32]) {
        // SAFETY: the CPU has AVX-512F (the caller's promise).
        unsafe { depthwise::<F32x16>(a, oy, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn depthwise8(a: &DwArgs, oy: Range<usize>, out: &mut [f32]) {
        // SAFETY: the CPU has AVX2 and FMA (the caller's promise).
        unsafe { depthwise::<F32x8>(a, oy, out) }
    }

    #[inline(always)]
    unsafe fn depthwise<V: Simd>(a: &DwArgs, oy: Range<usize>, out: &mut [f32]) {
        let wo = (a.w + 2 * (a.k / 2) - a.k) / a.stride + 1;
        assert!(out.len() >= oy.len() * wo * a.c);
        if !oy.is_empty() {
            // The input rows the output rows read: from the first one's top tap (or row 0) to the
            // last one's bottom tap (or the last row).
            let top = (oy.start * a.stride).saturating_sub(a.k / 2);
            let bottom = ((oy.end - 1) * a.stride + a.k - a.k / 2).min(a.h);
            assert!(top >= a.y0 && a.x.len() >= (bottom - a.y0) * a.w * a.c);
        }
        assert!(a.wt.len() >= a.k * a.k * a.c && a.bias.len() >= a.c);
        // SAFETY (all calls): as asserted, every pixel and tap index stays inside the slices.
        unsafe {
            match (a.k, a.stride) {
                (3, 1) => rows::<V, 3, 1>(a, out, oy.clone(), wo),
                (3, 2) => rows::<V, 3, 2>(a, out, oy.clone(), wo),
                (5, 1) => rows::<V, 5, 1>(a, out, oy.clone(), wo),
                (5, 2) => rows::<V, 5, 2>(a, out, oy.clone(), wo),
                _ => unreachable!("dispatched for k 3 or 5 only"),
            }
        }
    }

    #[inline(always)]
    unsafe fn rows<V: Simd, const K: usize, const S: usize>(
        a: &DwArgs,
        out: &mut [f32],
        rows: Range<usize>,
        wo: usize,
    ) {
        let (c, p) = (a.c, (K / 2) as isize);
        // Output columns whose taps all fall inside the image: ox·S − p ≥ 0 and ox·S − p + K ≤ w.
        let first = (p as usize).div_ceil(S);
        let last = if a.w + (p as usize) >= K {
            ((a.w + p as usize - K) / S + 1).min(wo)
        } else {
            0
        };
        unsafe {
            let zero = V::splat(0.0);
            let x = a.x.as_ptr();
            let o = out.as_mut_ptr();
            let r0 = rows.start;
            for oy in rows {
                let iy0 = (oy * S) as isize - p;
                let lo = (-iy0).max(0) as usize;
                let hi = ((a.h as isize - iy0).min(K as isize)).max(0) as usize;
                for c0 in (0..c).step_by(V::LANES) {
                    let mut w = [zero; 25];
                    for (t, wv) in w.iter_mut().enumerate().take(K * K) {
                        *wv = V::load(a.wt.as_ptr().add(t * c + c0));
                    }
                    let bias = V::load(a.bias.as_ptr().add(c0));
                    let row = Row {
                        a,
                        oy,
                        r0,
                        wo,
                        iy0,
                        lo,
                        hi,
                        c0,
                        bias,
                    };
                    // Left border columns as one group, then groups of four whose taps are all
                    // inside the image, then the rest (right border) in groups of up to four.
                    let mut ox = first.min(wo);
                    if ox > 0 {
                        group::<V, K, S>(&row, &w, 0, ox, o);
                    }
                    while ox + 4 <= last {
                        let mut acc = [bias; 4];
                        for ky in 0..K {
                            if ky < lo || ky >= hi {
                                continue;
                            }
                            let iy = (iy0 + ky as isize) as usize - a.y0;
                            let xrow = x.add((iy * a.w) * c + c0);
                            for kx in 0..K {
                                let wv = w[ky * K + kx];
                                for (j, av) in acc.iter_mut().enumerate() {
                                    let ix = ((ox + j) * S) as isize - p + kx as isize;
                                    let xv = V::load(xrow.add(ix as usize * c));
                                    *av = V::fmadd(xv, wv, *av);
                                }
                            }
                        }
                        for (j, av) in acc.iter().enumerate() {
                            let at = (oy - r0) * wo + ox + j;
                            fin(a.relu6, *av).store(o.add(at * c + c0));
                        }
                        ox += 4;
                    }
                    while ox < wo {
                        let live = (wo - ox).min(4);
                        group::<V, K, S>(&row, &w, ox, live, o);
                        ox += live;
                    }
                }
            }
        }
    }

    /// One output row's fixed parts for [`group`].
    struct Row<'a, 'b, V> {
        a: &'a DwArgs<'b>,
        oy: usize,
        /// The first output row `o` holds.
        r0: usize,
        wo: usize,
        iy0: isize,
        lo: usize,
        hi: usize,
        c0: usize,
        bias: V,
    }

    #[inline(always)]
    unsafe fn fin<V: Simd>(relu6: bool, v: V) -> V {
        if relu6 {
            // SAFETY: only called from the kernels above, on CPUs with V's instructions.
            unsafe { V::min(V::max(v, V::splat(0.0)), V::splat(6.0)) }
        } else {
            v
        }
    }

    /// Output pixels `ox..ox + live` (at most four) of a row through the bounds-checked taps:
    /// a tap outside the image is skipped, one pixel at a time, so each pixel sums its taps in the
    /// interior loop's order. The pixels' sums are independent chains (a border pixel on its own
    /// would wait on one FMA after another: 5×5 maps of 7 or 14 columns are mostly border).
    #[inline(always)]
    unsafe fn group<V: Simd, const K: usize, const S: usize>(
        r: &Row<V>,
        w: &[V; 25],
        ox: usize,
        live: usize,
        o: *mut f32,
    ) {
        let (a, c) = (r.a, r.a.c);
        let p = (K / 2) as isize;
        let mut acc = [r.bias; 4];
        unsafe {
            for ky in r.lo..r.hi {
                let iy = (r.iy0 + ky as isize) as usize - a.y0;
                let xrow = a.x.as_ptr().add(iy * a.w * c + r.c0);
                for kx in 0..K {
                    let wv = w[ky * K + kx];
                    for (j, av) in acc.iter_mut().enumerate().take(live) {
                        let ix = ((ox + j) * S) as isize - p + kx as isize;
                        if ix < 0 || ix >= a.w as isize {
                            continue;
                        }
                        let xv = V::load(xrow.add(ix as usize * c));
                        *av = V::fmadd(xv, wv, *av);
                    }
                }
            }
            for (j, av) in acc.iter().enumerate().take(live) {
                let at = (r.oy - r.r0) * r.wo + ox + j;
                fin(a.relu6, *av).store(o.add(at * c + r.c0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched kernel (AVX-512 or AVX2 where the CPU has it) against the portable one, for every
    /// kernel size and stride of the network, images from 1×1 to 13×9 and 5×14 (all border cases: fewer
    /// columns than taps, odd sides, rows without an interior), with and without ReLU6.
    #[test]
    fn fast_depthwise_equals_the_portable_one() {
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        };
        for k in [3, 5] {
            for stride in [1, 2] {
                for (h, w) in [
                    (1, 1),
                    (2, 3),
                    (4, 4),
                    (5, 5),
                    (7, 6),
                    (8, 8),
                    (13, 9),
                    (5, 14),
                ] {
                    for c in [8, 16, 24, 48] {
                        let x: Vec<f32> = (0..h * w * c).map(|_| rnd()).collect();
                        let wt: Vec<f32> = (0..k * k * c).map(|_| rnd()).collect();
                        let bias: Vec<f32> = (0..c).map(|_| rnd()).collect();
                        for relu6 in [false, true] {
                            let a = DwArgs {
                                x: &x,
                                y0: 0,
                                h,
                                w,
                                c,
                                k,
                                stride,
                                wt: &wt,
                                bias: &bias,
                                relu6,
                            };
                            let ho = (h + 2 * (k / 2) - k) / stride + 1;
                            let wo = (w + 2 * (k / 2) - k) / stride + 1;
                            let mut fast = vec![f32::NAN; ho * wo * c];
                            let mut slow = vec![f32::NAN; ho * wo * c];
                            depthwise(&a, &mut fast);
                            depthwise_portable(&a, &mut slow);
                            for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                                assert!(
                                    (f - s).abs() <= 1e-5 * (1.0 + s.abs()),
                                    "k{k} s{stride} {h}×{w}×{c} relu6={relu6} at {i}: {f} vs {s}"
                                );
                            }
                            // Any split into two row ranges gives the same bits, both kernels.
                            for cut in 0..=ho {
                                let mut a2 = vec![f32::NAN; ho * wo * c];
                                let mut p2 = vec![f32::NAN; ho * wo * c];
                                let (at, ab) = a2.split_at_mut(cut * wo * c);
                                depthwise_rows(&a, 0..cut, at);
                                depthwise_rows(&a, cut..ho, ab);
                                let (pt, pb) = p2.split_at_mut(cut * wo * c);
                                depthwise_rows_portable(&a, 0..cut, pt);
                                depthwise_rows_portable(&a, cut..ho, pb);
                                let same = |x: &[f32], y: &[f32]| {
                                    x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
                                };
                                assert!(
                                    same(&a2, &fast) && same(&p2, &slow),
                                    "k{k} s{stride} {h}×{w}×{c}: rows cut at {cut}"
                                );
                                // Rows cut.. from a band of the input that starts at the
                                // first row they read (`y0`), as the fused blocks call it.
                                if cut < ho {
                                    let y0 = (cut * stride).saturating_sub(k / 2);
                                    let band = DwArgs {
                                        x: &x[y0 * w * c..],
                                        y0,
                                        ..a
                                    };
                                    let mut fb = vec![f32::NAN; (ho - cut) * wo * c];
                                    let mut pb = fb.clone();
                                    depthwise_rows(&band, cut..ho, &mut fb);
                                    depthwise_rows_portable(&band, cut..ho, &mut pb);
                                    assert!(
                                        same(&fb, &fast[cut * wo * c..])
                                            && same(&pb, &slow[cut * wo * c..]),
                                        "k{k} s{stride} {h}×{w}×{c}: band from row {y0}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
