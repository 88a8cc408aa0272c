//! The inference 1×1 kernel alone, on warm caches (`deeprank-bench kernels`): GFLOP/s of
//! [`Pointwise::run`] on Lite0's layer shapes, beside one core's FMA peak measured the same way.
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

/// One core's peak of 512-bit fused multiply-adds, GFLOP/s (24 independent chains, about `gflop`
/// GFLOP per round; the best of 3), or None without AVX-512.
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
        let iters = ((gflop * 1e9 / (24.0 * 32.0)).ceil() as usize).max(1);
        let best = (0..3)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: the CPU has AVX-512F (checked above).
                std::hint::black_box(unsafe { chains(std::hint::black_box(iters)) });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        return Some((iters * 24 * 32) as f64 / best / 1e9);
    }
    None
}

/// GFLOP/s of [`Pointwise::run`] (ReLU6 epilogue) on each shape, the same input over and over
/// (warm caches; the best of 3 rounds of about `gflop` GFLOP each).
pub fn time_pointwise(shapes: &[(usize, usize, usize)], gflop: f64) -> Vec<f64> {
    shapes
        .iter()
        .map(|&(px, cin, cout)| {
            let x: Vec<f32> = (0..px * cin).map(|i| (i % 97) as f32 * 0.01).collect();
            let w: Vec<f32> = (0..cin * cout)
                .map(|i| (i % 89) as f32 * 0.01 - 0.4)
                .collect();
            let p = Pointwise::new(w, vec![0.0; cout], cin, cout);
            let mut out = vec![0f32; px * cout];
            let flops = 2 * px * cin * cout;
            let reps = (gflop * 1e9 / flops as f64).ceil() as usize;
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..reps {
                        p.run(&x, px, &mut out, Epilogue::Relu6);
                        std::hint::black_box(&out);
                    }
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            (flops * reps) as f64 / best / 1e9
        })
        .collect()
}
