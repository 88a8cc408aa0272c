//! The optimiser of a run: which parameters train (the frozen prefix, frozen BatchNorm statistics),
//! the optimiser itself and the per-group learning rates.

use crate::model::net::{EmbedNet, POOLED_LEVEL};
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

/// Parameter paths of the frozen prefix below `level` (the unused ImageNet classifier always).
fn frozen_patterns(level: usize) -> Vec<String> {
    let mut p = vec![r"^backbone\.fc\.".to_string()];
    if level >= 1 {
        p.push(r"^backbone\.(conv_stem|bn0)\.".into());
        for i in 0..level.min(16) {
            p.push(format!(r"^backbone\.blocks\.{i}\."));
        }
    }
    if level >= POOLED_LEVEL {
        p.push(r"^backbone\.(conv_head|bn1)\.".into());
    }
    p
}

/// Freezes the prefix; with frozen BatchNorm, the rest of the backbone keeps running statistics
/// while its weights train.
pub fn apply_freeze(model: EmbedNet, cfg: &TrainConfig) -> Result<EmbedNet> {
    let level = cfg.level();
    let mut model = model.freeze_group(group(frozen_patterns(level))?);
    if cfg.bn == BnMode::Frozen && level < POOLED_LEVEL {
        let all = group(vec![r"^backbone\.".into()])?;
        let trainable = all.clone().exclude(group(frozen_patterns(level))?);
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
