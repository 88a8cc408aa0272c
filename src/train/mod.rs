//! `deeprank train`: fine-tunes the pretrained network with the ranking loss (the seed's `main.py`),
//! with in-batch mining, frozen-prefix feature caching, crash-safe checkpoints, per-epoch metrics
//! and a plot. The loop is here; its parts are in the submodules.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod glue;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod plan;
pub mod report;
pub mod step;
pub mod validate;

use crate::data::dataset::{Dataset, Split};
use crate::data::sampler::{self, Triplet};
use crate::model::device::device;
use crate::model::net::EmbedNet;
use crate::model::run::{CONFIG, save_model};
use crate::progress::progress;
use crate::train::cache::FeatureCache;
use crate::train::checkpoint::{
    Accum, CHECKPOINT, Parts, TrainState, restore, resume_point, save_checkpoint,
};
use crate::train::config::{TrainConfig, build_net};
use crate::train::optim::{apply_freeze, optimizer, plateau};
use crate::train::plan::{ClassIndex, Sampling, StepPlan, load_batch, plan_step, readable};
use crate::train::report::{EpochMetrics, write_metrics};
use crate::train::step::{Targets, cached_input, fast_backbone, step, step_input};
use crate::train::validate::{Validation, validate_epoch};
use anyhow::{Context, Result, bail};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub history: Vec<EpochMetrics>,
    pub skipped_images: usize,
}

/// Options of one invocation that are not part of the run's identity.
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub resume: bool,
    pub force: bool,
}

/// The training set: its readable items by class, in dataset order, and the triplet file's
/// usable triplets (`--sampling file`).
struct TrainData {
    ds: Dataset,
    idx: ClassIndex,
    /// The items of `idx`, sorted.
    items: Vec<usize>,
    file: Vec<Triplet>,
}

impl TrainData {
    /// Opens the training set and checks its images; the unreadable ones are returned.
    fn open(cfg: &TrainConfig) -> Result<(Self, Vec<String>)> {
        let ds = Dataset::open(&cfg.data, Split::Train)
            .map_err(|e| e.context("training needs labelled images"))?;
        eprintln!("train: {}", ds.summary());
        let (usable, skipped) = readable(&ds);
        let idx = ClassIndex::new(&ds, &usable)?;
        let mut items: Vec<usize> = idx.by_class.iter().flatten().copied().collect::<Vec<_>>();
        items.sort();
        let file: Vec<Triplet> = match (&cfg.triplets, cfg.sampling) {
            (Some(f), Sampling::File) => {
                let t = sampler::read_triplets(&ds, f)?;
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
        Ok((
            TrainData {
                ds,
                idx,
                items,
                file,
            },
            skipped,
        ))
    }
}

/// What the loop reads: the config, the data, the caches and the clocks.
struct Loop<'a> {
    cfg: &'a TrainConfig,
    run: &'a Path,
    data: &'a TrainData,
    val: Option<&'a Validation>,
    cache: Option<&'a FeatureCache>,
    ad: Device,
    steps_per_epoch: usize,
    t_start: Instant,
    wall_base: f64,
}

/// Trains (or resumes) a run.
pub fn train(cfg: TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let run = &opts.run_dir;
    let resumed = resume_point(&cfg, run, opts.resume, opts.force)?;
    cfg.validate()?;
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))?;
    std::fs::write(run.join(CONFIG), serde_json::to_string_pretty(&cfg)?)?;

    let (data, mut skipped) = TrainData::open(&cfg)?;
    let ad = device().autodiff();
    let model = build_net(&cfg, &ad)?;
    // Memory: refuse what cannot fit instead of dying mid-run.
    let avail = memory::check_step(&cfg)?;
    let mut val = match &cfg.val {
        Some(v) => Some(Validation::open(v, &mut skipped)?),
        None => None,
    };
    let cache = cache::prepare(&cfg, &model, &data.ds, &data.items, val.as_mut(), avail)?;
    let (mut model, mut optim, mut state) = start(&cfg, model, resumed)?;
    state.skipped_images = skipped.clone();
    model = apply_freeze(model, &cfg)?;
    if cfg.level() < cfg.pooled_level() {
        eprintln!(
            "trainable backbone: {}",
            match (fast_backbone(), cfg.cache) {
                (true, true) => format!(
                    "deeprank's CPU pass from the level-{} feature cache",
                    cfg.level()
                ),
                (true, false) => "deeprank's CPU pass".into(),
                (false, _) => "burn's autodiff".into(),
            }
        );
    }
    let steps_per_epoch = cfg.steps_per_epoch.unwrap_or_else(|| match cfg.sampling {
        Sampling::File => data.file.len().div_ceil(cfg.batch),
        _ => data.idx.images().div_ceil(cfg.batch),
    });
    let l = Loop {
        cfg: &cfg,
        run,
        data: &data,
        val: val.as_ref(),
        cache: cache.as_ref(),
        ad,
        steps_per_epoch,
        t_start,
        wall_base: state.wall_seconds,
    };
    while state.epoch < cfg.epochs {
        let t_epoch = Instant::now();
        model = run_epoch(&l, model, &mut optim, &mut state)?;
        // The CPU pass's kept buffers: an epoch's last, smaller batch leaves some that fit no step.
        crate::cpu::pool::clear();
        end_epoch(&l, &model, &optim, &mut state, t_epoch)?;
    }
    Ok(TrainSummary {
        run_dir: run.clone(),
        history: state.history,
        skipped_images: skipped.len(),
    })
}

