//! The optimiser of a run: which parameters train (the frozen prefix, frozen BatchNorm statistics),
//! the optimiser itself and the per-group learning rates.

use crate::model::net::EmbedNet;
use crate::train::config::{BnMode, OptimizerKind, TrainConfig};
use anyhow::{Result, anyhow};
use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::module::{Module, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};

/// The optimiser a config names (with its momentum, Nesterov and weight decay).
pub fn optimizer(cfg: &TrainConfig) -> ModuleOptimizer {
    let wd = (cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32));
    match cfg.optimizer {
        OptimizerKind::Sgd => SgdConfig::new()
            .with_momentum((cfg.momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(cfg.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(cfg.nesterov)
            }))
            .with_weight_decay(wd)
            .init(),
        OptimizerKind::Adam => AdamConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(wd)
            .init(),
        OptimizerKind::Adamw => AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(cfg.weight_decay as f32)
            .init(),
    }
}

fn group(patterns: Vec<String>) -> Result<ParamGroup> {
    ParamGroup::from_any_regexes(patterns).map_err(|e| anyhow!("parameter group: {e:?}"))
}

/// Parameter paths of the frozen prefix below `level` (the unused ImageNet classifier always) of
/// a backbone with `blocks` MBConv blocks.
fn frozen_patterns(level: usize, blocks: usize) -> Vec<String> {
    let mut p = vec![r"^backbone\.fc\.".to_string()];
    if level >= 1 {
        p.push(r"^backbone\.(conv_stem|bn0)\.".into());
        for i in 0..level.min(blocks) {
            p.push(format!(r"^backbone\.blocks\.{i}\."));
        }
    }
    if level > blocks {
        p.push(r"^backbone\.(conv_head|bn1)\.".into());
    }
    p
}

/// Freezes the prefix; with frozen BatchNorm, the rest of the backbone keeps running statistics
/// while its weights train.
pub fn apply_freeze(model: EmbedNet, cfg: &TrainConfig) -> Result<EmbedNet> {
    let level = cfg.level();
    let blocks = model.backbone.blocks.len();
    let mut model = model.freeze_group(group(frozen_patterns(level, blocks))?);
    if cfg.bn == BnMode::Frozen && level <= blocks {
        let all = group(vec![r"^backbone\.".into()])?;
        let trainable = all.clone().exclude(group(frozen_patterns(level, blocks))?);
        model = model
            .freeze_group(all)
            .set_require_grad_group(trainable, true);
    }
    Ok(model)
}

/// Learning rates per parameter group: the head (and the multiscale branches) at `lr`, the
/// backbone at `backbone_lr`, both scaled by the plateau schedule's `scale`.
pub fn lr_policy(cfg: &TrainConfig, scale: f64) -> Result<ModuleLearningRate> {
    Ok(ModuleLrScheduler::new(cfg.backbone_lr * scale)
        .with_group(
            group(vec![r"^(head|shallow4|shallow8)\.".into()])?,
            cfg.lr * scale,
        )
        .step())
}

/// The plateau schedule (PyTorch's ReduceLROnPlateau, mode max, absolute threshold 1e-4), one
/// call per epoch with its `score`: a score above the best by more than 1e-4 becomes the best and
/// resets the count of bad epochs; when more than `patience` epochs in a row bring none, the
/// learning-rate scale is multiplied by `factor` and the count restarts. Returns whether the scale
/// dropped.
pub fn plateau(
    best: &mut Option<f64>,
    bad_epochs: &mut usize,
    lr_scale: &mut f64,
    score: f64,
    factor: f64,
    patience: usize,
) -> bool {
    if best.is_none_or(|b| score > b + 1e-4) {
        *best = Some(score);
        *bad_epochs = 0;
        return false;
    }
    *bad_epochs += 1;
    if *bad_epochs > patience {
        *lr_scale *= factor;
        *bad_epochs = 0;
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::plateau;

    /// Runs the schedule over `scores`; returns the learning-rate scale after each epoch.
    fn scales(scores: &[f64], factor: f64, patience: usize) -> Vec<f64> {
        let (mut best, mut bad, mut scale) = (None, 0, 1.0);
        scores
            .iter()
            .map(|&s| {
                plateau(&mut best, &mut bad, &mut scale, s, factor, patience);
                scale
            })
            .collect()
    }

    #[test]
    fn the_rate_drops_after_patience_epochs_without_improvement() {
        // Patience 2: improvements at epochs 1-2, then flat; the third epoch without improvement
        // drops the rate ×0.1, the count restarts, three more flat epochs drop it again.
        let s = scales(&[0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], 0.1, 2);
        let want = [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01];
        for (e, (g, w)) in s.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < 1e-12,
                "epoch {}: scale {g}, want {w}: {s:?}",
                e + 1
            );
        }
    }

    #[test]
    fn an_improvement_resets_the_count_and_tiny_gains_do_not_count() {
        // Patience 1: a bad epoch, then an improvement (count reset), then a bad epoch: no drop.
        assert_eq!(scales(&[0.5, 0.4, 0.6, 0.6], 0.5, 1), vec![1.0; 4]);
        // Gains under the 1e-4 threshold are not improvements: the second flat epoch drops ×0.5.
        assert_eq!(
            scales(&[0.5, 0.50005, 0.50009], 0.5, 1),
            vec![1.0, 1.0, 0.5]
        );
        // Patience 0: every epoch without improvement drops the rate; losses (negated) work too.
        assert_eq!(
            scales(&[-2.0, -1.0, -1.5, -1.2], 0.1, 0),
            vec![1.0, 1.0, 0.1, 0.1 * 0.1]
        );
    }
}
