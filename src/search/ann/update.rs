//! Building a DB's ANN index and keeping it current, under the DB's writer lock and commit record.
//! `deeprank index` writes the graph whole to a new file (`ann-GENERATION.hnsw`), fsynced with its
//! folder, and made the index by the next commit of `state.json` (`index: {file, rows}`); the file
//! it replaces is deleted after. An update after `add`/`sync`/uploads inserts the new rows and
//! writes only what changed: a delta file (`ann-GENERATION.hnsd`, see `delta.rs`) over the same
//! graph file, committed as `index: {file, rows, delta}` (the previous delta, which the new one
//! contains, is deleted after); once a delta would hold more than half as many nodes as its graph,
//! the graph is written whole again. A kill -9 anywhere leaves the old commit, whose files are
//! untouched (a new file no commit names is deleted by the next writer), or the new one. Rows added
//! since the last update are searched exactly until [`refresh`] inserts them; removed rows are
//! tombstones from the DB's own `removed.tsv`, never written into the graph; a compaction
//! renumbers rows and drops the index, which [`refresh`] then rebuilds with the same parameters.

use super::db::open;
use super::{Hnsw, Params};
use crate::store::commit::{DELTA_SUFFIX, INDEX_SUFFIX, Wait, Writer};
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
    /// Whether only a delta over the existing graph file was written (`file` is the delta).
    pub delta: bool,
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
    commit(w, h, None, rows, rows, true, t0)
}

/// A delta is written while it holds at most 1/`DELTA_MAX_PART` as many nodes as its graph file
/// (beyond, the graph is written whole again: reads stay cheap and the deltas' sizes bounded).
pub const DELTA_MAX_PART: usize = 2;

/// Writes `h` to a new file (a delta over its graph file `base` when that is small enough) and
/// commits it as the index over `rows` rows.
fn commit(
    w: &mut Writer,
    mut h: Hnsw,
    base: Option<&str>,
    rows: usize,
    inserted: usize,
    rebuilt: bool,
    t0: Instant,
) -> Result<Built> {
    let touched = h.take_touched();
    let patched = h
        .delta_nodes(&touched)
        .filter(|p| (p.len() + h.len() - h.base_len()) * DELTA_MAX_PART <= h.base_len());
    let (name, bytes, index) = match (base, patched) {
        (Some(base), Some(p)) => {
            let name = w.new_index_name(DELTA_SUFFIX);
            let bytes = w.write_index_file(&name, |f| h.save_delta(&p, f))?;
            let ix = IndexRef {
                file: base.to_string(),
                rows: rows as u64,
                delta: Some(name.clone()),
            };
            (name, bytes, ix)
        }
        _ => {
            let name = w.new_index_name(INDEX_SUFFIX);
            let bytes = w.write_index_file(&name, |f| h.save(f))?;
            let ix = IndexRef {
                file: name.clone(),
                rows: rows as u64,
                delta: None,
            };
            (name, bytes, ix)
        }
    };
    let delta = index.delta.is_some();
    w.commit_index(Some(index))?;
    let p = h.params();
    Ok(Built {
        file: w.db().dir.join(name),
        rows,
        inserted,
        rebuilt,
        delta,
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
    let base = db.state.index.as_ref().map(|i| i.file.clone());
    let mut h = ix.hnsw;
    let data = db.vectors.data();
    h.extend(data);
    h.set_deleted(|i| db.is_removed(i as usize));
    let rows = db.rows();
    commit(&mut w, h, base.as_deref(), rows, rows - ix.rows, false, t0).map(Some)
}
