//! The seed's triplet sampler (`sampler.py`): for every training image as query, `n_pos` positives
//! from its own class (never the query itself) and, for each positive, `n_neg` negatives from other
//! classes. Written as `query,positive,negative` lines.

use crate::data::dataset::Dataset;
use anyhow::{Context, Result, bail};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// One triplet, as indices into [`Dataset::items`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Triplet {
    pub query: usize,
    pub positive: usize,
    pub negative: usize,
}

/// What sampling produced, with the classes that had to be left out.
#[derive(Debug)]
pub struct Sampled {
    pub triplets: Vec<Triplet>,
    /// Class indices left out because they hold fewer than two images.
    pub small_classes: Vec<usize>,
}

/// Samples triplets as the seed does, deterministically for a seed.
///
/// Positives are drawn without replacement while the class has enough other images, and with
/// replacement beyond that. Negatives are uniform over the images of all other classes.
pub fn sample(ds: &Dataset, n_pos: usize, n_neg: usize, seed: u64) -> Result<Sampled> {
    if n_pos == 0 || n_neg == 0 {
        bail!("--n-pos and --n-neg must be at least 1");
    }
    // Items grouped by class: contiguous index lists.
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.classes.len()];
    for (i, it) in ds.items.iter().enumerate() {
        by_class[it.class].push(i);
    }
    let small_classes: Vec<usize> = (0..by_class.len())
        .filter(|&c| !by_class[c].is_empty() && by_class[c].len() < 2)
        .collect();
    let usable: Vec<usize> = (0..by_class.len())
        .filter(|&c| by_class[c].len() >= 2)
        .collect();
    if usable.len() < 2 {
        bail!(
            "sampling needs at least two classes with two or more images each; {} has {}",
            ds.root.display(),
            usable.len()
        );
    }
    // Pool of negatives: all images of usable classes, in class order, with class offsets.
    let mut pool = Vec::new();
    let mut start = vec![0usize; by_class.len()];
    for &c in &usable {
        start[c] = pool.len();
        pool.extend_from_slice(&by_class[c]);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut triplets = Vec::with_capacity(ds.items.len() * n_pos * n_neg);
    let mut others: Vec<usize> = Vec::new();
    for &c in &usable {
        let members = &by_class[c];
        let outside = pool.len() - members.len();
        for &q in members {
            others.clear();
            others.extend(members.iter().copied().filter(|&x| x != q));
            for j in 0..n_pos {
                let p = if j < others.len() {
                    // Partial Fisher-Yates: distinct positives while they last.
                    let k = rng.random_range(j..others.len());
                    others.swap(j, k);
                    others[j]
                } else {
                    others[rng.random_range(0..others.len())]
                };
                for _ in 0..n_neg {
                    let mut r = rng.random_range(0..outside);
                    if r >= start[c] {
                        r += members.len();
                    }
                    triplets.push(Triplet {
                        query: q,
                        positive: p,
                        negative: pool[r],
                    });
                }
            }
        }
    }
    // Back to dataset order of the query, so the file reads like the seed's.
    triplets.sort_by_key(|t| t.query);
    Ok(Sampled {
        triplets,
        small_classes,
    })
}

/// Writes triplets as `query,positive,negative` path lines.
pub fn write_triplets(ds: &Dataset, triplets: &[Triplet], out: &Path) -> Result<()> {
    let tmp = out.with_extension("tmp");
    let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    for t in triplets {
        writeln!(
            w,
            "{},{},{}",
            ds.items[t.query].path.display(),
            ds.items[t.positive].path.display(),
            ds.items[t.negative].path.display()
        )?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Reads a triplet file back into indices of `ds` (paths must belong to the dataset).
pub fn read_triplets(ds: &Dataset, file: &Path) -> Result<Vec<Triplet>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let index: std::collections::HashMap<&Path, usize> = ds
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.path.as_path(), i))
        .collect();
    let mut out = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(',').collect();
        if parts.len() != 3 {
            bail!(
                "{} line {}: expected `query,positive,negative`, got {line:?}",
                file.display(),
                ln + 1
            );
        }
        let mut ids = [0usize; 3];
        for (k, p) in parts.iter().enumerate() {
            ids[k] = *index.get(Path::new(p.trim())).with_context(|| {
                format!(
                    "{} line {}: {p} is not an image of {}; sample the triplets from the same --data",
                    file.display(),
                    ln + 1,
                    ds.root.display()
                )
            })?;
        }
        out.push(Triplet {
            query: ids[0],
            positive: ids[1],
            negative: ids[2],
        });
    }
    Ok(out)
}
