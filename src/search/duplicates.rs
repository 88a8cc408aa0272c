//! Near-duplicates: every pair of DB images within a distance, grouped into connected components
//! (union-find). Pairs come from blocked matrix products over the upper triangle of the DB
//! (`‖x‖² + ‖y‖² − 2x·y` for a block of rows against a block of rows, in parallel over blocks),
//! candidates re-checked with the exact distance, so no pair is missed or invented by rounding.

use crate::render::grid::{Grid, GridRow, Mark};
use crate::search::index::{dot_block, norms, sq_l2};
use crate::store::db::Db;
use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default `--threshold`: Euclidean distance between L2-normalised pretrained features (at the
/// default 128 px) under which two images count as near-duplicates. Chosen on a planted set
/// (resized ×0.5/×2, JPEG quality 50 and 90 % crops of Tiny ImageNet images): see
/// `bench/RESULTS.md`, "Near-duplicates".
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Rows per block of the pair search (a block × block tile of products stays in cache).
const BLOCK: usize = 512;

/// One pair of DB rows within the threshold (`a < b`) and their distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub a: usize,
    pub b: usize,
    pub distance: f32,
}

/// Every pair of rows of `data` (`n × dim`) within Euclidean distance `threshold`, sorted by
/// `(a, b)`. Refused when there are more than `max_pairs` (a threshold far too large for
/// near-duplicates would otherwise list almost n²/2 pairs).
pub fn pairs_within(
    data: &[f32],
    dim: usize,
    threshold: f32,
    max_pairs: usize,
) -> Result<Vec<Pair>> {
    if !(threshold >= 0.0 && threshold.is_finite()) {
        bail!("the threshold must be a distance ≥ 0, got {threshold}");
    }
    assert!(dim > 0 && data.len().is_multiple_of(dim));
    let n = data.len() / dim;
    let xn = norms(data, dim);
    let t2 = threshold * threshold;
    let found = AtomicUsize::new(0);
    let blocks: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let per_block: Vec<Result<Vec<Pair>>> = blocks
        .par_iter()
        .map(|&a0| {
            let na = (a0 + BLOCK).min(n) - a0;
            let mut dots = vec![0f32; BLOCK * BLOCK];
            let mut out = Vec::new();
            let mut reported = 0;
            for b0 in (a0..n).step_by(BLOCK) {
                let nb = (b0 + BLOCK).min(n) - b0;
                dot_block(data, a0, na, data, b0, nb, dim, &mut dots);
                for i in 0..na {
                    let (gi, ni) = (a0 + i, xn[a0 + i]);
                    let row = &dots[i * nb..(i + 1) * nb];
                    // Within the diagonal block only j > i: each pair once.
                    let j0 = if b0 == a0 { i + 1 } else { 0 };
                    for (j, &dot) in row.iter().enumerate().skip(j0) {
                        let gj = b0 + j;
                        let approx = ni + xn[gj] - 2.0 * dot;
                        // A margin for the rounding of the expansion; the exact distance decides.
                        if approx <= t2 + 1e-4 * (ni + xn[gj]) + 1e-6 {
                            let d2 = sq_l2(
                                &data[gi * dim..(gi + 1) * dim],
                                &data[gj * dim..(gj + 1) * dim],
                            );
                            if d2 <= t2 {
                                out.push(Pair {
                                    a: gi,
                                    b: gj,
                                    distance: d2.sqrt(),
                                });
                            }
                        }
                    }
                }
                let new = out.len() - reported;
                reported = out.len();
                if found.fetch_add(new, Ordering::Relaxed) + new > max_pairs {
                    bail!(
                        "more than {max_pairs} pairs of images lie within distance {threshold}: that is \
                         not near-duplicates; pass a smaller --threshold"
                    );
                }
            }
            Ok(out)
        })
        .collect();
    let mut pairs = Vec::new();
    for p in per_block {
        pairs.extend(p?);
    }
    pairs.sort_by_key(|p| (p.a, p.b));
    Ok(pairs)
}

/// Union-find over `n` items with path halving and union by size.
struct Components {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl Components {
    fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra;
        self.size[ra] += self.size[rb];
    }
}

/// Groups of ids linked by the pairs (connected components of two or more), each sorted by id,
/// the groups in the order of their first id.
pub fn group(n: usize, pairs: &[Pair]) -> Vec<Vec<usize>> {
    let mut uf = Components::new(n);
    for p in pairs {
        uf.union(p.a, p.b);
    }
    let mut by_root: std::collections::HashMap<usize, Vec<usize>> = Default::default();
    for p in pairs {
        for id in [p.a, p.b] {
            let r = uf.find(id);
            by_root.entry(r).or_default().push(id);
        }
    }
    let mut groups: Vec<Vec<usize>> = by_root
        .into_values()
        .map(|mut g| {
            g.sort_unstable();
            g.dedup();
            g
        })
        .collect();
    groups.sort_by_key(|g| g[0]);
    groups
}