/// The optimiser and the state to start from: a fresh run's, or the checkpoint's (its model and
/// optimiser records loaded).
fn start(
    cfg: &TrainConfig,
    model: EmbedNet,
    resumed: Option<(TrainState, Parts)>,
) -> Result<(EmbedNet, ModuleOptimizer, TrainState)> {
    let optim = optimizer(cfg);
    Ok(match resumed {
        Some((state, parts)) => {
            let (model, optim) = restore(parts, model, optim)?;
            eprintln!(
                "resuming at epoch {} step {} (global step {})",
                state.epoch + 1,
                state.step_in_epoch,
                state.global_step
            );
            let state = TrainState {
                config: cfg.clone(),
                ..state
            };
            (model, optim, state)
        }
        None => {
            let state = TrainState {
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
            };
            (model, optim, state)
        }
    })
}

/// The steps of the current epoch from where `state` stands, with checkpoints every
/// `--save-every` steps.
fn run_epoch(
    l: &Loop,
    mut model: EmbedNet,
    optim: &mut ModuleOptimizer,
    state: &mut TrainState,
) -> Result<EmbedNet> {
    let cfg = l.cfg;
    let epoch = state.epoch;
    let pb = progress(
        l.steps_per_epoch,
        &format!("epoch {}/{}", epoch + 1, cfg.epochs),
    );
    pb.set_position(state.step_in_epoch as u64);
    while state.step_in_epoch < l.steps_per_epoch {
        let step_no = state.step_in_epoch;
        let t_step = Instant::now();
        let d = l.data;
        let plan = plan_step(
            cfg.sampling,
            &d.idx,
            &d.file,
            cfg.seed,
            epoch,
            step_no,
            cfg.batch,
            cfg.per_class,
            cfg.views,
        );
        let (slots, targets) = match &plan {
            StepPlan::Triplets(s) => (s.clone(), Targets::Triplets(s.len() / 3)),
            StepPlan::Mining(s, labels) => (s.clone(), Targets::Mining(labels)),
        };
        let mut pending = None;
        let (input, from) = match l.cache {
            Some(c) => cached_input(&model, cfg, c, &slots, &l.ad, &mut pending)?,
            None => {
                let rng = [cfg.seed, 4, epoch as u64, step_no as u64];
                let buf = load_batch(&d.ds, &slots, cfg.size, &rng, true)?;
                step_input(&model, cfg, buf, slots.len(), &l.ad, &mut pending)?
            }
        };
        let (m, out) = step(
            model,
            optim,
            cfg,
            input,
            from,
            pending,
            targets,
            state.lr_scale,
        )?;
        model = m;
        if !out.loss.is_finite() {
            pb.finish_and_clear();
            bail!(
                "the loss became {} at epoch {} step {step_no}: training stopped; the last good checkpoint is kept in {} \
                 (try a lower --lr)",
                out.loss,
                epoch + 1,
                l.run.join(CHECKPOINT).display()
            );
        }
        state.accum.loss += out.loss as f64;
        state.accum.accuracy += out.accuracy as f64;
        state.accum.steps += 1;
        state.accum.triplets += out.triplets;
        state.step_in_epoch += 1;
        state.global_step += 1;
        let dt = t_step.elapsed().as_secs_f64();
        state.train_seconds += dt;
        pb.set_message(format!(
            "epoch {}/{} loss {:.4} {:.0} triplets/s",
            epoch + 1,
            cfg.epochs,
            state.accum.loss / state.accum.steps as f64,
            out.triplets as f64 / dt
        ));
        pb.inc(1);
        if cfg.save_every > 0
            && state.global_step.is_multiple_of(cfg.save_every)
            && state.step_in_epoch < l.steps_per_epoch
        {
            state.wall_seconds = l.wall_base + l.t_start.elapsed().as_secs_f64();
            save_checkpoint(l.run, &model, optim, state)?;
            pb.suspend(|| eprintln!("checkpoint: global step {}", state.global_step));
        }
    }
    pb.finish_and_clear();
    Ok(model)
}

/// The end of an epoch: validation, the metrics row, the learning-rate plateau, and the model,
/// metrics, plot and checkpoint written.
fn end_epoch(
    l: &Loop,
    model: &EmbedNet,
    optim: &ModuleOptimizer,
    state: &mut TrainState,
    t_epoch: Instant,
) -> Result<()> {
    let cfg = l.cfg;
    let epoch = state.epoch;
    let metrics = match l.val {
        Some(v) => Some(validate_epoch(
            model,
            &l.data.ds,
            &l.data.items,
            l.cache,
            v,
            cfg,
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
        wall_seconds: l.wall_base + l.t_start.elapsed().as_secs_f64(),
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
    if plateau(
        &mut state.best,
        &mut state.bad_epochs,
        &mut state.lr_scale,
        score,
        cfg.plateau_factor,
        cfg.plateau_patience,
    ) {
        eprintln!("plateau: learning rate x{}", cfg.plateau_factor);
    }
    state.history.push(row);
    state.epoch += 1;
    state.step_in_epoch = 0;
    state.wall_seconds = l.wall_base + l.t_start.elapsed().as_secs_f64();
    save_model(l.run, model)?;
    write_metrics(l.run, &state.history)?;
    save_checkpoint(l.run, model, optim, state)
}
