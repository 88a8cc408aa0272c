//! Search over a PostgreSQL collection (`--db postgres://…`): the store's model re-created for
//! queries, and its candidates ranked by the local exact search's own distance ([`sq_l2`]), so
//! an exact search of a store equals the same search of a DB folder.

use crate::infer::embedder::{Embedder, ModelSpec};
use crate::search::index::sq_l2;
use crate::search::query::{QueryResult, ResultRow, embed_queries, guess_class};
use crate::store::db::unescape_path;
use crate::store::pg::embed::{db_meta, store_meta};
use crate::store::pg::{Filter, Iterative, Mode, PgStore, Shard};
use anyhow::{Context, Result, bail};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// `info` key of the HNSW settings `deeprank index` recorded.
pub const HNSW_INFO: &str = "hnsw";
/// `ef_search` when neither `--ef` nor `deeprank index --ef` chose one.
pub const DEFAULT_EF: u32 = 40;

/// Refuses a store made by another model, input size or normalisation (as a DB folder is).
pub fn check_compatible(store: &PgStore, emb: &Embedder) -> Result<()> {
    let want = store_meta(emb, Path::new(""))?;
    if let Some(why) = store.meta().mismatch(&want) {
        bail!(
            "store {} was made with {why} (the query model is {} at {} px, normalized: {}): \
             use the store's model, or embed into another table= with this one",
            store.url().url,
            emb.identity,
            emb.size,
            emb.normalize
        );
    }
    Ok(())
}

/// Builds the embedder that made the store (or the one `model` names, which must match it).
pub fn embedder_for_store(
    store: &PgStore,
    model: Option<&str>,
    weights: Option<&Path>,
) -> Result<Embedder> {
    let meta = db_meta(store)?;
    let spec = ModelSpec::parse(model.unwrap_or(&meta.model_source)).with_context(|| {
        format!(
            "cannot re-create the model of store {} ({}): pass --model",
            store.url().url,
            meta.model_source
        )
    })?;
    let emb = Embedder::from_spec(&spec, weights, Some(meta.size), meta.normalized)?;
    check_compatible(store, &emb)?;
    Ok(emb)
}

/// The search mode: exact when asked or when the store has no HNSW index, else HNSW with `ef`
/// (default: the one `deeprank index --ef` recorded).
pub fn mode_for(store: &PgStore, exact: bool, ef: Option<u32>) -> Mode {
    let hnsw = store.meta().info.get(HNSW_INFO);
    match hnsw {
        Some(h) if !exact => Mode::Hnsw {
            ef: ef
                .or_else(|| h.get("ef_search")?.as_u64().map(|v| v as u32))
                .unwrap_or(DEFAULT_EF),
            iterative: Iterative::Relaxed,
        },
        _ => Mode::Exact,
    }
}

/// One ranked row: id, distance (the local f32 function), path, class id, class name.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub id: i64,
    pub distance: f32,
    pub path: PathBuf,
    pub class_id: String,
    pub class_name: String,
}

/// The `k` nearest rows of the store to `q`, nearest first, ties by id.
pub fn rank(
    store: &mut PgStore,
    q: &[f32],
    k: usize,
    mode: Mode,
    filter: &Filter,
) -> Result<Vec<Ranked>> {
    Ok(rank_partial(store, q, k, mode, filter, false)?.0)
}

/// As [`rank`]; with `allow_partial` on a sharded store, the shards that could not be reached are
/// left out and returned (empty: the answer is whole).
pub fn rank_partial(
    store: &mut PgStore,
    q: &[f32],
    k: usize,
    mode: Mode,
    filter: &Filter,
    allow_partial: bool,
) -> Result<(Vec<Ranked>, Vec<Shard>)> {
    let found = store.search(q, k, mode, filter, allow_partial)?;
    let mut hits: Vec<Ranked> = found
        .rows
        .into_iter()
        .map(|c| Ranked {
            id: c.id,
            distance: sq_l2(q, &c.embedding).max(0.0).sqrt(),
            path: unescape_path(&c.path),
            class_id: c.class,
            class_name: c.class_name,
        })
        .collect();
    hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
    hits.truncate(k);
    Ok((hits, found.missing))
}

/// Ranked rows as result rows (`query_class`: the query's class, when known).
pub fn result_rows(hits: Vec<Ranked>, query_class: Option<&str>) -> Vec<ResultRow> {
    hits.into_iter()
        .enumerate()
        .map(|(r, h)| ResultRow {
            rank: r + 1,
            id: h.id as u64,
            distance: h.distance,
            same_class: query_class.and_then(|c| (!h.class_id.is_empty()).then(|| h.class_id == c)),
            path: h.path,
            class_id: h.class_id,
            class_name: h.class_name,
        })
        .collect()
}

/// `deeprank query --db postgres://…`: the top `top` rows for each query image, and (with
/// `allow_partial`) the shards left out of any of the answers.
pub fn query(
    store: &mut PgStore,
    emb: &Embedder,
    images: &[PathBuf],
    top: usize,
    mode: Mode,
    filter: &Filter,
    allow_partial: bool,
) -> Result<(Vec<QueryResult>, Vec<Shard>)> {
    let vecs = embed_queries(emb, images, top)?;
    let classes: HashMap<String, String> =
        store.classes_partial(allow_partial)?.into_iter().collect();
    let known: HashSet<&str> = classes.keys().map(String::as_str).collect();
    let mut out = Vec::new();
    let mut missing: Vec<Shard> = Vec::new();
    for (p, v) in images.iter().zip(vecs) {
        let qc = guess_class(p, &known);
        let (hits, down) = rank_partial(store, &v, top, mode, filter, allow_partial)?;
        for s in down {
            if !missing.iter().any(|m| m.partition == s.partition) {
                missing.push(s);
            }
        }
        out.push(QueryResult {
            image: p.clone(),
            class_name: qc.as_ref().and_then(|c| classes.get(c).cloned()),
            results: result_rows(hits, qc.as_deref()),
            class_id: qc,
        });
    }
    Ok((out, missing))
}