/// One image of a group and its distance to the group's first image.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// The row's stable id.
    pub id: u64,
    pub path: PathBuf,
    pub distance: f32,
}

/// Near-identical images: the first (lowest id) and the others, by id.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub group: usize,
    pub members: Vec<Member>,
}

/// What `deeprank duplicates` found.
#[derive(Clone, Debug, Serialize)]
pub struct Duplicates {
    pub threshold: f32,
    pub images: usize,
    /// Pairs within the threshold.
    pub pairs: usize,
    /// Images in some group.
    pub grouped: usize,
    pub groups: Vec<Group>,
}

/// The near-duplicate groups of a DB at `threshold` (pairs within it, joined transitively; each
/// member's distance is to its group's first image, so it can exceed the threshold in a chain).
/// Removed rows take no part.
pub fn find(db: &Db, threshold: f32) -> Result<Duplicates> {
    let dim = db.meta.dim;
    let data = db.vectors.data();
    let max_pairs = (50 * db.len()).max(1_000_000);
    let mut pairs = pairs_within(data, dim, threshold, max_pairs)?;
    pairs.retain(|p| !db.is_removed(p.a) && !db.is_removed(p.b));
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let groups: Vec<Group> = group(db.rows(), &pairs)
        .into_iter()
        .enumerate()
        .map(|(k, rows)| Group {
            group: k + 1,
            members: rows
                .iter()
                .map(|&r| Member {
                    id: db.ids[r],
                    path: db.entries[r].path.clone(),
                    distance: sq_l2(row(rows[0]), row(r)).sqrt(),
                })
                .collect(),
        })
        .collect();
    Ok(Duplicates {
        threshold,
        images: db.len(),
        pairs: pairs.len(),
        grouped: groups.iter().map(|g| g.members.len()).sum(),
        groups,
    })
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Most images drawn after a group's first one.
const GRID_ROWS: usize = 30;

impl Group {
    /// The group's picture: the first image, then (up to 30 of) the others with their distances to it.
    pub fn grid(&self) -> Grid {
        let first = &self.members[0];
        Grid {
            query: first.path.clone(),
            caption: format!("id {}", first.id),
            rows: self.members[1..]
                .iter()
                .take(GRID_ROWS)
                .enumerate()
                .map(|(i, m)| GridRow {
                    path: m.path.clone(),
                    rank: i + 1,
                    distance: m.distance,
                    caption: file_name(&m.path),
                    mark: Mark::Unknown,
                })
                .collect(),
            headings: Some((
                format!("group {}", self.group),
                if self.members.len() - 1 > GRID_ROWS {
                    format!(
                        "{GRID_ROWS} of {} near-duplicates, distance to the first",
                        self.members.len() - 1
                    )
                } else {
                    format!(
                        "{} near-duplicates, distance to the first",
                        self.members.len() - 1
                    )
                },
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(data: &[f32], dim: usize, t: f32) -> Vec<(usize, usize)> {
        let n = data.len() / dim;
        let mut v = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let d = sq_l2(&data[a * dim..(a + 1) * dim], &data[b * dim..(b + 1) * dim]);
                if d <= t * t {
                    v.push((a, b));
                }
            }
        }
        v
    }

    #[test]
    fn pairs_match_brute_force_across_blocks() {
        let dim = 24;
        // More rows than one block, so off-diagonal and diagonal blocks both count.
        let n = BLOCK + 300;
        let mut s = 11u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut data: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
        // Plant near copies far apart in id (different blocks) and close (same block).
        for (src, dst) in [(3, BLOCK + 5), (10, 11), (700, 20)] {
            for k in 0..dim {
                data[dst * dim + k] = data[src * dim + k] + 0.01 * rnd();
            }
        }
        for t in [0.05, 0.9, 1.1] {
            let got: Vec<(usize, usize)> = pairs_within(&data, dim, t, usize::MAX)
                .unwrap()
                .iter()
                .map(|p| (p.a, p.b))
                .collect();
            assert_eq!(got, brute(&data, dim, t), "threshold {t}");
        }
        let planted = pairs_within(&data, dim, 0.05, usize::MAX).unwrap();
        assert_eq!(planted.len(), 3);
        assert!(
            pairs_within(&data, dim, 10.0, 1000).is_err(),
            "too many pairs is refused"
        );
    }

    #[test]
    fn groups_are_connected_components() {
        let p = |a, b| Pair {
            a,
            b,
            distance: 0.0,
        };
        let g = group(10, &[p(7, 9), p(1, 4), p(4, 8), p(2, 3)]);
        assert_eq!(g, vec![vec![1, 4, 8], vec![2, 3], vec![7, 9]]);
        assert!(group(5, &[]).is_empty());
    }
}
