//! `deeprank train`: fine-tunes the pretrained network with the ranking loss (the seed's `main.py`),
//! with in-batch mining, frozen-prefix feature caching, crash-safe checkpoints, per-epoch metrics
//! and a plot.

pub mod checkpoint;
pub mod data;
pub mod fast;
pub mod loss;
pub mod net;
pub mod plot;

use crate::dataset::{Dataset, Split};
use crate::embed::{progress, to_vec};
use crate::eval::{Metrics, evaluate_vectors};
use crate::sampler::{self, Triplet};
use crate::{transform, weights};
use anyhow::{Context, Result, anyhow, bail};
use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::module::{Module, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::store::ModuleRecord;
use data::{ClassIndex, FeatureCache, Sampling, Slot, StepPlan};
use net::{Arch, EmbedNet, POOLED_LEVEL};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const CONFIG: &str = "config.json";
pub const CHECKPOINT: &str = "checkpoint.bin";
pub const MODEL: &str = "model.bpk";
pub const METRICS: &str = "metrics.csv";
pub const PLOT: &str = "plot.png";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

/// BatchNorm in the trainable part of the backbone: `frozen` uses the ImageNet running statistics
/// (eval mode) while its scale and shift still train; `train` uses batch statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    Frozen,
    Train,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Recipe {
    /// deeprank's default (chosen by measurement; see bench/RESULTS.md).
    Default,
    /// The seed's recipe exactly: SGD + Nesterov 0.9, lr 1e-3, wd 1e-5, plateau ×0.1, batch 30
    /// triplets, g = 1.0, 4096-d head, full fine-tuning.
    Seed,
}

/// Everything that defines a run (saved in `config.json` and in every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
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
    /// Frozen levels: 0 = nothing frozen, 1–16 = stem + that many MBConv blocks, 17 = the whole
    /// backbone (only the head trains).
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
    /// The preset of a recipe for a dataset.
    pub fn recipe(recipe: Recipe, data: PathBuf) -> Self {
        match recipe {
            Recipe::Default => TrainConfig {
                data,
                val: None,
                arch: Arch::Lite0,
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
                epochs: 15,
                steps_per_epoch: None,
                size: 224,
                freeze_blocks: POOLED_LEVEL,
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

    pub fn validate(&self) -> Result<()> {
        if !(self.gap > 0.0 && self.gap.is_finite()) {
            bail!("--gap must be positive (got {})", self.gap);
        }
        if self.dim == 0 {
            bail!("--dim must be at least 1");
        }
        crate::embed::check_size(self.size)?;
        if self.freeze_blocks > POOLED_LEVEL {
            bail!("--freeze-blocks is 0–16 blocks, or 17 for the whole backbone");
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
    fn differences(&self, other: &TrainConfig) -> Vec<String> {
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
}

/// One epoch's numbers (a row of `metrics.csv`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    pub triplets: usize,
    pub mean_loss: f64,
    pub triplet_accuracy: f64,
    pub lr: f64,
    pub p_at_1: Option<f64>,
    pub p_at_10: Option<f64>,
    pub p_at_30: Option<f64>,
    pub map_at_r: Option<f64>,
    /// Cumulative training seconds (steps only) and wall seconds since the run began.
    pub train_seconds: f64,
    pub wall_seconds: f64,
}

/// Sums over the steps of the current epoch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Accum {
    pub loss: f64,
    pub accuracy: f64,
    pub steps: usize,
    pub triplets: usize,
}

/// Where a run stands (saved in every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub config: TrainConfig,
    /// Completed epochs.
    pub epoch: usize,
    /// Steps done in the current epoch.
    pub step_in_epoch: usize,
    pub global_step: usize,
    pub lr_scale: f64,
    pub best: Option<f64>,
    pub bad_epochs: usize,
    pub history: Vec<EpochMetrics>,
    pub accum: Accum,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub skipped_images: Vec<String>,
}

/// What a finished run reports.
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub history: Vec<EpochMetrics>,
    pub skipped_images: usize,
}

fn optimizer(cfg: &TrainConfig) -> ModuleOptimizer {
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

fn lr_policy(cfg: &TrainConfig, scale: f64) -> Result<ModuleLearningRate> {
    Ok(ModuleLrScheduler::new(cfg.backbone_lr * scale)
        .with_group(
            group(vec![r"^(head|shallow4|shallow8)\.".into()])?,
            cfg.lr * scale,
        )
        .step())
}

/// Rough activation memory (bytes) of one image through the trainable part, with the tensors
/// autodiff keeps for the backward pass.
fn activation_bytes(size: u32, level: usize) -> usize {
    let mut hw = (size as usize / 2).pow(2);
    let mut total = if level == 0 { 3 * 32 * hw } else { 0 };
    let mut cin = 32;
    let mut b = 0;
    for (t, c, n, s, _) in crate::model::STAGES {
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
    if level < POOLED_LEVEL {
        total += 3 * 1280 * hw;
    }
    total * 4 * 2
}

fn mem_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Images (paths) that decode, checked in parallel before training.
fn readable(ds: &Dataset) -> (Vec<bool>, Vec<String>) {
    let pb = progress(ds.items.len(), "check images");
    let ok: Vec<std::result::Result<(), String>> = ds
        .items
        .par_iter()
        .map(|it| {
            let r = transform::load_rgb(&it.path)
                .map(|_| ())
                .map_err(|e| format!("{}: {e}", it.path.display()));
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    let mut skipped = Vec::new();
    let flags = ok
        .into_iter()
        .map(|r| match r {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipped {e}");
                skipped.push(e);
                false
            }
        })
        .collect();
    (flags, skipped)
}

/// Embeds `items` of `ds` with the model in inference mode (from the cache when there is one).
fn embed_items(
    model: &EmbedNet,
    ds: &Dataset,
    items: &[usize],
    cache: Option<&FeatureCache>,
    cfg: &TrainConfig,
    label: &str,
) -> Result<Vec<f32>> {
    let dev = crate::embed::device();
    let level = cfg.level();
    let s = cfg.size as usize;
    let mut out = Vec::with_capacity(items.len() * cfg.dim);
    let pb = progress(items.len(), label);
    let bs = if cache.is_some() { 256 } else { 64 };
    let engine = match cache {
        Some(_) => None,
        None => crate::embed::cpu_engine(&model.backbone)?,
    };
    for chunk in items.chunks(bs) {
        let slots: Vec<Slot> = chunk.iter().map(|&item| Slot { item, view: 0 }).collect();
        let e = match cache {
            Some(c) => model.suffix(c.gather(&slots, &dev), level),
            None => {
                let buf = data::load_batch(ds, &slots, cfg.size, &[], false)?;
                model.embed_host(engine.as_ref(), buf, chunk.len(), s, &dev)
            }
        };
        out.extend(to_vec(e)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

struct Validation {
    ds: Dataset,
    items: Vec<usize>,
    cache: Option<FeatureCache>,
}

fn validate_epoch(
    model: &EmbedNet,
    train: &Dataset,
    train_items: &[usize],
    train_cache: Option<&FeatureCache>,
    val: &Validation,
    cfg: &TrainConfig,
) -> Result<Metrics> {
    let m = model.valid();
    let dbv = embed_items(&m, train, train_items, train_cache, cfg, "val: db")?;
    let qv = embed_items(
        &m,
        &val.ds,
        &val.items,
        val.cache.as_ref(),
        cfg,
        "val: queries",
    )?;
    let class = |ds: &Dataset, i: usize| ds.classes[ds.items[i].class].id.clone();
    let dbc: Vec<String> = train_items.iter().map(|&i| class(train, i)).collect();
    let dbp: Vec<PathBuf> = train_items
        .iter()
        .map(|&i| train.items[i].path.clone())
        .collect();
    let qc: Vec<String> = val.items.iter().map(|&i| class(&val.ds, i)).collect();
    let qp: Vec<PathBuf> = val
        .items
        .iter()
        .map(|&i| val.ds.items[i].path.clone())
        .collect();
    let (metrics, _) = evaluate_vectors(&dbv, cfg.dim, &dbc, &dbp, &qv, &qc, &qp, &[1, 10, 30]);
    Ok(metrics)
}

fn write_metrics(run: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut s = String::from(
        "epoch,steps,triplets,mean_loss,triplet_accuracy,lr,p_at_1,p_at_10,p_at_30,map_at_r,train_seconds,wall_seconds\n",
    );
    let o = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
    for h in history {
        s += &format!(
            "{},{},{},{:.5},{:.4},{:e},{},{},{},{},{:.1},{:.1}\n",
            h.epoch,
            h.steps,
            h.triplets,
            h.mean_loss,
            h.triplet_accuracy,
            h.lr,
            o(h.p_at_1),
            o(h.p_at_10),
            o(h.p_at_30),
            o(h.map_at_r),
            h.train_seconds,
            h.wall_seconds
        );
    }
    let tmp = run.join("metrics.csv.tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(&tmp, run.join(METRICS))?;
    let loss: Vec<f64> = history.iter().map(|h| h.mean_loss).collect();
    let p30: Vec<Option<f64>> = history.iter().map(|h| h.p_at_30).collect();
    plot::write(&run.join(PLOT), &loss, &p30)
}

fn save_checkpoint(
    run: &Path,
    model: &EmbedNet,
    optim: &ModuleOptimizer,
    state: &TrainState,
) -> Result<()> {
    let rec = model
        .valid()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow!("model record: {e:?}"))?;
    let opt = optim
        .into_bytes()
        .map_err(|e| anyhow!("optimizer record: {e:?}"))?;
    checkpoint::write(
        &run.join(CHECKPOINT),
        &checkpoint::Parts {
            state_json: serde_json::to_vec(state)?,
            model: rec.to_vec(),
            optimizer: opt.to_vec(),
        },
    )
}

/// Writes the run's model for `embed/query/eval --model RUN_DIR` (atomically).
fn save_model(run: &Path, model: &EmbedNet) -> Result<()> {
    let tmp = run.join("model.tmp.bpk");
    model
        .valid()
        .save_file(&tmp)
        .map_err(|e| anyhow!("cannot save the model: {e:?}"))?;
    std::fs::rename(&tmp, run.join(MODEL))?;
    Ok(())
}

/// Builds the network of a config on `device`, with the ImageNet backbone.
pub fn build_net(cfg: &TrainConfig, device: &Device) -> Result<EmbedNet> {
    let wpath = weights::resolve(cfg.weights.as_deref())?;
    let backbone = weights::load_lite0(&wpath, device)?;
    device.seed(cfg.seed);
    Ok(EmbedNet::new(
        backbone,
        cfg.arch,
        cfg.dim,
        cfg.normalize,
        device,
    ))
}

/// Loads a finished (or running) run's network for inference.
pub fn load_run(run: &Path) -> Result<(TrainConfig, EmbedNet)> {
    let cfg_path = run.join(CONFIG);
    let cfg: TrainConfig = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{} is not a training run (no {CONFIG})", run.display()))?,
    )
    .with_context(|| format!("{} is damaged", cfg_path.display()))?;
    let model_path = run.join(MODEL);
    if !model_path.is_file() {
        bail!(
            "{} has no {MODEL} yet: let the training finish an epoch",
            run.display()
        );
    }
    let dev = crate::embed::device();
    let net = EmbedNet::new(
        crate::model::Lite0::new(&dev),
        cfg.arch,
        cfg.dim,
        cfg.normalize,
        &dev,
    );
    let net = net
        .try_load_file(&model_path)
        .map_err(|e| anyhow!("cannot load {}: {e:?}", model_path.display()))?;
    Ok((cfg, net.valid()))
}

/// Identifies a feature cache: same images, weights, cut level, size, views and seed.
fn cache_key(
    cfg: &TrainConfig,
    ds: &Dataset,
    items: &[usize],
    val: Option<&Validation>,
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let wpath = weights::resolve(cfg.weights.as_deref())?;
    h.update(weights::sha256_file(&wpath)?.as_bytes());
    h.update(
        format!(
            "{}|{}|{}|{}|{:?}|",
            cfg.level(),
            cfg.size,
            cfg.views,
            cfg.seed,
            cfg.arch
        )
        .as_bytes(),
    );
    for &i in items {
        let p = &ds.items[i].path;
        let m = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        h.update(format!("{}:{m}\n", p.canonicalize().unwrap_or(p.clone()).display()).as_bytes());
    }
    if let Some(v) = val {
        for &i in &v.items {
            h.update(format!("v{}\n", v.ds.items[i].path.display()).as_bytes());
        }
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Options of one invocation that are not part of the run's identity.
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub resume: bool,
    pub force: bool,
}

/// Trains (or resumes) a run.
pub fn train(cfg: TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let run = &opts.run_dir;
    let ckpt_path = run.join(CHECKPOINT);
    let mut resumed: Option<(TrainState, checkpoint::Parts)> = None;
    if opts.resume {
        if !ckpt_path.is_file() {
            bail!("nothing to resume: {} has no {CHECKPOINT}", run.display());
        }
        let parts = checkpoint::read(&ckpt_path)?;
        let state: TrainState = serde_json::from_slice(&parts.state_json)
            .with_context(|| format!("{} is damaged", ckpt_path.display()))?;
        let diff = cfg.differences(&state.config);
        if !diff.is_empty() && !opts.force {
            bail!(
                "the run in {} was started with another config ({}); resume with the same flags, or add --force",
                run.display(),
                diff.join("; ")
            );
        }
        resumed = Some((state, parts));
    } else if ckpt_path.exists() && !opts.force {
        bail!(
            "{} already holds a run: add --resume to continue it, --force to start over, or pick another --out",
            run.display()
        );
    }
    cfg.validate()?;
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))?;
    std::fs::write(run.join(CONFIG), serde_json::to_string_pretty(&cfg)?)?;

    let train_ds = Dataset::open(&cfg.data, Split::Train)?;
    eprintln!("train: {}", train_ds.summary());
    let (usable, mut skipped) = readable(&train_ds);
    let idx = ClassIndex::new(&train_ds, &usable)?;
    let train_items: Vec<usize> = idx.by_class.iter().flatten().copied().collect::<Vec<_>>();
    let mut train_items_sorted = train_items.clone();
    train_items_sorted.sort();
    let file: Vec<Triplet> = match (&cfg.triplets, cfg.sampling) {
        (Some(f), Sampling::File) => {
            let t = sampler::read_triplets(&train_ds, f)?;
            let t: Vec<Triplet> = t
                .into_iter()
                .filter(|t| usable[t.query] && usable[t.positive] && usable[t.negative])
                .collect();
            if t.is_empty() {
                bail!("{} holds no usable triplet", f.display());
            }
            t
        }
        _ => Vec::new(),
    };

    let ad = crate::embed::device().autodiff();
    let mut model = build_net(&cfg, &ad)?;
    let level = cfg.level();

    // Memory: refuse what cannot fit instead of dying mid-run.
    let images_per_step = if cfg.sampling.mines() {
        cfg.batch
    } else {
        3 * cfg.batch
    };
    let avail = mem_available().unwrap_or(usize::MAX);
    let need_batch = activation_bytes(cfg.size, level) * images_per_step;
    if need_batch > avail / 10 * 8 {
        bail!(
            "a step of {images_per_step} images at {} px needs about {:.1} GiB of activations but {:.1} GiB are available: \
             lower --batch or --size, or freeze more blocks (--freeze-blocks)",
            cfg.size,
            gib(need_batch),
            gib(avail)
        );
    }
    let val = match &cfg.val {
        Some(v) => {
            let ds = Dataset::open(v, Split::Val)?;
            eprintln!("val: {}", ds.summary());
            let (ok, sk) = readable(&ds);
            skipped.extend(sk);
            let items: Vec<usize> = (0..ds.items.len()).filter(|&i| ok[i]).collect();
            Some(Validation {
                ds,
                items,
                cache: None,
            })
        }
        None => None,
    };
    let mut val = val;
    let cache = if cfg.cache {
        let n_val = val.as_ref().map_or(0, |v| v.items.len());
        let need =
            FeatureCache::bytes_needed(&model, level, cfg.size, train_items.len(), cfg.views)
                + FeatureCache::bytes_needed(&model, level, cfg.size, n_val, 1);
        if need > avail / 10 * 7 {
            bail!(
                "the feature cache needs {:.1} GiB but {:.1} GiB are available: use fewer --views, a higher \
                 --freeze-blocks, a smaller --size, or --no-cache",
                gib(need),
                gib(avail)
            );
        }
        let t0 = Instant::now();
        let key = cache_key(&cfg, &train_ds, &train_items_sorted, val.as_ref())?;
        let file = weights::home()
            .join("cache")
            .join(format!("features-{key}.bin"));
        let vfile = weights::home()
            .join("cache")
            .join(format!("features-{key}-val.bin"));
        let loaded = FeatureCache::load(&file)
            .ok()
            .and_then(|c| match val.as_mut() {
                Some(v) => FeatureCache::load(&vfile).ok().map(|vc| {
                    v.cache = Some(vc);
                    c
                }),
                None => Some(c),
            });
        let c = match loaded {
            Some(c) => {
                eprintln!("reusing cached features from {}", file.display());
                c
            }
            None => {
                let c = FeatureCache::build(
                    &model,
                    &train_ds,
                    &train_items_sorted,
                    level,
                    cfg.views,
                    cfg.size,
                    cfg.seed,
                    64,
                    "cache train",
                )?;
                if let Some(v) = val.as_mut() {
                    v.cache = Some(FeatureCache::build(
                        &model,
                        &v.ds,
                        &v.items,
                        level,
                        1,
                        cfg.size,
                        cfg.seed,
                        64,
                        "cache val",
                    )?);
                }
                // Keep caches up to 2 GiB for later runs with the same data and cut (tuning runs).
                if need <= 2 << 30 {
                    c.save(&file)?;
                    if let Some(vc) = val.as_ref().and_then(|v| v.cache.as_ref()) {
                        vc.save(&vfile)?;
                    }
                }
                c
            }
        };
        eprintln!(
            "level-{level} features of {} images x {} views ready in {:.0}s ({:.2} GiB)",
            train_items.len(),
            cfg.views,
            t0.elapsed().as_secs_f64(),
            gib(need)
        );
        Some(c)
    } else {
        None
    };

    let mut optim = optimizer(&cfg);
    let mut state = match resumed {
        Some((state, parts)) => {
            let rec = ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(parts.model))
                .map_err(|e| anyhow!("checkpoint model: {e:?}"))?;
            model = model
                .try_load_record(rec)
                .map_err(|e| anyhow!("checkpoint model: {e:?}"))?;
            optim = optim
                .from_bytes(burn::tensor::Bytes::from_bytes_vec(parts.optimizer))
                .map_err(|e| anyhow!("checkpoint optimizer: {e:?}"))?;
            eprintln!(
                "resuming at epoch {} step {} (global step {})",
                state.epoch + 1,
                state.step_in_epoch,
                state.global_step
            );
            TrainState {
                config: cfg.clone(),
                ..state
            }
        }
        None => TrainState {
            config: cfg.clone(),
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            lr_scale: 1.0,
            best: None,
            bad_epochs: 0,
            history: Vec::new(),
            accum: Accum::default(),
            train_seconds: 0.0,
            wall_seconds: 0.0,
            skipped_images: Vec::new(),
        },
    };
    state.skipped_images = skipped.clone();
    model = apply_freeze(model, &cfg)?;
    let wall_base = state.wall_seconds;

    let steps_per_epoch = cfg.steps_per_epoch.unwrap_or_else(|| match cfg.sampling {
        Sampling::File => file.len().div_ceil(cfg.batch),
        _ => idx.images().div_ceil(cfg.batch),
    });
    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let pb = progress(
            steps_per_epoch,
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
        );
        pb.set_position(state.step_in_epoch as u64);
        let t_epoch = Instant::now();
        while state.step_in_epoch < steps_per_epoch {
            let step = state.step_in_epoch;
            let t_step = Instant::now();
            let plan = data::plan_step(
                cfg.sampling,
                &idx,
                &file,
                cfg.seed,
                epoch,
                step,
                cfg.batch,
                cfg.per_class,
                cfg.views,
            );
            let slots = match &plan {
                StepPlan::Triplets(s) | StepPlan::Mining(s, _) => s.clone(),
            };
            let mut pending = None;
            let (input, from) = match &cache {
                Some(c) => (c.gather(&slots, &ad), level),
                None => {
                    let buf = data::load_batch(
                        &train_ds,
                        &slots,
                        cfg.size,
                        &[cfg.seed, 4, epoch as u64, step as u64],
                        true,
                    )?;
                    step_input(&model, &cfg, buf, slots.len(), &ad, &mut pending)?
                }
            };
            let emb = model.suffix(input, from);
            let (loss, acc, n_triplets) = match &plan {
                StepPlan::Triplets(sl) => {
                    let b = sl.len() / 3;
                    let q = emb.clone().narrow(0, 0, b);
                    let p = emb.clone().narrow(0, b, b);
                    let n = emb.narrow(0, 2 * b, b);
                    let dqp = loss::row_dist(q.clone(), p);
                    let dqn = loss::row_dist(q, n);
                    let a: Vec<f32> = dqp
                        .clone()
                        .detach()
                        .into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| anyhow!("{e:?}"))?;
                    let bn: Vec<f32> = dqn
                        .clone()
                        .detach()
                        .into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| anyhow!("{e:?}"))?;
                    let right = a.iter().zip(&bn).filter(|(x, y)| x < y).count();
                    (
                        loss::ranking_loss(dqp, dqn, cfg.gap),
                        right as f32 / b as f32,
                        b,
                    )
                }
                StepPlan::Mining(_, labels) => {
                    let dist = loss::pairwise_dist(emb);
                    let d_host = to_vec(dist.clone().detach())?;
                    let mined = match cfg.sampling {
                        Sampling::BatchHard => loss::mine_batch_hard(&d_host, labels),
                        _ => loss::mine_semi_hard(&d_host, labels),
                    };
                    let (l, a) = loss::mined_loss(dist, &d_host, &mined, cfg.gap);
                    (l, a, mined.len())
                }
            };
            let lv: f32 = loss.clone().into_scalar();
            if !lv.is_finite() {
                pb.finish_and_clear();
                bail!(
                    "the loss became {lv} at epoch {} step {step}: training stopped; the last good checkpoint is kept in {} \
                     (try a lower --lr)",
                    epoch + 1,
                    ckpt_path.display()
                );
            }
            let grads = step_gradients(loss.backward(), &model, pending)?;
            model = optim.step(lr_policy(&cfg, state.lr_scale)?, model, grads);
            state.accum.loss += lv as f64;
            state.accum.accuracy += acc as f64;
            state.accum.steps += 1;
            state.accum.triplets += n_triplets;
            state.step_in_epoch += 1;
            state.global_step += 1;
            let dt = t_step.elapsed().as_secs_f64();
            state.train_seconds += dt;
            pb.set_message(format!(
                "epoch {}/{} loss {:.4} {:.0} triplets/s",
                epoch + 1,
                cfg.epochs,
                state.accum.loss / state.accum.steps as f64,
                n_triplets as f64 / dt
            ));
            pb.inc(1);
            if cfg.save_every > 0
                && state.global_step % cfg.save_every == 0
                && state.step_in_epoch < steps_per_epoch
            {
                state.wall_seconds = wall_base + t_start.elapsed().as_secs_f64();
                save_checkpoint(run, &model, &optim, &state)?;
                pb.suspend(|| eprintln!("checkpoint: global step {}", state.global_step));
            }
        }
        pb.finish_and_clear();
        let metrics = match &val {
            Some(v) => Some(validate_epoch(
                &model,
                &train_ds,
                &train_items_sorted,
                cache.as_ref(),
                v,
                &cfg,
            )?),
            None => None,
        };
        let a = std::mem::take(&mut state.accum);
        let row = EpochMetrics {
            epoch: epoch + 1,
            steps: a.steps,
            triplets: a.triplets,
            mean_loss: a.loss / a.steps.max(1) as f64,
            triplet_accuracy: a.accuracy / a.steps.max(1) as f64,
            lr: cfg.lr * state.lr_scale,
            p_at_1: metrics.as_ref().map(|m| m.precision_at_k[&1]),
            p_at_10: metrics.as_ref().map(|m| m.precision_at_k[&10]),
            p_at_30: metrics.as_ref().map(|m| m.precision_at_k[&30]),
            map_at_r: metrics.as_ref().map(|m| m.map_at_r),
            train_seconds: state.train_seconds,
            wall_seconds: wall_base + t_start.elapsed().as_secs_f64(),
        };
        eprintln!(
            "epoch {}: loss {:.4}, triplet accuracy {:.3}{} ({:.0}s)",
            row.epoch,
            row.mean_loss,
            row.triplet_accuracy,
            match &metrics {
                Some(m) => format!(
                    ", val P@1 {:.4} P@30 {:.4} MAP@R {:.4}",
                    m.precision_at_k[&1], m.precision_at_k[&30], m.map_at_r
                ),
                None => String::new(),
            },
            t_epoch.elapsed().as_secs_f64()
        );
        // ReduceLROnPlateau on validation MAP@R (higher is better), else on training loss.
        let score = row.map_at_r.unwrap_or(-row.mean_loss);
        if state.best.is_none_or(|b| score > b + 1e-4) {
            state.best = Some(score);
            state.bad_epochs = 0;
        } else {
            state.bad_epochs += 1;
            if state.bad_epochs > cfg.plateau_patience {
                state.lr_scale *= cfg.plateau_factor;
                state.bad_epochs = 0;
                eprintln!("plateau: learning rate x{}", cfg.plateau_factor);
            }
        }
        state.history.push(row);
        state.epoch += 1;
        state.step_in_epoch = 0;
        state.wall_seconds = wall_base + t_start.elapsed().as_secs_f64();
        save_model(run, &model)?;
        write_metrics(run, &state.history)?;
        save_checkpoint(run, &model, &optim, &state)?;
    }
    Ok(TrainSummary {
        run_dir: run.clone(),
        history: state.history,
        skipped_images: skipped.len(),
    })
}

/// Whether training steps run the backbone through deeprank's own CPU pass ([`fast`]) rather than
/// burn's autodiff: on the CPU, unless `DEEPRANK_TRAIN_ENGINE=burn`.
pub fn fast_backbone() -> bool {
    crate::embed::on_cpu() && std::env::var("DEEPRANK_TRAIN_ENGINE").map_or(true, |v| v != "burn")
}

/// The level input of a step from a decoded batch (`[n][3][s][s]`): through [`fast`] when it
/// applies (then `pending` holds its backward pass), else burn's graph. Returns the input and the
/// level it is at.
fn step_input(
    model: &EmbedNet,
    cfg: &TrainConfig,
    buf: Vec<f32>,
    n: usize,
    ad: &Device,
    pending: &mut Option<fast::Pending>,
) -> Result<(net::LevelInput, usize)> {
    let level = cfg.level();
    let s = cfg.size as usize;
    if level < POOLED_LEVEL && fast_backbone() {
        let (input, p) = fast::prefix(model, buf, n, s, level, cfg.bn == BnMode::Train, ad)?;
        *pending = Some(p);
        return Ok((input, POOLED_LEVEL));
    }
    let x = Tensor::from_data(TensorData::new(buf, [n, 3, s, s]), ad);
    Ok((model.prefix(x, level), level))
}

/// The parameters' gradients of a step (burn's, plus [`fast`]'s backbone gradients).
fn step_gradients(
    g: burn::tensor::Gradients,
    model: &EmbedNet,
    pending: Option<fast::Pending>,
) -> Result<GradientsParams> {
    match pending {
        Some(p) => p.gradients(g, model),
        None => Ok(GradientsParams::from_grads(g, model)),
    }
}

/// Times the trainer's own step for `bench/`: `triplets` (q, p, n) triplets from `batch`
/// (`3·triplets` normalised images, q's then p's then n's), forward, ranking loss, backward,
/// optimiser update, with the config's freezing and BatchNorm mode. Runs `warmup` untimed steps,
/// then `steps`; returns the mean seconds per timed step and the last loss.
pub fn time_steps(
    cfg: &TrainConfig,
    batch: Vec<f32>,
    triplets: usize,
    warmup: usize,
    steps: usize,
) -> Result<(f64, f32)> {
    cfg.validate()?;
    let ad = crate::embed::device().autodiff();
    let mut model = apply_freeze(build_net(cfg, &ad)?, cfg)?;
    let mut optim = optimizer(cfg);
    let s = cfg.size as usize;
    let n = 3 * triplets;
    if batch.len() != n * 3 * s * s {
        bail!(
            "the batch holds {} values, not 3·{triplets} images of {s} px",
            batch.len()
        );
    }
    let mut t = 0.0;
    let mut last = f32::NAN;
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let mut pending = None;
        let (input, from) = step_input(&model, cfg, batch.clone(), n, &ad, &mut pending)?;
        let emb = model.suffix(input, from);
        let q = emb.clone().narrow(0, 0, triplets);
        let p = emb.clone().narrow(0, triplets, triplets);
        let ng = emb.narrow(0, 2 * triplets, triplets);
        let loss = loss::ranking_loss(loss::row_dist(q.clone(), p), loss::row_dist(q, ng), cfg.gap);
        last = loss.clone().into_scalar();
        let grads = step_gradients(loss.backward(), &model, pending)?;
        model = optim.step(lr_policy(cfg, 1.0)?, model, grads);
        if i >= warmup {
            t += t0.elapsed().as_secs_f64();
        }
    }
    Ok((t / steps.max(1) as f64, last))
}
