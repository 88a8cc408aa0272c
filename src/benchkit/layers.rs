//! Per-layer timing of the CPU engine (`deeprank-bench layers`, issue 13): where the time of a
//! batch goes, layer by layer, with the fused blocks on and off, to set beside ONNX Runtime's
//! own profile (`bench/ort_profile.py`).

use crate::cpu::engine::Engine;
use crate::model::device::device;
use crate::model::lite::Backbone;
use crate::model::weights;
use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;

/// One configuration's figures: wall-clock images per second of its fastest plain batch, and
/// the thread-seconds per image of each stage (the least over the clocked passes).
pub struct LayerTimes {
    /// `plain` (layer by layer, one image at a time), `fused` (fused blocks) or `grouped` (fused
    /// blocks and the small-map tail over groups of images: the engine's default).
    pub name: &'static str,
    pub fused: bool,
    pub grouped: bool,
    pub img_per_s: f64,
    pub stages: Vec<(String, f64)>,
}

/// The first `n` images of `paths` at `size` px through the pretrained Lite0 engine as one batch
/// on the current rayon pool: after one warm-up each, `runs` rounds, each timing one plain batch
/// and one clocked batch in each configuration of [`LayerTimes`] in turn (alternating, so that a
/// noisy machine's slow spells hit all; the least of each figure is kept).
pub fn time_layers(paths: &[PathBuf], size: u32, n: usize, runs: usize) -> Result<Vec<LayerTimes>> {
    let inputs = super::decoded(paths, size, n)?;
    let n = inputs.len();
    let batch: Vec<f32> = inputs.concat();
    let path = weights::resolve(None, Backbone::Lite0)?;
    let model = weights::load(&path, Backbone::Lite0, &device())?;
    let mut engine = Engine::new(&model)?;
    let side = size as usize;
    let names = engine.stage_names();
    let configs = [
        ("plain", false, false),
        ("fused", true, false),
        ("grouped", true, true),
    ];
    let mut out: Vec<LayerTimes> = configs
        .into_iter()
        .map(|(name, fused, grouped)| {
            engine.set_fused(fused);
            engine.set_grouped(grouped);
            engine.pooled(&batch, n, side);
            LayerTimes {
                name,
                fused,
                grouped,
                img_per_s: 0.0,
                stages: names.iter().map(|s| (s.clone(), f64::INFINITY)).collect(),
            }
        })
        .collect();
    for _ in 0..runs.max(1) {
        for t in out.iter_mut() {
            engine.set_fused(t.fused);
            engine.set_grouped(t.grouped);
            let t0 = Instant::now();
            engine.pooled(&batch, n, side);
            t.img_per_s = t.img_per_s.max(n as f64 / t0.elapsed().as_secs_f64());
            let secs = engine.profile(&batch, n, side);
            for ((_, best), s) in t.stages.iter_mut().zip(secs) {
                *best = best.min(s / n as f64);
            }
        }
    }
    Ok(out)
}
