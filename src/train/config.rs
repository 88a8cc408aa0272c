//! A training run's settings: the recipes (deeprank's default and the seed's), the optimiser and
//! BatchNorm choices, validation of a config, and the network it builds. Saved as the run's
//! `config.json`, whose `arch`, `dim`, `normalize` and `size` are the run's identity
//! ([`RunIdentity`], all inference reads of it).

use crate::data::transform::check_size;
use crate::model::identity::RunIdentity;
use crate::model::lite::Backbone;
use crate::model::net::{Arch, EmbedNet};
use crate::model::run::CONFIG;
use crate::model::weights;
use crate::train::plan::Sampling;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

/// BatchNorm in the trainable part of the backbone: `frozen` uses the ImageNet running statistics
/// (eval mode) while its scale and shift still train; `train` uses batch statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    Frozen,
    Train,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// deeprank's default (chosen by measurement; see bench/RESULTS.md).
    Default,
    /// The seed's recipe exactly: SGD + Nesterov 0.9, lr 1e-3, wd 1e-5, plateau ×0.1, batch 30
    /// triplets, g = 1.0, 4096-d head, full fine-tuning.
    Seed,
}

impl Recipe {
    /// The backbone a recipe trains when none is given: for the default recipe the best measured
    /// within its hour of CPU (Lite2; bench/RESULTS.md §3), for the seed's Lite0.
    pub fn backbone(self) -> Backbone {
        match self {
            Recipe::Default => Backbone::Lite2,
            Recipe::Seed => Backbone::Lite0,
        }
    }
}

/// Everything that defines a run (saved in `config.json` and in every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// The pretrained network under the head (runs from before there was a choice: Lite0).
    #[serde(default)]
    pub backbone: Backbone,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub arch: Arch,
    pub dim: usize,
    pub normalize: bool,
    pub gap: f32,
    pub sampling: Sampling,
    pub triplets: Option<PathBuf>,
    pub optimizer: OptimizerKind,
    /// Learning rate of the head (and the multiscale branches).
    pub lr: f64,
    /// Learning rate of the trainable backbone blocks.
    pub backbone_lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Triplets per step (file, random) or images per step (batch-hard, semi-hard).
    pub batch: usize,
    /// Images per class in a mining batch (K of P×K).
    pub per_class: usize,
    pub epochs: usize,
    pub steps_per_epoch: Option<usize>,
    pub size: u32,
    /// Frozen levels: 0 = nothing frozen, 1–B = stem + that many MBConv blocks, B + 1 = the whole
    /// backbone (only the head trains); B = 16 for Lite0, 21 for Lite1/Lite2.
    pub freeze_blocks: usize,
    pub bn: BnMode,
    /// Compute the frozen part once per image view and train from the cache.
    pub cache: bool,
    /// Views per image in the cache: view 0 plain, the others random crop + flip.
    pub views: usize,
    pub plateau_factor: f64,
    pub plateau_patience: usize,
    pub seed: u64,
    /// Also checkpoint every this many steps (0: only at epoch ends).
    pub save_every: usize,
    pub weights: Option<PathBuf>,
}

impl TrainConfig {
    /// The preset of a recipe for a dataset, on Lite0.
    pub fn recipe(recipe: Recipe, data: PathBuf) -> Self {
        Self::recipe_for(recipe, data, Backbone::Lite0)
    }

    /// The preset of a recipe for a dataset on `backbone` (the default recipe freezes the whole
    /// backbone, whatever its depth).
    pub fn recipe_for(recipe: Recipe, data: PathBuf, backbone: Backbone) -> Self {
        match recipe {
            Recipe::Default => TrainConfig {
                backbone,
                data,
                val: None,
                arch: Arch::Classes,
                dim: 128,
                normalize: true,
                gap: 1.0,
                sampling: Sampling::SemiHard,
                triplets: None,
                optimizer: OptimizerKind::Adam,
                lr: 1e-3,
                backbone_lr: 1e-4,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.0,
                batch: 128,
                per_class: 4,
                epochs: 60,
                steps_per_epoch: None,
                size: backbone.train_size(),
                freeze_blocks: backbone.pooled_level(),
                bn: BnMode::Frozen,
                cache: true,
                views: 1,
                plateau_factor: 0.1,
                plateau_patience: 2,
                seed: 0,
                save_every: 200,
                weights: None,
            },
            Recipe::Seed => TrainConfig {
                backbone,
                data,
                val: None,
                arch: Arch::Lite0,
                dim: 4096,
                normalize: false,
                gap: 1.0,
                sampling: Sampling::Random,
                triplets: None,
                optimizer: OptimizerKind::Sgd,
                lr: 1e-3,
                backbone_lr: 1e-3,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-5,
                batch: 30,
                per_class: 4,
                epochs: 10,
                steps_per_epoch: None,
                size: 128,
                freeze_blocks: 0,
                bn: BnMode::Train,
                cache: false,
                views: 1,
                plateau_factor: 0.1,
                plateau_patience: 10,
                seed: 0,
                save_every: 200,
                weights: None,
            },
        }
    }

