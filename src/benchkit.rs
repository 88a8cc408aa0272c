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

mod kernels;
mod layers;
mod pg;
pub use kernels::{SHAPES as KERNEL_SHAPES, fma_peak, time_pointwise, time_pointwise_cold};
pub use layers::{LayerTimes, time_layers};
pub use pg::{explain_query, local_insert, pg_insert, quantile, time_queries};

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

/// Batch-1 latency of the pretrained embedder (what a search request runs): the first `n` images of
/// `paths` decoded beforehand, 10 warm-up calls, then one `embed_batch` of one image at a time on
/// the current rayon pool. Returns the seconds of each call.
pub fn time_latency(paths: &[PathBuf], size: u32, n: usize) -> Result<Vec<f64>> {
    let emb = crate::infer::embedder::Embedder::pretrained(None, size, true)?;
    let inputs = decoded(paths, size, n)?;
    for x in inputs.iter().cycle().take(10) {
        emb.embed_batch(x, 1)?;
    }
    let mut secs = Vec::with_capacity(inputs.len());
    for x in &inputs {
        let t0 = Instant::now();
        emb.embed_batch(x, 1)?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    Ok(secs)
}

/// The first `n` images of `paths` decoded into normalised `[3][size][size]` tensors (at least one).
fn decoded(paths: &[PathBuf], size: u32, n: usize) -> Result<Vec<Vec<f32>>> {
    let per = 3 * (size as usize).pow(2);
    let inputs: Vec<Vec<f32>> = paths
        .iter()
        .take(n)
        .map(|p| -> Result<Vec<f32>> {
            let mut v = vec![0f32; per];
            transform::load_tensor(p, size, &mut v)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Ok(v)
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(!inputs.is_empty(), "no images to time");
    Ok(inputs)
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
    /// Cores the build kept busy.
    pub build_cpu: f64,
    /// Rows inserted after the build by `Hnsw::extend` (0: none), and its seconds.
    pub added: usize,
    pub add_seconds: f64,
    pub index_bytes: u64,
    /// The exact scan's seconds for all queries (the ground truth's cost).
    pub exact_seconds: f64,
    /// Per call (`repeat` per `ef`): ef, recall@k against the exact scan, the seconds for all
    /// queries in one call, and the cores it kept busy (CPU seconds of the process ÷ wall seconds).
    pub runs: Vec<(usize, f64, f64, f64)>,
    /// Cores the exact scan kept busy.
    pub exact_cpu: f64,
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

/// User + system CPU seconds of this process, all threads (0 when unknown).
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// `f()`'s result, its wall seconds and the cores it kept busy (CPU seconds ÷ wall seconds).
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let r = f();
    let s = t0.elapsed().as_secs_f64();
    (r, s, (cpu_seconds() - c0) / s.max(1e-9))
}

/// What `time_ann` does besides searching: build (and save) or open a saved graph, and how often.
pub struct AnnRun<'a> {
    pub params: crate::search::ann::Params,
    /// Rows inserted after the build by `extend` (0: none; not with `load`).
    pub add: usize,
    /// Where the built graph is written.
    pub save: &'a Path,
    /// A graph saved by an earlier run over the same rows: searched, not built.
    pub load: Option<&'a Path>,
    /// Calls per `ef`.
    pub repeat: usize,
}

/// Times deeprank's HNSW index (`search::ann`, the code `deeprank index` ships) on `db` (an
/// `[n, dim]` f32 `.npy`) with `queries` (another, or `None`: the last `tail` rows of `db` are the
/// queries and are left out of the index): build with `run.params` on a pool of `threads` threads
/// (the last `run.add` rows inserted afterwards by `extend`, timed apart) and save to `run.save`,
/// or open `run.load`; then search the memory-mapped file, all queries in one call, `run.repeat`
/// calls per `ef`, recall@`k` against the exact scan.
pub fn time_ann(
    db: &Path,
    queries: Option<&Path>,
    tail: usize,
    efs: &[usize],
    k: usize,
    threads: usize,
    run: &AnnRun,
) -> Result<AnnBench> {
    let add = if run.load.is_some() { 0 } else { run.add };
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
        let (truth, exact_seconds, exact_cpu) = timed(|| search(data, dim, qs, k, &|_, _| false));
        let (mut build_seconds, mut build_cpu, mut add_seconds) = (0.0, 0.0, 0.0);
        let path = match run.load {
            Some(p) => p,
            None => {
                let mut h;
                (h, build_seconds, build_cpu) =
                    timed(|| Hnsw::build(&data[..(n - add) * dim], dim, &run.params));
                let t0 = Instant::now();
                h.extend(data);
                add_seconds = t0.elapsed().as_secs_f64();
                let f = std::fs::File::create(run.save)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", run.save.display()))?;
                let mut w = std::io::BufWriter::new(f);
                h.save(&mut w)?;
                run.save
            }
        };
        let index_bytes = std::fs::metadata(path)?.len();
        let h = Hnsw::open(path)?;
        anyhow::ensure!(
            h.len() == n && h.dim() == dim,
            "{}: a graph of {} rows × {}, not of these {n} × {dim}",
            path.display(),
            h.len(),
            h.dim()
        );
        let mut runs = Vec::new();
        let calls = efs
            .iter()
            .flat_map(|&e| std::iter::repeat_n(e, run.repeat.max(1)));
        for ef in calls {
            let (got, s, cpu) = timed(|| h.search_batch(data, qs, k, ef, None));
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
            runs.push((ef, found as f64 / want.max(1) as f64, s, cpu));
        }
        Ok(AnnBench {
            n,
            dim,
            queries: nq,
            build_seconds,
            build_cpu,
            added: add,
            add_seconds,
            index_bytes,
            exact_seconds,
            exact_cpu,
            runs,
            peak_rss: peak_rss(),
        })
    })
}
