//! Depthwise convolution backward for one image, channels-last with tap-major weights `[k·k][c]`:
//! the weight gradient (added to a running sum) and the input gradient.
//!
//! On AVX-512 (3×3 or 5×5, channels in sixteens) each gradient has its own register-blocked
//! sweep, [`avx512`]: the weight gradient keeps a 16-channel vector of every tap's sum in registers
//! along an output row (one load per multiply-add, none stored until the row ends), and the input
//! gradient is gathered per input pixel from the output pixels that read it, four pixels at a
//! time, with the tap weights in registers. The portable kernel scatters from each output pixel
//! and loads and stores both sums for every tap.

use crate::cpu::pool::zeroed;
use crate::cpu::simd::{madd, multiversion};
use std::mem::MaybeUninit;

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

multiversion!(pub fn dw_back_portable => dw_back::<FMA>(a: &DwBack, dx: &mut [f32], dw: &mut [f32]));

/// The portable kernel: per output pixel and tap, adds the tap's products to `dw` and (unless `dx`
/// is empty) to `dx`, which must hold zeros.
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

/// Adds one image's weight gradient to `dw` (`[k·k][c]`) and, unless `dx` is empty, writes its input
/// gradient to `dx` (`[h][h][c]`, every value).
pub fn dw_back_one(a: &DwBack, dx: &mut [MaybeUninit<f32>], dw: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if a.c.is_multiple_of(16)
        && (a.k == 3 || a.k == 5)
        && (a.stride == 1 || a.stride == 2)
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        assert!(a.x.len() >= a.h * a.h * a.c && a.dz.len() >= a.ho * a.ho * a.c);
        assert!(a.wt.len() >= a.k * a.k * a.c && dw.len() >= a.k * a.k * a.c);
        assert!(dx.is_empty() || dx.len() >= a.h * a.h * a.c);
        assert!(
            a.ho == (a.h + 2 * (a.k / 2) - a.k) / a.stride + 1,
            "ho does not follow from h"
        );
        // SAFETY: the CPU has AVX-512F; the slices hold the whole images (asserted); the kernel
        // writes every value of `dx` and reads none.
        unsafe { avx512::back(a, dx.as_mut_ptr().cast(), dx.is_empty(), dw) };
        return;
    }
    dw_back_portable(a, zeroed(dx), dw)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::DwBack;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn back(a: &DwBack, dx: *mut f32, no_dx: bool, dw: &mut [f32]) {
        // SAFETY (all calls): the caller checked every slice against the image's shape.
        unsafe {
            match (a.k, a.stride) {
                (3, 1) => both::<3, 1>(a, dx, no_dx, dw),
                (3, 2) => both::<3, 2>(a, dx, no_dx, dw),
                (5, 1) => both::<5, 1>(a, dx, no_dx, dw),
                (5, 2) => both::<5, 2>(a, dx, no_dx, dw),
                _ => unreachable!("dispatched for k 3 or 5, stride 1 or 2 only"),
            }
        }
    }

    #[inline(always)]
    unsafe fn both<const K: usize, const S: usize>(
        a: &DwBack,
        dx: *mut f32,
        no_dx: bool,
        dw: &mut [f32],
    ) {
        unsafe {
            weights::<K, S>(a, dw.as_mut_ptr());
            if !no_dx {
                input::<K, S>(a, dx);
            }
        }
    }

    /// `dw[tap] += Σ_o g[o]·x[o·S − p + tap]`: per output row and 16 channels, every tap's sum in
    /// a register across the row; pixels whose taps all fall inside the image skip the bounds tests.
    #[inline(always)]
    unsafe fn weights<const K: usize, const S: usize>(a: &DwBack, dw: *mut f32) {
        let (c, p) = (a.c, K / 2);
        // Output columns (and rows) whose taps all fall inside the image: o·S ≥ p, o·S − p + K ≤ h.
        let first = p.div_ceil(S).min(a.ho);
        let last = if a.h + p >= K {
            ((a.h + p - K) / S + 1).min(a.ho).max(first)
        } else {
            first
        };
        unsafe {
            for oy in 0..a.ho {
                let inner = (first..last).contains(&oy);
                for c0 in (0..c).step_by(16) {
                    let mut acc = [_mm512_setzero_ps(); 25];
                    let at = Px { a, oy, c0 };
                    if inner {
                        for ox in 0..first {
                            wpix::<K, S, true>(&at, ox, &mut acc);
                        }
                        for ox in first..last {
                            wpix::<K, S, false>(&at, ox, &mut acc);
                        }
                        for ox in last..a.ho {
                            wpix::<K, S, true>(&at, ox, &mut acc);
                        }
                    } else {
                        for ox in 0..a.ho {
                            wpix::<K, S, true>(&at, ox, &mut acc);
                        }
                    }
                    for (t, av) in acc.iter().enumerate().take(K * K) {
                        let d = dw.add(t * c + c0);
                        _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), *av));
                    }
                }
            }
        }
    }

    /// One output row's 16 channels.
    struct Px<'a, 'b> {
        a: &'a DwBack<'b>,
        oy: usize,
        c0: usize,
    }

    /// Output pixel `ox`'s products into the taps' sums; `CHECK`: skip taps outside the image.
    #[inline(always)]
    unsafe fn wpix<const K: usize, const S: usize, const CHECK: bool>(
        at: &Px,
        ox: usize,
        acc: &mut [__m512; 25],
    ) {
        let (a, c, h, p) = (at.a, at.a.c, at.a.h as isize, (K / 2) as isize);
        unsafe {
            let gv = _mm512_loadu_ps(a.dz.as_ptr().add((at.oy * a.ho + ox) * c + at.c0));
            let (iy0, ix0) = ((at.oy * S) as isize - p, (ox * S) as isize - p);
            for ky in 0..K {
                let iy = iy0 + ky as isize;
                if CHECK && (iy < 0 || iy >= h) {
                    continue;
                }
                let xrow = a.x.as_ptr().add(iy as usize * a.h * c + at.c0);
                for kx in 0..K {
                    let ix = ix0 + kx as isize;
                    if CHECK && (ix < 0 || ix >= h) {
                        continue;
                    }
                    let xv = _mm512_loadu_ps(xrow.add(ix as usize * c));
                    acc[ky * K + kx] = _mm512_fmadd_ps(gv, xv, acc[ky * K + kx]);
                }
            }
        }
    }

    /// `dx[i] = Σ g[o]·w[tap]` over the output pixels `o` and taps with `o·S − p + tap = i`:
    /// per input row and 16 channels, the tap weights in registers, four pixels of one column
    /// phase (`ix mod S`, so the same taps line up) at a time; groups whose taps all land on
    /// output pixels skip the bounds tests.
    #[inline(always)]
    unsafe fn input<const K: usize, const S: usize>(a: &DwBack, dx: *mut f32) {
        let (c, p) = (a.c, K / 2);
        // Input columns i whose taps (of the phase) all land inside the output: i + p − (K − 1) ≥ 0
        // and i + p < ho·S.
        let (lo, hi) = (
            (K - 1).saturating_sub(p),
            (a.ho * S).saturating_sub(p).min(a.h),
        );
        unsafe {
            for iy in 0..a.h {
                // The kernel rows that reach an output row from input row iy.
                let mut rows = [usize::MAX; 5];
                for (ky, r) in rows.iter_mut().enumerate().take(K) {
                    let ny = (iy + p) as isize - ky as isize;
                    if ny >= 0 && (ny as usize).is_multiple_of(S) && ny as usize / S < a.ho {
                        *r = ny as usize / S;
                    }
                }
                for c0 in (0..c).step_by(16) {
                    let mut w = [_mm512_setzero_ps(); 25];
                    for (t, wv) in w.iter_mut().enumerate().take(K * K) {
                        *wv = _mm512_loadu_ps(a.wt.as_ptr().add(t * c + c0));
                    }
                    let at = In { a, iy, c0, rows, w };
                    for phase in 0..S.min(a.h) {
                        let mut ix = phase;
                        while ix < a.h {
                            let live = (a.h - ix).div_ceil(S).min(4);
                            if live == 4 && ix >= lo && ix + 3 * S < hi {
                                group::<K, S, false>(&at, ix, 4, dx);
                            } else {
                                group::<K, S, true>(&at, ix, live, dx);
                            }
                            ix += live * S;
                        }
                    }
                }
            }
        }
    }

    /// One input row's 16 channels: the output row each kernel row reaches (`usize::MAX`: none)
    /// and the taps' weights.
    struct In<'a, 'b> {
        a: &'a DwBack<'b>,
        iy: usize,
        c0: usize,
        rows: [usize; 5],
        w: [__m512; 25],
    }

    /// Input pixels `ix, ix + S, …` (`live` ≤ 4 of them, one column phase); `CHECK`: skip taps that
    /// land outside the output.
    #[inline(always)]
    unsafe fn group<const K: usize, const S: usize, const CHECK: bool>(
        at: &In,
        ix: usize,
        live: usize,
        dx: *mut f32,
    ) {
        let (a, c, p) = (at.a, at.a.c, K / 2);
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
            for ky in 0..K {
                let oy = at.rows[ky];
                if oy == usize::MAX {
                    continue;
                }
                let grow = a.dz.as_ptr().add(oy * a.ho * c + at.c0);
                for kx in 0..K {
                    // Same phase: the tap lines up with an output column for all or none.
                    let nx = (ix + p) as isize - kx as isize;
                    if nx.rem_euclid(S as isize) != 0 {
                        continue;
                    }
                    let wv = at.w[ky * K + kx];
                    for (j, av) in acc.iter_mut().enumerate().take(live) {
                        let nx = nx + (j * S) as isize;
                        if CHECK && (nx < 0 || nx as usize / S >= a.ho) {
                            continue;
                        }
                        let gv = _mm512_loadu_ps(grow.add((nx as usize / S) * c));
                        *av = _mm512_fmadd_ps(gv, wv, *av);
                    }
                }
            }
            for (j, av) in acc.iter().enumerate().take(live) {
                _mm512_storeu_ps(dx.add((at.iy * a.h + ix + j * S) * c + at.c0), *av);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched kernel (AVX-512 where the CPU has it) against the portable one, for every
    /// kernel size and stride of the network and sides from 1 to 13 (maps smaller than the kernel,
    /// odd sides, all-border maps), with and without the input gradient. The dispatched kernel must
    /// write every input-gradient value (its buffer starts as NaN) and add to `dw`.
    #[test]
    fn fast_backward_equals_the_portable_one() {
        let mut seed = 5u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        for k in [3, 5] {
            for stride in [1, 2] {
                for h in [1, 2, 3, 4, 5, 7, 8, 13] {
                    for c in [16, 48] {
                        let ho = (h + 2 * (k / 2) - k) / stride + 1;
                        let x: Vec<f32> = (0..h * h * c).map(|_| rnd()).collect();
                        let dz: Vec<f32> = (0..ho * ho * c).map(|_| rnd()).collect();
                        let wt: Vec<f32> = (0..k * k * c).map(|_| rnd()).collect();
                        let dw0: Vec<f32> = (0..k * k * c).map(|_| rnd()).collect();
                        let a = DwBack {
                            x: &x,
                            dz: &dz,
                            h,
                            ho,
                            c,
                            k,
                            stride,
                            wt: &wt,
                        };
                        for with_dx in [true, false] {
                            let n = if with_dx { h * h * c } else { 0 };
                            let (mut fdx, mut sdx) =
                                (vec![MaybeUninit::new(f32::NAN); n], vec![0f32; n]);
                            let (mut fdw, mut sdw) = (dw0.clone(), dw0.clone());
                            dw_back_one(&a, &mut fdx, &mut fdw);
                            // SAFETY: every element was initialised (NaN, then the kernel's values).
                            let fdx: Vec<f32> =
                                fdx.iter().map(|v| unsafe { v.assume_init() }).collect();
                            dw_back_portable(&a, &mut sdx, &mut sdw);
                            let what = format!("k{k} s{stride} {h}×{h}×{c} dx={with_dx}");
                            for (i, (f, s)) in fdx.iter().zip(&sdx).enumerate() {
                                let ok = (f - s).abs() <= 1e-5 * (1.0 + s.abs());
                                assert!(ok, "{what}: dx[{i}] {f} vs {s}");
                            }
                            for (i, (f, s)) in fdw.iter().zip(&sdw).enumerate() {
                                let ok = (f - s).abs() <= 1e-4 * (1.0 + s.abs());
                                assert!(ok, "{what}: dw[{i}] {f} vs {s}");
                            }
                        }
                    }
                }
            }
        }
    }
}
