//! 1×1 convolutions of channels-last activations for inference: `out[p][n] = Σ_k x[p][k]·W[n][k] +
//! b[n]`, then optionally `+ out[p][n]` (the residual) and ReLU6, in one pass.
//!
//! Why not the `gemm` crate here: its products pack the activation matrix before every call, which
//! cost a quarter of the engine's time at 128 px (perf), and its f32 kernels are AVX2 unless built
//! for x86-v4. Here the weights are packed once, when the engine is built, into panels of 32 output
//! channels (`[k][32]`, zero-padded); the kernel broadcasts each activation straight from its row
//! and multiplies it into two AVX-512 vectors of weights, for 12 pixels at a time (24 accumulators),
//! with the bias, residual and ReLU6 applied before the one store. CPUs with AVX2 and FMA but not
//! AVX-512 run the same panels as halves of 16 channels, 6 pixels at a time (on a Zen 3 core
//! 1.2–2.5× the `gemm` crate's GFLOP/s on Lite0's shapes, `deeprank-bench kernels`); others use
//! the `gemm` crate on the unpacked weights ([`Pointwise::run`] picks at run time).

use crate::cpu::aligned::Aligned;
use crate::cpu::gemm::matmul_acc;
#[cfg(target_arch = "x86_64")]
use crate::cpu::simd::has_avx2_fma;
use std::ops::Range;

/// Output channels per weight panel (two AVX-512 vectors).
const NR: usize = 32;
/// Pixels per kernel call.
const MR: usize = 12;

/// A 1×1 convolution with folded BatchNorm: `[cout][cin]` weights and their packed panels.
pub struct Pointwise {
    /// Row-major `[cout][cin]` (the fallback path's operand).
    w: Vec<f32>,
    /// `ceil(cout/32)` panels of `[cin][32]`, zero beyond `cout`; 64-byte aligned, so every
    /// weight vector the kernel loads is one cache line ([`crate::cpu::aligned`]).
    packed: Aligned,
    /// Bias, zero-padded to a whole panel.
    b: Aligned,
    pub cin: usize,
    pub cout: usize,
}

/// What happens to each output after the product and bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `out = W·x + b`
    Plain,
    /// `out = clamp(W·x + b, 0, 6)`
    Relu6,
    /// `out += W·x + b` (a residual connection)
    Accumulate,
}

impl Pointwise {
    /// `w` is `[cout][cin]` row-major, `b` has `cout` values.
    pub fn new(w: Vec<f32>, b: Vec<f32>, cin: usize, cout: usize) -> Self {
        assert_eq!(w.len(), cin * cout, "weights are not cout × cin");
        assert_eq!(b.len(), cout, "bias is not cout long");
        let panels = cout.div_ceil(NR);
        let mut packed = Aligned::zeroed(panels * cin * NR);
        for n in 0..cout {
            let (panel, lane) = (n / NR, n % NR);
            for k in 0..cin {
                packed[(panel * cin + k) * NR + lane] = w[n * cin + k];
            }
        }
        let mut bp = Aligned::zeroed(panels * NR);
        bp[..cout].copy_from_slice(&b);
        Self {
            w,
            packed,
            b: bp,
            cin,
            cout,
        }
    }

    /// `out[p]` for `pixels` rows of `cin` channels (`x`), `cout` channels per output row.
    pub fn run(&self, x: &[f32], pixels: usize, out: &mut [f32], epilogue: Epilogue) {
        assert!(x.len() >= pixels * self.cin && out.len() >= pixels * self.cout);
        if Self::splits_by_panels() {
            // SAFETY: `out` holds pixels × cout floats (asserted), borrowed mutably for the call.
            unsafe { self.run_panels(x, pixels, out.as_mut_ptr(), epilogue, 0..self.panels()) };
            return;
        }
        self.run_portable(x, pixels, out, epilogue);
    }

    /// Weight panels of 32 output channels: the units [`Pointwise::run_panels`] splits by.
    pub fn panels(&self) -> usize {
        self.cout.div_ceil(NR)
    }

