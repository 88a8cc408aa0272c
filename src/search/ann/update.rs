//! Building a DB's ANN index and keeping it current, under the DB's writer lock and commit record.
//! The graph is written whole to a new file (`ann-GENERATION.hnsw`), fsynced with its folder, and
//! made the index by the next commit of `state.json` (`index: {file, rows}`); the file it replaces
//! is deleted after. A kill -9 anywhere leaves the old commit, whose index file is untouched (a new
//! file no commit names is deleted by the next writer), or the new one. Rows added since (by `add`,
//! `sync` or a server's uploads) are searched exactly until [`refresh`] inserts them; removed rows
//! are tombstones from the DB's own `removed.tsv`, never written into the graph; a compaction
//! renumbers rows and drops the index, which [`refresh`] then rebuilds with the same parameters.

use super::db::open;
use super::{Hnsw, Params};
use crate::store::commit::{Wait, Writer};
use crate::store::db::Db;
use crate::store::state::{self, IndexRef};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// DB rows used as queries to calibrate `--recall` when an index is built.
pub const CALIBRATION_SAMPLES: usize = 200;

/// An index written and committed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Built {
    pub file: PathBuf,
    /// Rows indexed (all the DB's committed rows).
    pub rows: usize,
    /// Rows inserted into the graph by this change (all of them for a build).
    pub inserted: usize,
    /// Whether the graph was built from scratch (else extended).
    pub rebuilt: bool,
    pub bytes: u64,
    pub seconds: f64,
    pub m: usize,
    pub ef_construction: usize,
    /// `(ef, recall@10)` measured at build time.
    pub calibration: Vec<(u32, f32)>,
}

/// `deeprank index`: builds a new index over every committed row of the DB at `dir` (removed rows
/// are tombstones), calibrates it and commits it, replacing any index it had.
pub fn build(dir: &Path, params: &Params) -> Result<Built> {
    if !(2..=255).contains(&params.m) || params.ef_construction == 0 {
        bail!("--m must be between 2 and 255 and --ef-construction at least 1");
    }
    let mut w = Writer::open(dir, Wait::Block)?;
    build_with(&mut w, params)
}

fn build_with(w: &mut Writer, params: &Params) -> Result<Built> {
    let t0 = Instant::now();
    let db = w.db();
    if db.is_empty() {
        bail!(
            "{} has no live rows to index: add images first",
            db.dir.display()
        );
    }
    let data = db.vectors.data();
    let mut h = Hnsw::build(data, db.meta.dim, params);
    h.set_deleted(|i| db.is_removed(i as usize));
    h.calibrate(data, CALIBRATION_SAMPLES);
    let rows = db.rows();
    commit(w, h, rows, rows, true, t0)
}

/// Writes `h` to a new file and commits it as the index over `rows` rows.
fn commit(
    w: &mut Writer,
    h: Hnsw,
    rows: usize,
    inserted: usize,
    rebuilt: bool,
    t0: Instant,
) -> Result<Built> {
    let name = w.new_index_name();
    let bytes = w.write_index_file(&name, |f| h.save(f))?;
    w.commit_index(Some(IndexRef {
        file: name.clone(),
        rows: rows as u64,
    }))?;
    let p = h.params();
    Ok(Built {
        file: w.db().dir.join(name),
        rows,
        inserted,
        rebuilt,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        m: p.m,
        ef_construction: p.ef_construction,
        calibration: h.calibration.clone(),
    })
}

/// The build parameters of the DB's current index (read from its file's header), to rebuild it
/// with after a compaction drops it; `None` when it has none or the file cannot be read.
pub fn params_of(dir: &Path) -> Option<Params> {
    let ix = state::read(dir).ok()??.index?;
    Hnsw::read_params(&dir.join(ix.file)).ok()
}

/// After a change: inserts the committed rows past the index into it (a new file, committed), or
/// rebuilds it with `had` (the parameters from [`params_of`] before the change) when a compaction
/// dropped it. `None` when there is nothing to do (no index, or it covers every row).
pub fn refresh(dir: &Path, had: Option<Params>) -> Result<Option<Built>> {
    let mut w = Writer::open(dir, Wait::Block)?;
    let t0 = Instant::now();
    let db: &Db = w.db();
    let Some(ix) = open(db)? else {
        return match had {
            Some(p) if !db.is_empty() => build_with(&mut w, &p).map(Some),
            _ => Ok(None),
        };
    };
    if ix.rows == db.rows() {
        return Ok(None);
    }
    let mut h = ix.hnsw;
    let data = db.vectors.data();
    h.extend(data);
    h.set_deleted(|i| db.is_removed(i as usize));
    let rows = db.rows();
    commit(&mut w, h, rows, rows - ix.rows, false, t0).map(Some)
}
