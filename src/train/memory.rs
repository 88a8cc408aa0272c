//! Refusing what cannot fit before it starts: the activation memory of a training step and the
//! feature cache against `/proc/meminfo`'s MemAvailable.

use crate::model::lite::{Backbone, FEATURE_DIM, STEM};
use crate::train::config::TrainConfig;
use anyhow::{Result, bail};

/// Rough activation memory (bytes) of one image through the trainable part, with the tensors
/// autodiff keeps for the backward pass.
pub fn activation_bytes(backbone: Backbone, size: u32, level: usize) -> usize {
    let mut hw = (size as usize / 2).pow(2);
    let mut total = if level == 0 { 3 * STEM * hw } else { 0 };
    let mut cin = STEM;
    let mut b = 0;
    for (t, c, n, s, _) in backbone.stages() {
        for i in 0..n {
            b += 1;
            let mid = cin * t;
            let hw_in = hw;
            if i == 0 && s == 2 {
                hw /= 4;
            }
            if b > level {
                total += 3 * mid * hw_in + 3 * mid * hw + 2 * c * hw;
            }
            cin = c;
        }
    }
    if level < backbone.pooled_level() {
        total += 3 * FEATURE_DIM * hw;
    }
    total * 4 * 2
}

fn mem_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Refuses a step whose activations cannot fit in memory; returns the bytes available (or
/// `usize::MAX` where `/proc/meminfo` cannot tell).
pub fn check_step(cfg: &TrainConfig) -> Result<usize> {
    let images_per_step = if cfg.sampling.mines() {
        cfg.batch
    } else {
        3 * cfg.batch
    };
    let avail = mem_available().unwrap_or(usize::MAX);
    let need_batch = activation_bytes(cfg.backbone, cfg.size, cfg.level()) * images_per_step;
    if need_batch > avail / 10 * 8 {
        bail!(
            "a step of {images_per_step} images at {} px needs about {:.1} GiB of activations but {:.1} GiB are available: \
             lower --batch or --size, or freeze more blocks (--freeze-blocks)",
            cfg.size,
            gib(need_batch),
            gib(avail)
        );
    }
    Ok(avail)
}

/// Refuses a feature cache of `need` bytes that cannot fit in `avail`.
pub fn check_cache(need: usize, avail: usize) -> Result<()> {
    if need > avail / 10 * 7 {
        bail!(
            "the feature cache needs {:.1} GiB but {:.1} GiB are available: use fewer --views, a higher \
             --freeze-blocks, a smaller --size, or --no-cache",
            gib(need),
            gib(avail)
        );
    }
    Ok(())
}
