//! PostgreSQL store (bench/pg_bench.sh): the same synthetic rows into a store or a DB folder,
//! then timed single queries.

use crate::search::index::search;
use anyhow::Result;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// 100 cluster centres of the synthetic store rows.
fn pg_centers(dim: usize) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(12345);
    (0..100 * dim).map(|_| r.random_range(-1.0..1.0)).collect()
}

/// Row `i` of the synthetic set (clustered like embeddings, 100 classes): its vector into
/// `out`, and (path, class, content hash).
fn pg_row(i: usize, dim: usize, centers: &[f32], out: &mut Vec<f32>) -> (String, String, [u8; 32]) {
    let mut r = ChaCha8Rng::seed_from_u64(i as u64 + 1);
    let c = r.random_range(0..100usize);
    out.clear();
    out.extend((0..dim).map(|j| centers[c * dim + j] + 0.5 * r.random_range(-1.0f32..1.0)));
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&r.random::<u64>().to_be_bytes());
    h[8..16].copy_from_slice(&(i as u64).to_be_bytes());
    (
        format!("/bench/class{c:03}/img{i:08}.jpg"),
        format!("class{c:03}"),
        h,
    )
}

/// Query `i`: a row of the set moved by noise.
fn pg_query_vec(i: usize, n: usize, dim: usize, centers: &[f32]) -> Vec<f32> {
    let mut v = Vec::new();
    pg_row((i * 7919) % n, dim, centers, &mut v);
    let mut r = ChaCha8Rng::seed_from_u64(1_000_000 + i as u64);
    v.iter()
        .map(|x| x + 0.3 * r.random_range(-1.0f32..1.0))
        .collect()
}

fn bench_meta(dim: usize) -> crate::store::pg::StoreMeta {
    crate::store::pg::StoreMeta {
        model: "bench".into(),
        size: 224,
        dim,
        normalized: false,
        info: serde_json::json!({}),
    }
}

/// Writes rows `0..n` into a new collection at `url` (hash-partitioned over `shards` when any
/// are given; rows then go straight to the shards, binary) in batches of `batch`. Seconds.
pub fn pg_insert(url: &str, shards: &[String], dim: usize, n: usize, batch: usize) -> Result<f64> {
    use crate::store::pg::{PgStore, RowRef, ShardOptions, id_from_hash, init_sharded};
    let meta = bench_meta(dim);
    let mut store = if shards.is_empty() {
        PgStore::create(url, &meta)?
    } else {
        let s: Vec<&str> = shards.iter().map(String::as_str).collect();
        init_sharded(url, &s, &meta, &ShardOptions::default())?
    };
    anyhow::ensure!(
        store.count()? == 0,
        "{url} holds rows already: use a new table="
    );
    store.batch_rows = batch.max(1);
    let cs = pg_centers(dim);
    let mut v = Vec::with_capacity(dim);
    let t0 = Instant::now();
    let mut new = 0;
    for i in 0..n {
        let (p, c, h) = pg_row(i, dim, &cs, &mut v);
        new += store.push(RowRef {
            id: id_from_hash(&h),
            path: &p,
            class: &c,
            class_name: &c,
            content_hash: &h,
            embedding: &v,
        })?;
    }
    new += store.flush()?;
    let s = t0.elapsed().as_secs_f64();
    anyhow::ensure!(new as usize == n, "{new} rows written of {n}");
    Ok(s)
}

