//! Measurement helpers for `bench/`: reproducible random vectors written as `.npy` (so the FAISS
//! anchor reads the same arrays) and timed exact searches over them; timed decoding; sets with
//! planted near-duplicates. (The timed
//! training step is the trainer's own, `train::step::time_train`.)

use crate::data::transform;
use crate::search::index::search;
use crate::store::npy::{NpyMap, NpyWriter};
use anyhow::Result;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Writes `rows × dim` uniform(−1, 1) f32 vectors to `path` unless it already exists.
pub fn random_npy(path: &Path, rows: usize, dim: usize, seed: u64) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut w = NpyWriter::create(&tmp, dim)?;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut row = vec![0f32; dim];
    for _ in 0..rows {
        for v in row.iter_mut() {
            *v = r.random_range(-1.0..1.0);
        }
        w.push(&row)?;
    }
    w.finish()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Times exact top-`k` search of `nq` queries over `n × dim` vectors (best of `runs`).
/// Returns (seconds, the files used).
pub fn time_search(
    dir: &Path,
    n: usize,
    dim: usize,
    nq: usize,
    k: usize,
    runs: usize,
) -> Result<(f64, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let dbp = dir.join(format!("db-{n}x{dim}.npy"));
    let qp = dir.join(format!("q-{nq}x{dim}.npy"));
    random_npy(&dbp, n, dim, 1)?;
    random_npy(&qp, nq, dim, 2)?;
    let db = NpyMap::open(&dbp)?;
    let q = NpyMap::open(&qp)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let hits = search(db.data(), dim, q.data(), k, &|_, _| false);
        best = best.min(t0.elapsed().as_secs_f64());
        assert_eq!(hits.len(), nq);
    }
    Ok((best, dbp, qp))
}

/// Times decode + resize + normalise of every image of `paths` to `size` (best of `runs`), with the
/// images read into memory first so the disk is not measured. Returns seconds.
pub fn time_decode(paths: &[PathBuf], size: u32, runs: usize) -> Result<f64> {
    use rayon::prelude::*;
    let bytes: Vec<Vec<u8>> = paths.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let per = 3 * (size as usize).pow(2);
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let ok = bytes
            .par_iter()
            .map(|b| -> Result<Vec<f32>> {
                let img = transform::decode_rgb(b, transform::DEFAULT_MAX_PIXELS)?;
                let img = transform::resize_rgb(&img, size)?;
                let mut v = vec![0f32; per];
                transform::normalise_chw(&img, &mut v)?;
                Ok(v)
            })
            .filter(|r| r.is_ok())
            .count();
        best = best.min(t0.elapsed().as_secs_f64());
        anyhow::ensure!(
            ok == bytes.len(),
            "{} images failed to decode",
            bytes.len() - ok
        );
    }
    Ok(best)
}

/// The planted near-duplicate kinds: `half` and `double` size, `jpegQ` (re-encoded at JPEG quality
/// Q, 1–100), `cropP` (a P % crop of each side at a random offset, P in 50–99), `flip`
/// (horizontal).
pub const PLANT_KINDS: &str = "half, double, jpegQ, cropP, flip";

enum Kind {
    Scale(f32),
    Jpeg(u8),
    Crop(u32),
    Flip,
}

fn parse_kind(k: &str) -> Result<Kind> {
    let num = |p: &str| k.strip_prefix(p).and_then(|n| n.parse::<u32>().ok());
    Ok(match k {
        "half" => Kind::Scale(0.5),
        "double" => Kind::Scale(2.0),
        "flip" => Kind::Flip,
        _ => match (num("jpeg"), num("crop")) {
            (Some(q), _) if (1..=100).contains(&q) => Kind::Jpeg(q as u8),
            (_, Some(p)) if (50..=99).contains(&p) => Kind::Crop(p),
            _ => anyhow::bail!("unknown kind {k}: use {PLANT_KINDS}"),
        },
    })
}

/// One planted copy of an original.
#[derive(Clone, Debug)]
pub struct Planted {
    pub original: PathBuf,
    pub copy: PathBuf,
    pub kind: String,
}

fn jpeg(img: &image::RgbImage, quality: u8, path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality).encode_image(img)?;
    std::fs::write(path, buf)?;
    Ok(())
}

