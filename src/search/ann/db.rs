//! The ANN index of a DB: the graph of the commit's index file (memory-mapped by `store::db`),
//! searched together with the rows committed since it was built (`rows` past the index's are
//! scanned exactly and merged, so a lagging index never hides a row), with the DB's removed rows as
//! tombstones and optional filters (`--where class=…`, `--where path=…`). Exact search over the same
//! rows is the other path (`--exact`, no index, or a `--recall` target the calibration does not
//! reach). Building and updating the file under the DB's writer lock: [`super::update`].

use super::Hnsw;
use crate::cpu::l2::sq_l2;
use crate::search::index::{self, Hit};
use crate::store::db::Db;
use anyhow::{Result, anyhow, bail};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The `ef` a search uses when neither `--ef` nor `--recall` is given.
pub const DEFAULT_EF: usize = 64;

/// How a search over a DB runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The exact scan, index or not.
    Exact,
    /// The index (when the DB has one) with this `ef`.
    Ef(usize),
    /// The index with the smallest calibrated `ef` whose recall@10 reaches this target; the exact
    /// scan when none does.
    Recall(f64),
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Ef(DEFAULT_EF)
    }
}

/// What a search did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Exact,
    /// The index with this `ef`, plus an exact scan of `tail` rows added since it was built.
    Index {
        ef: usize,
        tail: usize,
    },
}

/// A DB's ANN index, opened for one commit of it.
pub struct DbIndex {
    pub hnsw: Hnsw,
    pub path: PathBuf,
    /// Rows `0..rows` are in the graph.
    pub rows: usize,
}

const FIX: &str = "rebuild it with `deeprank index --db DB`, or search with --exact";

/// The ANN index of `db`'s commit, with the DB's removed rows as tombstones: `None` when the commit
/// names none, an error naming the file when it cannot be read or does not fit the DB.
pub fn open(db: &Db) -> Result<Option<DbIndex>> {
    let Some(ix) = &db.index else {
        return Ok(None);
    };
    let map = ix.map.clone().map_err(|e| anyhow!("{e}: {FIX}"))?;
    let mut h = Hnsw::from_map(map, &ix.path).map_err(|e| anyhow!("{e}: {FIX}"))?;
    if let Some((path, map)) = &ix.delta {
        let map = map.clone().map_err(|e| anyhow!("{e}: {FIX}"))?;
        h = h.with_delta(map, path).map_err(|e| anyhow!("{e}: {FIX}"))?;
    }
    if h.len() != ix.rows || h.dim() != db.meta.dim || ix.rows > db.rows() {
        bail!(
            "the ANN index {} holds {} vectors of dimension {}, but the DB's commit says {} of its {} rows (dimension {}) are indexed: {FIX}",
            ix.path.display(),
            h.len(),
            h.dim(),
            ix.rows,
            db.rows(),
            db.meta.dim
        );
    }
    h.set_deleted(|i| db.is_removed(i as usize));
    Ok(Some(DbIndex {
        hnsw: h,
        path: ix.path.clone(),
        rows: ix.rows,
    }))
}

/// A condition on the rows a search may return.
#[derive(Clone, Debug, PartialEq)]
pub enum Where {
    /// The row's class id is this.
    Class(String),
    /// The row's stored path starts with this (compared as written, and in its absolute form).
    PathPrefix(PathBuf),
}

impl Where {
    /// Parses `class=WNID` or `path=PREFIX`.
    pub fn parse(s: &str) -> Result<Where> {
        match s.split_once('=') {
            Some(("class", c)) if !c.is_empty() => Ok(Where::Class(c.to_string())),
            Some(("path", p)) if !p.is_empty() => Ok(Where::PathPrefix(PathBuf::from(p))),
            _ => bail!(
                "--where {s:?}: expected class=CLASS_ID (e.g. class=n01443537) or path=PREFIX (of the stored image paths)"
            ),
        }
    }
}

fn starts_with(path: &Path, prefix: &[u8]) -> bool {
    path.as_os_str().as_encoded_bytes().starts_with(prefix)
}

/// The rows passing every condition of `wheres` and not removed, as a mask over the DB's rows.
pub fn mask(db: &Db, wheres: &[Where]) -> Vec<bool> {
    let prefixes: Vec<Vec<Vec<u8>>> = wheres
        .iter()
        .map(|w| match w {
            Where::PathPrefix(p) => {
                let mut v = vec![p.as_os_str().as_encoded_bytes().to_vec()];
                if let Ok(a) = std::path::absolute(p)
                    && a != *p
                {
                    v.push(a.as_os_str().as_encoded_bytes().to_vec());
                }
                v
            }
            Where::Class(_) => vec![],
        })
        .collect();
    (0..db.rows())
        .into_par_iter()
        .map(|r| {
            let e = &db.entries[r];
            !db.is_removed(r)
                && wheres.iter().zip(&prefixes).all(|(w, pre)| match w {
                    Where::Class(c) => e.class_id == *c,
                    Where::PathPrefix(_) => pre.iter().any(|p| starts_with(&e.path, p)),
                })
        })
        .collect()
}

