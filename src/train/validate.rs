//! Validation during training: the val queries and the training items embedded with the model in
//! inference mode (from the feature caches when there are), scored per epoch.

use crate::cpu::engine::cpu_engine;
use crate::data::dataset::{Dataset, Split};
use crate::infer::trained::embed_host;
use crate::model::device::{device, to_vec};
use crate::model::net::EmbedNet;
use crate::progress::progress;
use crate::search::eval::{Metrics, evaluate_vectors};
use crate::train::cache::FeatureCache;
use crate::train::config::TrainConfig;
use crate::train::plan::{Slot, load_batch, readable};
use anyhow::Result;
use burn::prelude::*;
use std::path::{Path, PathBuf};

/// Embeds `items` of `ds` with the model in inference mode (from the cache when there is one).
fn embed_items(
    model: &EmbedNet,
    ds: &Dataset,
    items: &[usize],
    cache: Option<&FeatureCache>,
    cfg: &TrainConfig,
    label: &str,
) -> Result<Vec<f32>> {
    let dev = device();
    let level = cfg.level();
    let s = cfg.size as usize;
    let mut out = Vec::with_capacity(items.len() * cfg.dim);
    let pb = progress(items.len(), label);
    let bs = if cache.is_some() { 256 } else { 64 };
    let engine = match cache {
        Some(_) => None,
        None => cpu_engine(&model.backbone)?,
    };
    for chunk in items.chunks(bs) {
        let slots: Vec<Slot> = chunk.iter().map(|&item| Slot { item, view: 0 }).collect();
        let e = match cache {
            Some(c) => model.suffix(c.gather(&slots, &dev), level),
            None => {
                let buf = load_batch(ds, &slots, cfg.size, &[], false)?;
                embed_host(model, engine.as_ref(), &buf, chunk.len(), s, &dev)
            }
        };
        out.extend(to_vec(e)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// The validation queries: their dataset, the readable items, and their feature cache (with
/// `--cache`).
pub struct Validation {
    pub ds: Dataset,
    pub items: Vec<usize>,
    pub cache: Option<FeatureCache>,
}

impl Validation {
    /// Opens the validation set and checks its images; the unreadable ones are added to `skipped`.
    pub fn open(dir: &Path, skipped: &mut Vec<String>) -> Result<Self> {
        let ds = Dataset::open(dir, Split::Val)?;
        eprintln!("val: {}", ds.summary());
        let (ok, sk) = readable(&ds);
        skipped.extend(sk);
        let items: Vec<usize> = (0..ds.items.len()).filter(|&i| ok[i]).collect();
        Ok(Validation {
            ds,
            items,
            cache: None,
        })
    }
}

/// P@1, P@10, P@30 and MAP@R of the validation queries against the training items, embedded
/// with the model in inference mode.
pub fn validate_epoch(
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
    let (metrics, _) = evaluate_vectors(
        &dbv,
        cfg.dim,
        &|_| false,
        &dbc,
        &dbp,
        &qv,
        &qc,
        &qp,
        &[1, 10, 30],
    );
    Ok(metrics)
}
