//! The embedding worker: uploads that arrive together are embedded in one batch, then ranked.

use crate::infer::embedder::Embedder;
use crate::search::query::{self, ResultRow};
use crate::serve::ServeOptions;
use crate::store::db::Db;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;
use tokio::sync::oneshot;

pub(super) struct Job {
    pub(super) input: Vec<f32>,
    pub(super) top: usize,
    pub(super) reply: oneshot::Sender<Result<Vec<ResultRow>, String>>,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) busy: AtomicU64,
    pub(super) client_errors: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) embedded: AtomicU64,
    pub(super) largest_batch: AtomicUsize,
}

/// The embedding worker: takes a job, waits briefly for more, embeds them as one batch, ranks.
pub(super) fn worker(
    emb: Embedder,
    db: Arc<Db>,
    rx: Receiver<Job>,
    opts: ServeOptions,
    counters: Arc<Counters>,
) {
    let per = 3 * (emb.size as usize).pow(2);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + opts.batch_wait;
        while jobs.len() < opts.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let n = jobs.len();
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.embedded.fetch_add(n as u64, Ordering::Relaxed);
        counters.largest_batch.fetch_max(n, Ordering::Relaxed);
        let mut buf = Vec::with_capacity(per * n);
        for j in &jobs {
            buf.extend_from_slice(&j.input);
        }
        match emb.embed_batch(buf, n) {
            Ok(vecs) => {
                for (j, v) in jobs.into_iter().zip(vecs.chunks_exact(emb.dim)) {
                    let rows = query::rank(&db, v, &[None], j.top)
                        .pop()
                        .unwrap_or_default();
                    let _ = j.reply.send(Ok(rows));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(format!("embedding failed: {e:#}")));
                }
            }
        }
    }
}
