//! Measurement helpers for `bench/`: reproducible random vectors written as `.npy` (so the FAISS
//! anchor reads the same arrays) and timed exact searches over them; timed decoding. (The timed
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
