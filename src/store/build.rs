//! The seed's "save embeddings" stage: every image of a dataset embedded (batched, decoding overlapped
//! with the network) and streamed into a DB folder.

use crate::data::dataset::Dataset;
use crate::data::skipped::Skipped;
use crate::infer::embedder::Embedder;
use crate::infer::stream::embed_stream;
use crate::store::db::{DbWriter, Entry, Meta};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// What `embed` did.
#[derive(Debug)]
pub struct EmbedReport {
    pub db: PathBuf,
    pub count: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
}

/// Embeds every image of `ds` into a DB at `out` (and the seed's text form at `text`).
pub fn embed_dataset(
    emb: &Embedder,
    ds: &Dataset,
    out: &Path,
    text: Option<&Path>,
    batch: usize,
) -> Result<EmbedReport> {
    let t0 = std::time::Instant::now();
    let mut writer = DbWriter::create(out, emb.dim, text)?;
    let paths: Vec<PathBuf> = ds.items.iter().map(|i| i.path.clone()).collect();
    let mut count = 0;
    let skipped = embed_stream(emb, &paths, batch, "embed", |i, v| {
        let item = &ds.items[i];
        let class = &ds.classes[item.class];
        let entry = Entry {
            path: item.path.clone(),
            class_id: class.id.clone(),
            class_name: class.name.clone(),
        };
        count += 1;
        writer.push(&entry, v)
    })?;
    if count == 0 {
        bail!(
            "none of the {} images could be decoded; nothing written",
            ds.items.len()
        );
    }
    let meta = Meta {
        model: emb.identity.clone(),
        model_source: emb.source.clone(),
        size: emb.size,
        dim: emb.dim,
        count,
        normalized: emb.normalize,
        data: ds.root.display().to_string(),
        deeprank_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let db = writer.finish(meta)?;
    Ok(EmbedReport {
        db,
        count,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