    /// The settings a run was started with (its `config.json`): what a resume continues with.
    pub fn of_run(run: &Path) -> Result<Self> {
        let path = run.join(CONFIG);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "nothing to resume: {} has no {CONFIG} (is it a run folder made by `deeprank train --out`?)",
                run.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged: it is not a training config", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.gap > 0.0 && self.gap.is_finite()) {
            bail!("--gap must be positive (got {})", self.gap);
        }
        if self.dim == 0 {
            bail!("--dim must be at least 1");
        }
        check_size(self.size)?;
        if self.freeze_blocks > self.pooled_level() {
            bail!(
                "--freeze-blocks is 0–{} blocks of {}, or {} for the whole backbone",
                self.backbone.blocks(),
                self.backbone.title(),
                self.pooled_level()
            );
        }
        if !(self.lr > 0.0 && self.backbone_lr >= 0.0) {
            bail!("learning rates must be positive");
        }
        if self.epochs == 0 || self.views == 0 || self.per_class < 2 {
            bail!("--epochs and --views must be at least 1, --per-class at least 2");
        }
        if self.sampling.mines() && self.batch < 2 * self.per_class {
            bail!(
                "--batch {} is too small for mining: it needs at least two classes of --per-class {} images",
                self.batch,
                self.per_class
            );
        }
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if self.sampling == Sampling::File && self.triplets.is_none() {
            bail!("--sampling file needs --triplets FILE (written by `deeprank sample`)");
        }
        if self.cache && self.freeze_blocks == 0 {
            bail!("--cache needs a frozen part: use --freeze-blocks K (K ≥ 1) or --no-cache");
        }
        if !(self.plateau_factor > 0.0 && self.plateau_factor <= 1.0) {
            bail!("--plateau-factor must be in (0, 1]");
        }
        Ok(())
    }

    /// Fields whose change makes a checkpoint meaningless for this config.
    pub(crate) fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let free = ["epochs", "save_every", "val", "weights"];
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, v) in a {
                if !free.contains(&k.as_str()) && b.get(k) != Some(v) {
                    out.push(format!(
                        "{k}: {} -> {}",
                        b.get(k).cloned().unwrap_or_default(),
                        v
                    ));
                }
            }
        }
        out
    }

    pub fn level(&self) -> usize {
        self.freeze_blocks
    }

    /// The level of the backbone's pooled features (everything frozen).
    pub fn pooled_level(&self) -> usize {
        self.backbone.pooled_level()
    }

    /// What inference needs of the run (read back from `config.json` by [`load_run`]).
    ///
    /// [`load_run`]: crate::model::run::load_run
    pub fn identity(&self) -> RunIdentity {
        RunIdentity {
            backbone: self.backbone,
            arch: self.arch,
            dim: self.dim,
            normalize: self.normalize,
            size: self.size,
        }
    }
}

/// Builds the network of a config on `device`, with the ImageNet backbone.
pub fn build_net(cfg: &TrainConfig, device: &Device) -> Result<EmbedNet> {
    let wpath = weights::resolve(cfg.weights.as_deref(), cfg.backbone)?;
    let backbone = weights::load(&wpath, cfg.backbone, device)?;
    device.seed(cfg.seed);
    Ok(EmbedNet::new(
        backbone,
        cfg.arch,
        cfg.dim,
        cfg.normalize,
        device,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default recipe: the classes head, 60 epochs, on Lite2 unless told otherwise, at the
    /// backbone's training side; the seed's stays the seed's (Lite0, linear head, 128 px).
    #[test]
    fn recipes_pick_their_backbone_arch_and_side() {
        assert_eq!(Recipe::Default.backbone(), Backbone::Lite2);
        assert_eq!(Recipe::Seed.backbone(), Backbone::Lite0);
        for (b, side) in [
            (Backbone::Lite0, 224),
            (Backbone::Lite1, 256),
            (Backbone::Lite2, 256),
        ] {
            let c = TrainConfig::recipe_for(Recipe::Default, "d".into(), b);
            assert_eq!(
                (c.arch, c.epochs, c.size),
                (Arch::Classes, 60, side),
                "{b:?}"
            );
            assert_eq!(c.freeze_blocks, b.pooled_level());
            c.validate().unwrap();
        }
        let s = TrainConfig::recipe_for(Recipe::Seed, "d".into(), Recipe::Seed.backbone());
        assert_eq!(
            (s.arch, s.size, s.backbone),
            (Arch::Lite0, 128, Backbone::Lite0)
        );
    }
}