/// A set with planted near-duplicates: `originals` copied byte for byte to `out/originals/NNNN.ext`,
/// and for the first `planted` of them one copy per kind of `kinds` (see [`PLANT_KINDS`]) in
/// `out/copies/NNNN-KIND.jpg` (JPEG quality 90 but for `jpegQ`). Writes
/// `out/truth.tsv` (original, copy, kind) and returns the same rows.
pub fn plant_duplicates(
    originals: &[PathBuf],
    planted: usize,
    kinds: &[&str],
    out: &Path,
    seed: u64,
) -> Result<Vec<Planted>> {
    use image::imageops::{self, FilterType};
    let parsed: Vec<Kind> = kinds.iter().map(|k| parse_kind(k)).collect::<Result<_>>()?;
    let (od, cd) = (out.join("originals"), out.join("copies"));
    std::fs::create_dir_all(&od)?;
    std::fs::create_dir_all(&cd)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut truth = Vec::new();
    for (i, src) in originals.iter().enumerate() {
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("jpg");
        let orig = od.join(format!("{i:04}.{}", ext.to_ascii_lowercase()));
        std::fs::copy(src, &orig)?;
        if i >= planted {
            continue;
        }
        let img = transform::load_rgb(src)?;
        let (w, h) = img.dimensions();
        for (&kind, how) in kinds.iter().zip(&parsed) {
            let copy = cd.join(format!("{i:04}-{kind}.jpg"));
            match *how {
                Kind::Scale(f) => {
                    let (nw, nh) = (
                        ((w as f32 * f).round() as u32).max(1),
                        ((h as f32 * f).round() as u32).max(1),
                    );
                    let filter = if f < 1.0 {
                        FilterType::Triangle
                    } else {
                        FilterType::CatmullRom
                    };
                    jpeg(&imageops::resize(&img, nw, nh, filter), 90, &copy)?
                }
                Kind::Jpeg(q) => jpeg(&img, q, &copy)?,
                Kind::Crop(p) => {
                    let (cw, ch) = ((w * p / 100).max(1), (h * p / 100).max(1));
                    let x = rng.random_range(0..=w - cw);
                    let y = rng.random_range(0..=h - ch);
                    jpeg(
                        &imageops::crop_imm(&img, x, y, cw, ch).to_image(),
                        90,
                        &copy,
                    )?
                }
                Kind::Flip => jpeg(&imageops::flip_horizontal(&img), 90, &copy)?,
            }
            truth.push(Planted {
                original: orig.clone(),
                copy,
                kind: kind.to_string(),
            });
        }
    }
    let mut tsv = String::from("original\tcopy\tkind\n");
    for t in &truth {
        tsv.push_str(&format!(
            "{}\t{}\t{}\n",
            t.original.display(),
            t.copy.display(),
            t.kind
        ));
    }
    std::fs::write(out.join("truth.tsv"), tsv)?;
    Ok(truth)
}

/// Writes a format-2 DB of `rows` random unit vectors at `out` whose meta names the model
/// `model` (`pretrained` or a run folder) so `deeprank add` can embed into it. Paths are
/// `/deeprank-bench/img-N.jpg` (no files: unknown stamps).
pub fn make_db(out: &Path, rows: usize, model: &str, seed: u64) -> Result<usize> {
    use crate::infer::embedder::{Embedder, ModelSpec};
    use crate::store::db::{DbWriter, Entry, Meta};
    let emb = Embedder::from_spec(&ModelSpec::parse(model)?, None, None, true)?;
    let mut w = DbWriter::create(out, emb.dim, None)?;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut row = vec![0f32; emb.dim];
    for i in 0..rows {
        for v in row.iter_mut() {
            *v = r.random_range(-1.0..1.0);
        }
        crate::infer::embedder::l2_normalize(&mut row);
        w.push(
            &Entry {
                path: PathBuf::from(format!("/deeprank-bench/img-{i}.jpg")),
                class_id: String::new(),
                class_name: String::new(),
            },
            &row,
        )?;
    }
    w.finish(Meta {
        model: emb.identity.clone(),
        model_source: emb.source.clone(),
        size: emb.size,
        dim: emb.dim,
        count: rows,
        normalized: emb.normalize,
        data: "random".into(),
        deeprank_version: env!("CARGO_PKG_VERSION").to_string(),
        format: 2,
    })?;
    Ok(emb.dim)
}