/// The same rows written into a DB folder at `dir` (streamed, committed). Seconds.
pub fn local_insert(dir: &Path, dim: usize, n: usize) -> Result<f64> {
    use crate::store::db::{DbWriter, Entry, Meta};
    use crate::store::manifest::Stamp;
    let cs = pg_centers(dim);
    let mut v = Vec::with_capacity(dim);
    let t0 = Instant::now();
    let mut w = DbWriter::create(dir, dim, None)?;
    for i in 0..n {
        let (p, c, h) = pg_row(i, dim, &cs, &mut v);
        let e = Entry {
            path: PathBuf::from(p),
            class_id: c.clone(),
            class_name: c,
        };
        let stamp = Stamp {
            sha256: Some(h),
            ..Stamp::default()
        };
        w.push_stamped(&e, &v, &stamp)?;
    }
    w.finish(Meta {
        model: "bench".into(),
        model_source: "bench".into(),
        size: 224,
        dim,
        count: n,
        normalized: false,
        data: "synthetic".into(),
        deeprank_version: env!("CARGO_PKG_VERSION").to_string(),
        format: 2,
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Per-query seconds (in query order) and each query's result ids, for `nq` single queries of a
/// store of the first `n` synthetic rows (`mode`), or of a DB folder (`local`: the exact scan, or
/// its ANN index at the `ef` of an HNSW mode; `deeprank index` must have built it).
pub fn time_queries(
    url: Option<&str>,
    local: Option<&Path>,
    n: usize,
    dim: usize,
    nq: usize,
    k: usize,
    mode: crate::store::pg::Mode,
) -> Result<(Vec<f64>, Vec<Vec<String>>)> {
    use crate::store::pg::{Filter, PgStore};
    let cs = pg_centers(dim);
    let mut secs = Vec::with_capacity(nq);
    let mut ids = Vec::with_capacity(nq);
    let mut store = url.map(|u| PgStore::open(u, None)).transpose()?;
    let db = local.map(crate::store::db::Db::open).transpose()?;
    let local_ef = match mode {
        crate::store::pg::Mode::Hnsw { ef, .. } => Some(ef as usize),
        _ => None,
    };
    let index = match (&db, local_ef) {
        (Some(d), Some(_)) => Some(crate::search::ann::db::open(d)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no ANN index; run `deeprank index --db` first",
                d.dir.display()
            )
        })?),
        _ => None,
    };
    // A sharded store's ef_search is the shards' (set through the foreign servers' options).
    if let (Some(s), crate::store::pg::Mode::Hnsw { ef, iterative }) = (&mut store, mode)
        && s.is_sharded()
    {
        s.set_shard_search(ef, iterative)?;
    }
    for i in 0..nq {
        let q = pg_query_vec(i, n, dim, &cs);
        let t0 = Instant::now();
        let got: Vec<String> = match (&mut store, &db) {
            (Some(s), _) => crate::search::pg::rank(s, &q, k, mode, &Filter::default())?
                .into_iter()
                .map(|h| h.path.display().to_string())
                .collect(),
            (None, Some(db)) => {
                let hits = match (&index, local_ef) {
                    (Some(ix), Some(ef)) => {
                        use crate::search::ann::db::{Mode, Request};
                        let req = Request {
                            mode: Mode::Ef(ef),
                            ..Request::default()
                        };
                        crate::search::ann::db::search(db, Some(ix), &q, k, &req).0
                    }
                    _ => search(db.vectors.data(), dim, &q, k, &|_, _| false),
                };
                hits.into_iter()
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| db.entries[h.index].path.display().to_string())
                    .collect()
            }
            _ => anyhow::bail!("a store URL or a DB folder is needed"),
        };
        secs.push(t0.elapsed().as_secs_f64());
        ids.push(got);
    }
    Ok((secs, ids))
}

/// The `p`-quantile (0..=1) of some values (nearest rank).
pub fn quantile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// `EXPLAIN (ANALYZE, VERBOSE)` of the first benchmark query (vector literals shortened).
pub fn explain_query(
    url: &str,
    n: usize,
    dim: usize,
    k: usize,
    mode: crate::store::pg::Mode,
) -> Result<String> {
    let mut store = crate::store::pg::PgStore::open(url, None)?;
    if let crate::store::pg::Mode::Hnsw { ef, iterative } = mode
        && store.is_sharded()
    {
        store.set_shard_search(ef, iterative)?;
    }
    let q = pg_query_vec(0, n, dim, &pg_centers(dim));
    store.explain_search(&q, k, mode, &crate::store::pg::Filter::default())
}