    /// Whether [`Pointwise::run_panels`] can run on this CPU (it needs AVX-512, or AVX2 and FMA).
    pub fn splits_by_panels() -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") || has_avx2_fma() {
            return true;
        }
        false
    }

    /// [`Pointwise::run`] for output channels `32·panels.start ..` up to `32·panels.end` only, so
    /// that threads can share one product by columns (a lone image's layers with few pixels).
    /// Each value is computed exactly as [`Pointwise::run`] computes it.
    ///
    /// # Safety
    /// `out` points to `pixels × cout` writable floats that nothing else reads or writes in these
    /// columns meanwhile (other threads may write other panels' columns of the same rows), and
    /// [`Pointwise::splits_by_panels`] is true.
    pub unsafe fn run_panels(
        &self,
        x: &[f32],
        pixels: usize,
        out: *mut f32,
        epilogue: Epilogue,
        panels: Range<usize>,
    ) {
        assert!(x.len() >= pixels * self.cin && panels.end <= self.panels());
        assert!(Self::splits_by_panels(), "run_panels needs AVX-512 or AVX2");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is there; `out` as the caller promises.
            unsafe { avx512::run(self, x, pixels, out, epilogue, panels) };
        } else {
            // SAFETY: AVX2 and FMA are there (asserted); `out` as the caller promises.
            unsafe { avx2::run(self, x, pixels, out, epilogue, panels) };
        }
    }

    /// The same through the `gemm` crate (CPUs without AVX-512, and the tests' reference).
    pub fn run_portable(&self, x: &[f32], pixels: usize, out: &mut [f32], epilogue: Epilogue) {
        let out = &mut out[..pixels * self.cout];
        let bias = &self.b[..self.cout];
        for row in out.chunks_exact_mut(self.cout) {
            if epilogue == Epilogue::Accumulate {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            } else {
                row.copy_from_slice(bias);
            }
        }
        matmul_acc(x, pixels, self.cin, &self.w, self.cout, out);
        if epilogue == Epilogue::Relu6 {
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Epilogue, MR, NR, Pointwise};
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(
        pw: &Pointwise,
        x: &[f32],
        pixels: usize,
        out: *mut f32,
        epilogue: Epilogue,
        panels: Range<usize>,
    ) {
        let (cin, cout) = (pw.cin, pw.cout);
        for panel in panels {
            let n0 = panel * NR;
            let lanes = (cout - n0).min(NR);
            let wp = &pw.packed[panel * cin * NR..(panel + 1) * cin * NR];
            let bias = &pw.b[n0..n0 + NR];
            let mut p = 0;
            while p + MR <= pixels {
                // SAFETY (all calls): rows p..p+R of x and out exist (asserted by the caller).
                unsafe { tile::<MR>(x, cin, wp, bias, out, cout, p, n0, lanes, epilogue) };
                p += MR;
            }
            while p + 4 <= pixels {
                unsafe { tile::<4>(x, cin, wp, bias, out, cout, p, n0, lanes, epilogue) };
                p += 4;
            }
            while p < pixels {
                unsafe { tile::<1>(x, cin, wp, bias, out, cout, p, n0, lanes, epilogue) };
                p += 1;
            }
        }
    }

    /// Masks of the two output vectors for a panel with `lanes` live channels.
    #[inline(always)]
    fn masks(lanes: usize) -> [__mmask16; 2] {
        let lo = if lanes >= 16 {
            0xffff
        } else {
            (1u32 << lanes) - 1
        };
        let hi = if lanes >= 32 {
            0xffff
        } else if lanes > 16 {
            (1u32 << (lanes - 16)) - 1
        } else {
            0
        };
        [lo as __mmask16, hi as __mmask16]
    }

    /// Pixels `p..p+R`, channels `n0..n0+lanes`: R × 32 accumulators over all of `cin`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        x: &[f32],
        cin: usize,
        wp: &[f32],
        bias: &[f32],
        out: *mut f32,
        cout: usize,
        p: usize,
        n0: usize,
        lanes: usize,
        epilogue: Epilogue,
    ) {
        unsafe {
            let b0 = _mm512_loadu_ps(bias.as_ptr());
            let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
            let mut acc = [[b0, b1]; R];
            let xr = x.as_ptr().add(p * cin);
            let w = wp.as_ptr();
            for k in 0..cin {
                let w0 = _mm512_loadu_ps(w.add(k * NR));
                let w1 = _mm512_loadu_ps(w.add(k * NR + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*xr.add(r * cin + k));
                    a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
                }
            }
            let [m0, m1] = masks(lanes);
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            for (r, a) in acc.iter().enumerate() {
                let o = out.add((p + r) * cout + n0);
                for (v, (m, off)) in a.iter().zip([(m0, 0), (m1, 16)]) {
                    if m == 0 {
                        continue;
                    }
                    let mut v = *v;
                    match epilogue {
                        Epilogue::Plain => {}
                        Epilogue::Relu6 => v = _mm512_min_ps(_mm512_max_ps(v, zero), six),
                        Epilogue::Accumulate => {
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, o.add(off)))
                        }
                    }
                    _mm512_mask_storeu_ps(o.add(off), m, v);
                }
            }
        }
    }
}

