//! The embedding worker: uploads that arrive together are embedded in one batch, then ranked.

use crate::infer::embedder::Embedder;
use crate::search::ann::db::Where;
use crate::search::query::ResultRow;
use crate::serve::ServeOptions;
use crate::serve::live::LiveDb;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;
use tokio::sync::oneshot;

/// Results ranked against one generation of the DB.
pub(super) struct Ranked {
    pub(super) generation: u64,
    pub(super) rows: Vec<ResultRow>,
}

/// What a job wants back: the top rows, or the vector itself (an upload to store).
pub(super) enum Reply {
    Search {
        top: usize,
        wheres: Vec<Where>,
        tx: oneshot::Sender<Result<Ranked, String>>,
    },
    Vector(oneshot::Sender<Result<Vec<f32>, String>>),
}

pub(super) struct Job {
    pub(super) input: Vec<f32>,
    pub(super) reply: Reply,
}

impl Reply {
    fn fail(self, e: String) {
        match self {
            Reply::Search { tx, .. } => {
                let _ = tx.send(Err(e));
            }
            Reply::Vector(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
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
    live: Option<Arc<LiveDb>>,
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
        match emb.embed_batch(&buf, n) {
            Ok(vecs) => {
                // The whole batch ranks against one generation (a store's searches send
                // `Reply::Vector` and rank in the database).
                let view = live.as_ref().map(|l| l.get());
                for (j, v) in jobs.into_iter().zip(vecs.chunks_exact(emb.dim)) {
                    match (j.reply, &view) {
                        (Reply::Search { tx, .. }, None) => {
                            let _ = tx.send(Err("no DB folder to rank against".into()));
                        }
                        (Reply::Search { top, wheres, tx }, Some(view)) => {
                            let rows = view.rank(opts.search, &wheres, v, None, top, None);
                            let _ = tx.send(Ok(Ranked {
                                generation: view.db.state.generation,
                                rows,
                            }));
                        }
                        (Reply::Vector(tx), _) => {
                            let _ = tx.send(Ok(v.to_vec()));
                        }
                    }
                }
            }
            Err(e) => {
                for j in jobs {
                    j.reply.fail(format!("embedding failed: {e:#}"));
                }
            }
        }
    }
}
