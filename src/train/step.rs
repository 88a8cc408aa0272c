//! One training step, shared by the training loop and the benchmark (`bench-train`): the level
//! input (through deeprank's own CPU backbone pass when it applies, else burn's graph), the
//! embedding, the ranking loss (fixed triplets or mined in the batch), backward and the optimiser
//! update.

use crate::data::batch::decode_batch;
use crate::data::dataset::{Dataset, Split};
use crate::model::device::{device, on_cpu, to_vec};
use crate::model::net::{EmbedNet, LevelInput};
use crate::train::cache::FeatureCache;
use crate::train::config::{BnMode, Recipe, TrainConfig, build_net};
use crate::train::glue::{self, Pending};
use crate::train::loss;
use crate::train::optim::{apply_freeze, lr_policy, optimizer};
use crate::train::plan::{Sampling, Slot};
use anyhow::{Result, bail};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Whether training steps run the backbone through deeprank's own CPU pass ([`crate::cpu::pass`])
/// rather than burn's autodiff: on the CPU, unless `DEEPRANK_TRAIN_ENGINE=burn`.
pub fn fast_backbone() -> bool {
    on_cpu() && std::env::var("DEEPRANK_TRAIN_ENGINE").map_or(true, |v| v != "burn")
}

/// The level input of a step from a decoded batch (`[n][3][s][s]`): through the CPU pass when it
/// applies (then `pending` holds its backward pass), else burn's graph. Returns the input and the
/// level it is at.
pub fn step_input(
    model: &EmbedNet,
    cfg: &TrainConfig,
    buf: Vec<f32>,
    n: usize,
    ad: &Device,
    pending: &mut Option<Pending>,
) -> Result<(LevelInput, usize)> {
    let level = cfg.level();
    let s = cfg.size as usize;
    if level < model.pooled_level() && fast_backbone() {
        let (input, p) = glue::prefix(model, buf, n, s, level, cfg.bn == BnMode::Train, ad)?;
        *pending = Some(p);
        return Ok((input, model.pooled_level()));
    }
    let x = Tensor::from_data(TensorData::new(buf, [n, 3, s, s]), ad);
    Ok((model.prefix(x, level), level))
}

/// The level input of a step from the feature cache: through the CPU pass from the cached
/// activations when part of the backbone trains and the pass applies (then `pending` holds its
/// backward pass), else the cached input for burn's graph. Returns the input and its level.
pub fn cached_input(
    model: &EmbedNet,
    cfg: &TrainConfig,
    cache: &FeatureCache,
    slots: &[Slot],
    ad: &Device,
    pending: &mut Option<Pending>,
) -> Result<(LevelInput, usize)> {
    let level = cfg.level();
    if level < model.pooled_level() && fast_backbone() {
        let train_bn = cfg.bn == BnMode::Train;
        let (input, p) = glue::cached(model, cache, slots, level, train_bn, ad)?;
        *pending = Some(p);
        return Ok((input, model.pooled_level()));
    }
    Ok((cache.gather(slots, ad), level))
}

/// The parameters' gradients of a step (burn's, plus the CPU pass's backbone gradients).
fn step_gradients(
    g: burn::tensor::Gradients,
    model: &EmbedNet,
    pending: Option<Pending>,
) -> Result<GradientsParams> {
    match pending {
        Some(p) => p.gradients(g, model),
        None => Ok(GradientsParams::from_grads(g, model)),
    }
}

/// What the loss of a step is over.
pub enum Targets<'a> {
    /// `3b` embeddings: b queries, then their positives, then their negatives.
    Triplets(usize),
    /// A P×K batch with its class labels: triplets mined in the batch.
    Mining(&'a [usize]),
}

/// What one step did.
pub struct Outcome {
    pub loss: f32,
    /// Share of triplets already ordered right (D(q,p) < D(q,n)).
    pub accuracy: f32,
    pub triplets: usize,
}