/// What [`time_ann`] measured.
pub struct AnnBench {
    pub n: usize,
    pub dim: usize,
    pub queries: usize,
    pub build_seconds: f64,
    /// Rows inserted after the build by `Hnsw::extend` (0: none), and its seconds.
    pub added: usize,
    pub add_seconds: f64,
    pub index_bytes: u64,
    /// The exact scan's seconds for all queries (the ground truth's cost).
    pub exact_seconds: f64,
    /// Per `ef`: recall@k against the exact scan, and the seconds for all queries in one call.
    pub runs: Vec<(usize, f64, f64)>,
    /// Peak resident memory of the process, bytes (Linux; 0 elsewhere).
    pub peak_rss: u64,
}

/// Peak resident set size of this process from `/proc/self/status` (0 when unknown).
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Times deeprank's HNSW index (`search::ann`, the code `deeprank index` ships) on `db` (an
/// `[n, dim]` f32 `.npy`) with `queries` (another, or `None`: the last `tail` rows of `db` are the
/// queries and are left out of the index): build with `params` on a pool of `threads` threads
/// (the last `add` rows inserted afterwards by `extend`, timed apart), save to `save` and search
/// the memory-mapped file, all queries in one call per `ef`, recall@`k` against the exact scan.
#[allow(clippy::too_many_arguments)]
pub fn time_ann(
    db: &Path,
    queries: Option<&Path>,
    tail: usize,
    params: &crate::search::ann::Params,
    efs: &[usize],
    k: usize,
    threads: usize,
    add: usize,
    save: &Path,
) -> Result<AnnBench> {
    use crate::search::ann::Hnsw;
    let dbm = NpyMap::open(db)?;
    let qm = queries.map(NpyMap::open).transpose()?;
    let dim = dbm.dim;
    let (data, qs): (&[f32], &[f32]) = match &qm {
        Some(q) => {
            anyhow::ensure!(
                q.dim == dim,
                "{} has vectors of {} values, {} of {dim}",
                queries.unwrap().display(),
                q.dim,
                db.display()
            );
            (dbm.data(), q.data())
        }
        None => {
            anyhow::ensure!(
                tail > 0 && tail < dbm.rows,
                "{} has {} rows: --nq {tail} must be between 1 and that",
                db.display(),
                dbm.rows
            );
            dbm.data().split_at((dbm.rows - tail) * dim)
        }
    };
    let n = data.len() / dim;
    let nq = qs.len() / dim;
    anyhow::ensure!(
        n > add && nq > 0 && k > 0,
        "nothing to search: {n} rows, {nq} queries"
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    pool.install(|| -> Result<AnnBench> {
        let t0 = Instant::now();
        let truth = search(data, dim, qs, k, &|_, _| false);
        let exact_seconds = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut h = Hnsw::build(&data[..(n - add) * dim], dim, params);
        let build_seconds = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        h.extend(data);
        let add_seconds = t0.elapsed().as_secs_f64();
        {
            let f = std::fs::File::create(save)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", save.display()))?;
            let mut w = std::io::BufWriter::new(f);
            h.save(&mut w)?;
        }
        drop(h);
        let index_bytes = std::fs::metadata(save)?.len();
        let h = Hnsw::open(save)?;
        let mut runs = Vec::new();
        for &ef in efs {
            let t0 = Instant::now();
            let got = h.search_batch(data, qs, k, ef, None);
            let s = t0.elapsed().as_secs_f64();
            let found: usize = got
                .iter()
                .zip(&truth)
                .map(|(g, t)| {
                    g.iter()
                        .filter(|x| t.iter().any(|y| y.index == x.id as usize))
                        .count()
                })
                .sum();
            let want: usize = truth.iter().map(Vec::len).sum();
            runs.push((ef, found as f64 / want.max(1) as f64, s));
        }
        Ok(AnnBench {
            n,
            dim,
            queries: nq,
            build_seconds,
            added: add,
            add_seconds,
            index_bytes,
            exact_seconds,
            runs,
            peak_rss: peak_rss(),
        })
    })
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL store (bench/pg_bench.sh): the same synthetic rows into a store or a DB folder,
// then timed single queries.

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