/// The AVX2 + FMA kernel (CPUs without AVX-512): the same packed panels, each as two halves of 16
/// output channels (two 8-lane vectors), 6 pixels at a time (12 accumulators, which with two
/// weight vectors and a broadcast fit the 16 registers), with the same epilogue in the same order.
/// A half with at most 8 live channels (the last of 24 or 40) runs one vector wide, 12 pixels at
/// a time, instead of multiplying a vector of padding.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Epilogue, NR, Pointwise};
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(
        pw: &Pointwise,
        x: &[f32],
        pixels: usize,
        out: *mut f32,
        epilogue: Epilogue,
        panels: Range<usize>,
    ) {
        let (cin, cout) = (pw.cin, pw.cout);
        for panel in panels {
            for half in 0..2 {
                let n0 = panel * NR + half * 16;
                if n0 >= cout {
                    break;
                }
                // The next half-panel's weights (the other half of these rows' lines, or the
                // next panel's), fetched while the first tile runs: between two images the other
                // layers evict a layer's weights from L2, and a tile waiting on L3 for each row
                // ran at half speed (`deeprank-bench kernels`, weights from L3).
                let next = if half == 0 {
                    panel * cin * NR + 16
                } else {
                    (panel + 1) * cin * NR
                };
                let t = Half {
                    x: x.as_ptr(),
                    cin,
                    w: pw.packed[panel * cin * NR + half * 16..].as_ptr(),
                    // None after the layer's last half-panel.
                    next: match pw.packed.get(next..) {
                        Some(rest) if !rest.is_empty() => rest.as_ptr(),
                        _ => std::ptr::null(),
                    },
                    bias: pw.b[n0..n0 + 16].as_ptr(),
                    out,
                    cout,
                    n0,
                    lanes: (cout - n0).min(16),
                    epilogue,
                };
                // SAFETY: rows 0..pixels of x and out exist (asserted by the caller), the half's
                // weights and bias are within `packed` and `b`, `next` is only prefetched.
                unsafe {
                    if t.lanes > 8 {
                        strip::<2, 6>(&t, pixels)
                    } else {
                        strip::<1, 12>(&t, pixels)
                    }
                }
            }
        }
    }

    /// One half-panel's operands: 16 output channels from `n0`, `lanes` of them live; `w` is
    /// its first weight, rows of the panel `NR` apart.
    struct Half {
        x: *const f32,
        cin: usize,
        w: *const f32,
        /// The next half-panel's first weight, only ever prefetched; null after the last.
        next: *const f32,
        bias: *const f32,
        out: *mut f32,
        cout: usize,
        n0: usize,
        lanes: usize,
        epilogue: Epilogue,
    }

    /// Every pixel of one half-panel, `V` vectors wide: tiles of `M` pixels (the first also
    /// prefetching the next half-panel), then of 4, then 1.
    #[inline(always)]
    unsafe fn strip<const V: usize, const M: usize>(t: &Half, pixels: usize) {
        let mut p = 0;
        // SAFETY (all calls): rows p..p+R < pixels, as the caller promises for 0..pixels.
        if p + M <= pixels {
            unsafe { tile::<M, V, true>(t, p) };
            p += M;
        }
        while p + M <= pixels {
            unsafe { tile::<M, V, false>(t, p) };
            p += M;
        }
        while p + 4 <= pixels {
            unsafe { tile::<4, V, false>(t, p) };
            p += 4;
        }
        while p < pixels {
            unsafe { tile::<1, V, false>(t, p) };
            p += 1;
        }
    }

    /// The store mask of 8 lanes of which the first `live` are written.
    #[inline(always)]
    fn mask(live: usize) -> __m256i {
        let i = |l: usize| if l < live { -1 } else { 0 };
        // SAFETY: a plain vector constructor (AVX is enabled in every caller).
        unsafe { _mm256_setr_epi32(i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7)) }
    }

    /// Pixels `p..p+R`, the half's first `8·V` channels: R × V accumulators over all of `cin`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize, const PREFETCH: bool>(t: &Half, p: usize) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            for a in acc.iter_mut() {
                for (j, v) in a.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(t.bias.add(8 * j));
                }
            }
            let (cin, w) = (t.cin, t.w);
            let xr = t.x.add(p * cin);
            for k in 0..cin {
                if PREFETCH && !t.next.is_null() {
                    _mm_prefetch::<_MM_HINT_T0>(t.next.wrapping_add(k * NR) as *const i8);
                }
                let mut wk = [_mm256_setzero_ps(); V];
                for (j, v) in wk.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(k * NR + 8 * j));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = _mm256_broadcast_ss(&*xr.add(r * cin + k));
                    for (a, w) in a.iter_mut().zip(&wk) {
                        *a = _mm256_fmadd_ps(xb, *w, *a);
                    }
                }
            }
            let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
            let live = [t.lanes.min(8), t.lanes.saturating_sub(8)];
            let masks = live.map(mask);
            for (r, a) in acc.iter().enumerate() {
                let o = t.out.add((p + r) * t.cout + t.n0);
                for (j, v) in a.iter().enumerate() {
                    let (o, live, m) = (o.add(8 * j), live[j], masks[j]);
                    if live == 0 {
                        continue;
                    }
                    let mut v = *v;
                    match t.epilogue {
                        Epilogue::Plain => {}
                        Epilogue::Relu6 => v = _mm256_min_ps(_mm256_max_ps(v, zero), six),
                        Epilogue::Accumulate if live == 8 => {
                            v = _mm256_add_ps(v, _mm256_loadu_ps(o))
                        }
                        Epilogue::Accumulate => v = _mm256_add_ps(v, _mm256_maskload_ps(o, m)),
                    }
                    if live == 8 {
                        _mm256_storeu_ps(o, v);
                    } else {
                        _mm256_maskstore_ps(o, m, v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    /// The packed kernel against a plain triple loop, on every remainder of pixels (12, 6, 4, 1)
    /// and of channels (full panels, 16 + partial, under 16, 8 + partial, 8 or fewer in a
    /// half), with each epilogue.
    #[test]
    fn packed_kernel_equals_the_plain_product() {
        let mut seed = 7;
        for &(pixels, cin, cout) in &[
            (37, 16, 96),
            (17, 24, 40),
            (13, 96, 24),
            (29, 40, 24),
            (1, 5, 7),
            (9, 8, 45),
            (64, 320, 1280),
            (30, 1152, 192),
        ] {
            let w: Vec<f32> = (0..cin * cout).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..cout).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..pixels * cin).map(|_| lcg(&mut seed)).collect();
            let prior: Vec<f32> = (0..pixels * cout).map(|_| lcg(&mut seed)).collect();
            let pw = Pointwise::new(w.clone(), b.clone(), cin, cout);
            // Every weight vector the kernel loads is one cache line.
            assert_eq!(
                pw.packed.as_ptr() as usize % 64,
                0,
                "{cin}→{cout}: panels unaligned"
            );
            for (epi, portable) in [Epilogue::Plain, Epilogue::Relu6, Epilogue::Accumulate]
                .into_iter()
                .flat_map(|e| [(e, false), (e, true)])
            {
                let mut got = prior.clone();
                if portable {
                    pw.run_portable(&x, pixels, &mut got, epi);
                } else {
                    pw.run(&x, pixels, &mut got, epi);
                }
                for p in 0..pixels {
                    for n in 0..cout {
                        let dot: f64 = (0..cin)
                            .map(|k| x[p * cin + k] as f64 * w[n * cin + k] as f64)
                            .sum();
                        let mut want = dot + b[n] as f64;
                        match epi {
                            Epilogue::Plain => {}
                            Epilogue::Relu6 => want = want.clamp(0.0, 6.0),
                            Epilogue::Accumulate => want += prior[p * cout + n] as f64,
                        }
                        let g = got[p * cout + n] as f64;
                        let tol = 1e-5 * (1.0 + (cin as f64).sqrt() * 4.0);
                        assert!(
                            (g - want).abs() <= tol,
                            "{pixels}×{cin}→{cout} {epi:?} portable={portable} p{p} n{n}: {g} vs {want}"
                        );
                    }
                }
                // Nothing past the output rows is touched.
                assert_eq!(got.len(), prior.len());
                // Any cut of the panels into two ranges gives the same bits as one call.
                if !portable && Pointwise::splits_by_panels() {
                    for cut in 0..=pw.panels() {
                        let mut split = prior.clone();
                        for r in [0..cut, cut..pw.panels()] {
                            // SAFETY: `split` holds pixels × cout floats, used by nothing else.
                            unsafe { pw.run_panels(&x, pixels, split.as_mut_ptr(), epi, r) };
                        }
                        assert!(
                            split
                                .iter()
                                .zip(&got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{pixels}×{cin}→{cout} {epi:?}: panels cut at {cut}"
                        );
                    }
                }
            }
        }
    }
}
