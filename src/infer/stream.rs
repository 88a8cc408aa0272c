//! Embedding many files: batches decoded in parallel, the next batch decoded while the network runs
//! on the current one, vectors handed on in order.

use crate::data::batch::{decode_batch, decode_batch_into};
use crate::data::skipped::Skipped;
use crate::infer::embedder::Embedder;
use crate::progress::progress;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Embeds `paths` in batches (decoding batch i+1 while the network runs on batch i) and hands each
/// vector to `sink(position, vector)` in order. Images that fail to decode are reported and skipped.
pub fn embed_stream(
    emb: &Embedder,
    paths: &[PathBuf],
    batch: usize,
    label: &str,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<Vec<Skipped>> {
    let batch = batch.max(1);
    let pb = progress(paths.len(), label);
    let chunks: Vec<&[PathBuf]> = paths.chunks(batch).collect();
    let mut skipped = Vec::new();
    let mut pending = chunks.first().map(|c| decode_batch(c, emb.size));
    let mut base = 0;
    // The batch before last's buffer: the next batch decodes into it (its pages stay mapped).
    let mut spare = Vec::new();
    for (ci, chunk) in chunks.iter().enumerate() {
        let (buf, ok, sk) = pending.take().context("decoded batch")?;
        let n = ok.iter().filter(|&&o| o).count();
        let next = chunks.get(ci + 1);
        let reuse = std::mem::take(&mut spare);
        let (vecs, next_dec) = rayon::join(
            || emb.embed_batch(&buf, n),
            || next.map(|c| decode_batch_into(c, emb.size, reuse)),
        );
        pending = next_dec;
        spare = buf;
        let vecs = vecs?;
        for s in &sk {
            pb.suspend(|| eprintln!("skipped {}: {}", s.path.display(), s.reason));
        }
        skipped.extend(sk);
        let mut rows = vecs.chunks_exact(emb.dim);
        for (j, o) in ok.into_iter().enumerate() {
            if o {
                sink(base + j, rows.next().context("missing vector")?)?;
            }
        }
        base += chunk.len();
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(skipped)
}