/// What to search for: the path, the rows allowed, and per query a row to leave out.
#[derive(Clone, Copy, Default)]
pub struct Request<'a> {
    pub mode: Mode,
    /// Rows allowed (from [`mask`]: removed rows are not); `None`: every live row.
    pub mask: Option<&'a [bool]>,
    /// Per query, a row left out of its results (the query itself when it is a DB row).
    pub exclude: Option<&'a [Option<usize>]>,
}

/// Top-`k` live rows for each query (rows of `queries`), nearest first, ties by the lower row:
/// through `index` when there is one and the mode asks for it, else by the exact scan.
pub fn search(
    db: &Db,
    index: Option<&DbIndex>,
    queries: &[f32],
    k: usize,
    req: &Request,
) -> (Vec<Vec<Hit>>, Plan) {
    let ef = match (req.mode, index) {
        (Mode::Ef(ef), Some(_)) => Some(ef.max(1)),
        (Mode::Recall(r), Some(ix)) => ix.hnsw.ef_for_recall(r),
        _ => None,
    };
    match (ef, index) {
        (Some(ef), Some(ix)) if k > 0 => {
            let tail = db.rows() - ix.rows;
            (
                with_index(db, ix, queries, k, ef, req),
                Plan::Index { ef, tail },
            )
        }
        _ => (exact(db, 0, queries, k, req), Plan::Exact),
    }
}

fn allowed(db: &Db, req: &Request, q: usize, r: usize) -> bool {
    req.mask.map_or(!db.is_removed(r), |m| m[r]) && req.exclude.is_none_or(|e| e[q] != Some(r))
}

/// Exact top-`k` over rows `from..` (the whole DB, or the tail an index does not cover). A mask
/// passing few rows gathers them first, so a selective filter costs what its rows cost.
fn exact(db: &Db, from: usize, queries: &[f32], k: usize, req: &Request) -> Vec<Vec<Hit>> {
    let dim = db.meta.dim;
    let data = &db.vectors.data()[from * dim..];
    let n = data.len() / dim;
    if let Some(m) = req.mask {
        let rows: Vec<usize> = (from..from + n).filter(|&r| m[r]).collect();
        if rows.len() * 4 < n {
            let sub: Vec<f32> = rows
                .iter()
                .flat_map(|&r| db.vectors.row(r).iter().copied())
                .collect();
            let hits = index::search(&sub, dim, queries, k, &|q, j| !allowed(db, req, q, rows[j]));
            return hits
                .into_iter()
                .map(|hs| {
                    hs.into_iter()
                        .map(|h| Hit {
                            index: rows[h.index],
                            distance: h.distance,
                        })
                        .collect()
                })
                .collect();
        }
    }
    let hits = index::search(data, dim, queries, k, &|q, j| {
        !allowed(db, req, q, from + j)
    });
    hits.into_iter()
        .map(|hs| {
            hs.into_iter()
                .map(|h| Hit {
                    index: from + h.index,
                    distance: h.distance,
                })
                .collect()
        })
        .collect()
}

fn with_index(
    db: &Db,
    ix: &DbIndex,
    queries: &[f32],
    k: usize,
    ef: usize,
    req: &Request,
) -> Vec<Vec<Hit>> {
    let dim = db.meta.dim;
    let data = db.vectors.data();
    let tail = if ix.rows < db.rows() {
        exact(db, ix.rows, queries, k, req)
    } else {
        vec![vec![]; queries.len() / dim]
    };
    queries
        .par_chunks(dim)
        .zip(tail)
        .enumerate()
        .map(|(q, (qv, tail))| {
            let ex = req.exclude.and_then(|e| e[q]);
            let kk = k + usize::from(ex.is_some());
            let filter = req.mask.map(|m| move |i: u32| m[i as usize]);
            let got = ix.hnsw.search(
                data,
                qv,
                kk,
                ef.max(kk),
                filter.as_ref().map(|f| f as &dyn Fn(u32) -> bool),
            );
            // Re-ranked by the exact scan's kernel: the same distances, bit for bit, as `--exact`.
            let mut all: Vec<(f32, usize)> = got
                .into_iter()
                .map(|h| h.id as usize)
                .filter(|&r| Some(r) != ex)
                .map(|r| (sq_l2(qv, db.vectors.row(r)), r))
                .collect();
            all.extend(
                tail.into_iter()
                    .map(|h| (sq_l2(qv, db.vectors.row(h.index)), h.index)),
            );
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            all.into_iter()
                .map(|(d, r)| Hit {
                    index: r,
                    distance: d.max(0.0).sqrt(),
                })
                .collect()
        })
        .collect()
}
