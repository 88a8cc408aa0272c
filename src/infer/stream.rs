//! Embedding many files: batches decoded in parallel, each step running three things at once (the
//! tail of batch i, the front of batch i+1, the decoding of batch i+2), vectors handed on in order.

use crate::data::batch::{decode_batch, decode_batch_into};
use crate::data::skipped::Skipped;
use crate::infer::embedder::{Begun, Embedder};
use crate::progress::progress;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Embeds `paths` in batches and hands each vector to `sink(position, vector)` in order. Images
/// that fail to decode are reported and skipped.
///
/// Each step finishes the batch begun in the step before ([`Embedder::embed_finish`]: on the
/// engine, its grouped tail), begins the next ([`Embedder::embed_begin`]: its front blocks) and
/// decodes the one after, all on the same pool: a thread done with its share of one batch takes
/// work of the next instead of waiting for the other thread's last task (a tail group is 8
/// images' late blocks). `embed` of the 2,000 mini val images on 2 threads used 1.76–1.82 CPUs at
/// 128 px with each batch run alone, 1.84–1.88 so.
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
    // The batch begun in the step before: which of its files decoded, and its first position.
    let mut begun: Option<(Begun, Vec<bool>, usize)> = None;
    let mut base = 0;
    // A buffer no batch needs any more (its front has run): the next batch decodes into it, so
    // its pages stay mapped.
    let mut spare = Vec::new();
    for ci in 0..=chunks.len() {
        let next = chunks.get(ci + 1);
        let reuse = std::mem::take(&mut spare);
        let current = pending.take();
        let prev = begun.take();
        let (done, (started, next_dec)) = rayon::join(
            || prev.map(|(b, ok, at)| (emb.embed_finish(b), ok, at)),
            || {
                rayon::join(
                    || {
                        current.map(|(buf, ok, sk)| {
                            let n = ok.iter().filter(|&&o| o).count();
                            (emb.embed_begin(&buf, n), buf, ok, sk)
                        })
                    },
                    || next.map(|c| decode_batch_into(c, emb.size, reuse)),
                )
            },
        );
        pending = next_dec;
        if let Some((vecs, ok, at)) = done {
            let vecs = vecs?;
            let mut rows = vecs.chunks_exact(emb.dim);
            for (j, o) in ok.iter().enumerate() {
                if *o {
                    sink(at + j, rows.next().context("missing vector")?)?;
                }
            }
            pb.inc(ok.len() as u64);
        }
        if let Some((b, buf, ok, sk)) = started {
            for s in &sk {
                pb.suspend(|| eprintln!("skipped {}: {}", s.path.display(), s.reason));
            }
            skipped.extend(sk);
            spare = buf;
            let len = ok.len();
            begun = Some((b, ok, base));
            base += len;
        }
    }
    pb.finish_and_clear();
    Ok(skipped)
}
