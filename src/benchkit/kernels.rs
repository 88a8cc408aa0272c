//! The inference 1×1 kernel alone (`deeprank-bench kernels`): GFLOP/s of [`Pointwise::run`] on
//! Lite0's layer shapes, on warm caches and with the weights coming from L3, beside one core's FMA
//! peak measured the same way.
//! Run it with `--threads 1`; it uses the calling thread only.

use crate::cpu::pointwise::{Epilogue, Pointwise};
use std::time::Instant;

/// (pixels, cin, cout) of Lite0's 1×1 convolutions, pixels as one kernel call gets them (a band,
/// a group's small maps).
pub const SHAPES: [(usize, usize, usize); 13] = [
    (192, 16, 96),
    (192, 96, 24),
    (192, 144, 24),
    (192, 24, 144),
    (192, 240, 40),
    (192, 40, 240),
    (64, 80, 480),
    (64, 480, 80),
    (64, 672, 112),
    (64, 112, 672),
    (256, 1152, 192),
    (256, 192, 1152),
    (256, 320, 1280),
];

/// One core's peak of fused multiply-adds, GFLOP/s: 512-bit ones on AVX-512 (24 independent
/// chains), else 256-bit ones on AVX2 + FMA (12); about `gflop` GFLOP per round, the best of 3;
/// None without either.
pub fn fma_peak(gflop: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn chains(iters: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut a = [_mm512_set1_ps(1.0); 24];
            let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, b, c);
                }
            }
            _mm512_reduce_add_ps(
                a.iter()
                    .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)),
            )
        }
        // SAFETY: the CPU has AVX-512F (checked above).
        return Some(peak(gflop, 24 * 32, |iters| unsafe { chains(iters) }));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd::has_avx2_fma() {
        // The AVX2 kernel's peak: 256-bit FMAs, 12 chains (two FMA pipes × 4 cycles latency
        // need 8).
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains(iters: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut a = [_mm256_set1_ps(1.0); 12];
            let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, b, c);
                }
            }
            let s = a
                .iter()
                .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds the 8 floats stored.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
            lanes.iter().sum()
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return Some(peak(gflop, 12 * 16, |iters| unsafe { chains(iters) }));
    }
    None
}

/// GFLOP/s of `chains(iters)`, which does `flops_per_iter` per iteration: about `gflop` GFLOP per
/// round, the best of 3.
#[cfg(target_arch = "x86_64")]
fn peak(gflop: f64, flops_per_iter: usize, chains: impl Fn(usize) -> f32) -> f64 {
    let iters = ((gflop * 1e9 / flops_per_iter as f64).ceil() as usize).max(1);
    let best = best_of_3(|| {
        std::hint::black_box(chains(std::hint::black_box(iters)));
    });
    (iters * flops_per_iter) as f64 / best / 1e9
}

/// The least of 3 timings of `f`, in seconds.
fn best_of_3(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// GFLOP/s of [`Pointwise::run`] (ReLU6 epilogue) on each shape, the same input over and over
/// (warm caches; the best of 3 rounds of about `gflop` GFLOP each).
pub fn time_pointwise(shapes: &[(usize, usize, usize)], gflop: f64) -> Vec<f64> {
    shapes
        .iter()
        .map(|&shape| time_shape(shape, 1, gflop))
        .collect()
}

/// As [`time_pointwise`], with the weights coming from L3 as in the network (where the other
/// layers' weights evict a layer's from L2 between two images): the calls cycle through copies of
/// the layer whose weights add up to about 8 MB.
pub fn time_pointwise_cold(shapes: &[(usize, usize, usize)], gflop: f64) -> Vec<f64> {
    shapes
        .iter()
        .map(|&(px, cin, cout)| {
            time_shape((px, cin, cout), (8 << 20) / (4 * cin * cout) + 1, gflop)
        })
        .collect()
}

/// GFLOP/s of one shape, the calls cycling through `copies` layers of it (different weights).
fn time_shape((px, cin, cout): (usize, usize, usize), copies: usize, gflop: f64) -> f64 {
    let x: Vec<f32> = (0..px * cin).map(|i| (i % 97) as f32 * 0.01).collect();
    let layers: Vec<Pointwise> = (0..copies)
        .map(|c| {
            let w: Vec<f32> = (0..cin * cout)
                .map(|i| ((i + c) % 89) as f32 * 0.01 - 0.4)
                .collect();
            Pointwise::new(w, vec![0.0; cout], cin, cout)
        })
        .collect();
    let mut out = vec![0f32; px * cout];
    let flops = 2 * px * cin * cout;
    let reps = (gflop * 1e9 / flops as f64).ceil() as usize;
    let best = best_of_3(|| {
        for p in layers.iter().cycle().take(reps) {
            p.run(&x, px, &mut out, Epilogue::Relu6);
            std::hint::black_box(&out);
        }
    });
    (flops * reps) as f64 / best / 1e9
}
