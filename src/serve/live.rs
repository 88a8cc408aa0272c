//! The server's view of the DB, kept current without a restart: a poller reads `state.json` (a few
//! hundred bytes) every `reload_every` and reopens the DB when its commit record changed;
//! `POST /api/reload` and uploads do the same at once. A request takes the view current when it
//! starts and keeps it to the end, so it sees one commit whole, never a half-written row.

use crate::infer::embedder::Embedder;
use crate::search::ann::db::{self as ann_db, DbIndex, Mode, Request, Where};
use crate::search::query::{self, ResultRow};
use crate::store::db::Db;
use crate::store::state;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// One opened generation of the DB, its ANN index, and what the page shows of it.
pub(super) struct View {
    pub(super) db: Db,
    pub(super) classes: usize,
    pub(super) index: Option<DbIndex>,
    /// Why the commit's index could not be opened (searches then scan exactly).
    pub(super) index_error: Option<String>,
}

impl View {
    fn new(db: Db) -> View {
        let classes = db.class_count();
        let (index, index_error) = match ann_db::open(&db) {
            Ok(ix) => (ix, None),
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("note: searching exactly: {msg}");
                (None, Some(msg))
            }
        };
        View {
            db,
            classes,
            index,
            index_error,
        }
    }

    /// The top `top` rows for the query vector `q` among those `wheres` allow (`exclude`: a row
    /// left out, the query's own), through the index when there is one and `mode` asks for it.
    pub(super) fn rank(
        &self,
        mode: Mode,
        wheres: &[Where],
        q: &[f32],
        class: Option<String>,
        top: usize,
        exclude: Option<usize>,
    ) -> Vec<ResultRow> {
        let mask = (!wheres.is_empty()).then(|| ann_db::mask(&self.db, wheres));
        let exclude = [exclude];
        let req = Request {
            mode,
            mask: mask.as_deref(),
            exclude: Some(&exclude),
        };
        query::rank_with(&self.db, self.index.as_ref(), &req, q, &[class], top)
            .0
            .pop()
            .unwrap_or_default()
    }
}

pub(super) struct LiveDb {
    dir: PathBuf,
    current: RwLock<Arc<View>>,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// The model the server embeds with (a reopened DB must still match it).
    model: (String, u32, bool, usize),
}

impl LiveDb {
    pub(super) fn new(db: Db, emb: &Embedder) -> LiveDb {
        LiveDb {
            dir: db.dir.clone(),
            model: (emb.identity.clone(), emb.size, emb.normalize, emb.dim),
            current: RwLock::new(Arc::new(View::new(db))),
            reloading: Mutex::new(()),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current view (cheap: an Arc clone).
    pub(super) fn get(&self) -> Arc<View> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reopens the DB when its commit record differs from the view's. Returns whether it did.
    pub(super) fn reload(&self) -> Result<bool> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let now = state::read(&self.dir)?;
        let cur = self.get();
        let same = match &now {
            Some(st) => *st == cur.db.state,
            None => cur.db.state.format == 1,
        };
        if same {
            return Ok(false);
        }
        let db = Db::open(&self.dir)?;
        let (model, size, normalized, dim) = &self.model;
        let m = &db.meta;
        if (&m.model, &m.size, &m.normalized, &m.dim) != (model, size, normalized, dim) {
            bail!(
                "{} now holds vectors of model {} at {} px: restart the server to serve it",
                self.dir.display(),
                m.model,
                m.size
            );
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(View::new(db));
        Ok(true)
    }

    /// Polls the commit record until the process ends (errors are printed, the view kept).
    pub(super) fn poll(self: Arc<Self>, every: Duration) -> Result<()> {
        std::thread::Builder::new()
            .name("db-reload".into())
            .spawn(move || {
                let mut last_err = String::new();
                loop {
                    std::thread::sleep(every);
                    match self.reload() {
                        Ok(_) => last_err.clear(),
                        Err(e) => {
                            let msg = format!("{e:#}");
                            if msg != last_err {
                                eprintln!("reload of {} failed: {msg}", self.dir.display());
                                last_err = msg;
                            }
                        }
                    }
                }
            })
            .context("cannot start the reload thread")?;
        Ok(())
    }
}
