//! The seed's "save embeddings" stage: every image of a dataset or collection embedded (batched, decoding overlapped
//! with the network) and streamed into a DB folder.

use crate::data::collection::Collection;
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
    let entries = ds
        .items
        .iter()
        .map(|item| {
            let class = &ds.classes[item.class];
            Entry {
                path: item.path.clone(),
                class_id: class.id.clone(),
                class_name: class.name.clone(),
            }
        })
        .collect();
    embed_entries(emb, entries, &ds.root, out, text, batch)
}

/// Embeds every image of a collection (labelled or not: an image without a class gets empty
/// class fields in the manifest) into a DB at `out`.
pub fn embed_collection(
    emb: &Embedder,
    c: &Collection,
    out: &Path,
    text: Option<&Path>,
    batch: usize,
) -> Result<EmbedReport> {
    embed_entries(emb, collection_entries(c), &c.root, out, text, batch)
}

/// A collection's images as manifest entries (empty class fields for an unlabelled image).
pub fn collection_entries(c: &Collection) -> Vec<Entry> {
    c.items
        .iter()
        .map(|item| {
            let class = item.class.map(|k| &c.classes[k]);
            Entry {
                path: item.path.clone(),
                class_id: class.map(|k| k.id.clone()).unwrap_or_default(),
                class_name: class.map(|k| k.name.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

/// The identity a DB written by `emb` from `data` records.
pub fn meta_for(emb: &Embedder, data: &Path, count: usize) -> Meta {
    Meta {
        model: emb.identity.clone(),
        model_source: emb.source.clone(),
        size: emb.size,
        dim: emb.dim,
        count,
        normalized: emb.normalize,
        data: data.display().to_string(),
        deeprank_version: env!("CARGO_PKG_VERSION").to_string(),
        format: 2,
    }
}

fn embed_entries(
    emb: &Embedder,
    entries: Vec<Entry>,
    root: &Path,
    out: &Path,
    text: Option<&Path>,
    batch: usize,
) -> Result<EmbedReport> {
    let t0 = std::time::Instant::now();
    let mut writer = DbWriter::create(out, emb.dim, text)?;
    let paths: Vec<PathBuf> = entries.iter().map(|e| e.path.clone()).collect();
    let mut count = 0;
    let skipped = embed_stream(emb, &paths, batch, "embed", |i, v| {
        count += 1;
        writer.push(&entries[i], v)
    })?;
    if count == 0 {
        bail!(
            "none of the {} images could be decoded; nothing written",
            entries.len()
        );
    }
    let db = writer.finish(meta_for(emb, root, count))?;
    Ok(EmbedReport {
        db,
        count,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