/// The ranking loss of a step's embeddings, its triplet accuracy and number of triplets.
fn step_loss(
    emb: Tensor<2>,
    targets: &Targets,
    cfg: &TrainConfig,
) -> Result<(Tensor<1>, f32, usize)> {
    Ok(match targets {
        Targets::Triplets(b) => {
            let b = *b;
            let q = emb.clone().narrow(0, 0, b);
            let p = emb.clone().narrow(0, b, b);
            let n = emb.narrow(0, 2 * b, b);
            let dqp = loss::row_dist(q.clone(), p);
            let dqn = loss::row_dist(q, n);
            let a = to_vec(dqp.clone().detach())?;
            let bn = to_vec(dqn.clone().detach())?;
            let right = a.iter().zip(&bn).filter(|(x, y)| x < y).count();
            (
                loss::ranking_loss(dqp, dqn, cfg.gap),
                right as f32 / b as f32,
                b,
            )
        }
        Targets::Mining(labels) => {
            let dist = loss::pairwise_dist(emb);
            let d_host = to_vec(dist.clone().detach())?;
            let mined = match cfg.sampling {
                Sampling::BatchHard => loss::mine_batch_hard(&d_host, labels),
                _ => loss::mine_semi_hard(&d_host, labels),
            };
            let (l, a) = loss::mined_loss(dist, &d_host, &mined, cfg.gap);
            (l, a, mined.len())
        }
    })
}

/// One step from the level input `input` at level `from`: embedding, loss, backward (with the CPU
/// pass's `pending` backward when there is one) and the optimiser update at the learning rates
/// scaled by `lr_scale`. A non-finite loss leaves the model as it was (the caller stops).
#[allow(clippy::too_many_arguments)]
pub fn step(
    model: EmbedNet,
    optim: &mut ModuleOptimizer,
    cfg: &TrainConfig,
    input: LevelInput,
    from: usize,
    pending: Option<Pending>,
    targets: Targets,
    lr_scale: f64,
) -> Result<(EmbedNet, Outcome)> {
    let emb = model.suffix(input, from);
    let (loss, accuracy, triplets) = step_loss(emb, &targets, cfg)?;
    let lv: f32 = loss.clone().into_scalar();
    let out = Outcome {
        loss: lv,
        accuracy,
        triplets,
    };
    if !lv.is_finite() {
        return Ok((model, out));
    }
    let grads = step_gradients(loss.backward(), &model, pending)?;
    let model = optim.step(lr_policy(cfg, lr_scale)?, model, grads);
    Ok((model, out))
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
    let ad = device().autodiff();
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
        let targets = Targets::Triplets(triplets);
        let (m, out) = step(model, &mut optim, cfg, input, from, pending, targets, 1.0)?;
        model = m;
        last = out.loss;
        if i >= warmup {
            t += t0.elapsed().as_secs_f64();
        }
    }
    Ok((t / steps.max(1) as f64, last))
}

/// Times the trainer's step (seed recipe at `size` px with a `dim`-d head) on a fixed batch of the
/// first `3·triplets` images of `data`'s val split: mean seconds per step after `warmup`, and the
/// last loss.
pub fn time_train(
    data: &Path,
    size: u32,
    triplets: usize,
    dim: usize,
    warmup: usize,
    steps: usize,
) -> Result<(f64, f32)> {
    let ds = Dataset::open(data, Split::Val)?;
    let paths: Vec<PathBuf> = ds
        .items
        .iter()
        .take(3 * triplets)
        .map(|i| i.path.clone())
        .collect();
    let (buf, ok, skipped) = decode_batch(&paths, size);
    if ok.len() < 3 * triplets || !skipped.is_empty() {
        anyhow::bail!(
            "bench-train needs {} decodable images in {}",
            3 * triplets,
            data.display()
        );
    }
    let mut cfg = TrainConfig::recipe(Recipe::Seed, data.to_path_buf());
    cfg.size = size;
    cfg.dim = dim;
    time_steps(&cfg, buf, triplets, warmup, steps)
}
