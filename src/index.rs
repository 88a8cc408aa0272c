//! Exact nearest-neighbour search by Euclidean distance over a contiguous f32 buffer.
//!
//! Queries are processed in blocks so each database row, once loaded, is compared with every query
//! of the block while it sits in cache; blocks run in parallel; each query keeps a partial top-k.

use rayon::prelude::*;

/// One search result: database row and Euclidean distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub index: usize,
    pub distance: f32,
}

/// Top-k of smallest squared distances, ties broken by the lower index.
struct TopK {
    k: usize,
    items: Vec<(f32, usize)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    #[inline]
    fn worst(&self) -> f32 {
        if self.items.len() < self.k {
            f32::INFINITY
        } else {
            self.items[self.items.len() - 1].0
        }
    }

    #[inline]
    fn push(&mut self, d: f32, i: usize) {
        if self.k == 0 || (self.items.len() >= self.k && d >= self.worst()) {
            return;
        }
        let pos = self
            .items
            .partition_point(|&(x, j)| x < d || (x == d && j < i));
        self.items.insert(pos, (d, i));
        self.items.truncate(self.k);
    }
}

#[inline]
fn sq_l2(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociation flags.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        s += d * d;
    }
    s
}

/// Queries per block: each DB row is reused this many times from cache.
const QUERY_BLOCK: usize = 16;

/// Top-`k` database rows for each query. `skip(q, i)` excludes row `i` for query `q` (e.g. the
/// query itself when it is in the database).
pub fn search(
    db: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    skip: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<Vec<Hit>> {
    assert!(dim > 0 && db.len().is_multiple_of(dim) && queries.len().is_multiple_of(dim));
    let nq = queries.len() / dim;
    let blocks: Vec<usize> = (0..nq).step_by(QUERY_BLOCK).collect();
    let per_block: Vec<Vec<Vec<Hit>>> = blocks
        .par_iter()
        .map(|&q0| {
            let q1 = (q0 + QUERY_BLOCK).min(nq);
            let mut tops: Vec<TopK> = (q0..q1).map(|_| TopK::new(k)).collect();
            for (i, row) in db.chunks_exact(dim).enumerate() {
                for (t, q) in (q0..q1).enumerate() {
                    let d = sq_l2(&queries[q * dim..(q + 1) * dim], row);
                    if d < tops[t].worst() || (d == tops[t].worst() && tops[t].items.len() < k) {
                        if skip(q, i) {
                            continue;
                        }
                        tops[t].push(d, i);
                    }
                }
            }
            tops.into_iter()
                .map(|t| {
                    t.items
                        .into_iter()
                        .map(|(d, i)| Hit {
                            index: i,
                            distance: d.max(0.0).sqrt(),
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(db: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<usize> {
        let mut d: Vec<(f32, usize)> = db
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, r)| (sq_l2(q, r), i))
            .collect();
        d.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
        d.into_iter().take(k).map(|x| x.1).collect()
    }

    #[test]
    fn matches_brute_force_sort() {
        let dim = 13;
        let n = 500;
        let mut s = 1u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32
        };
        let db: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
        let qs: Vec<f32> = (0..37 * dim).map(|_| rnd()).collect();
        let got = search(&db, dim, &qs, 10, &|_, _| false);
        assert_eq!(got.len(), 37);
        for (qi, hits) in got.iter().enumerate() {
            let want = brute(&db, dim, &qs[qi * dim..(qi + 1) * dim], 10);
            let idx: Vec<usize> = hits.iter().map(|h| h.index).collect();
            assert_eq!(idx, want);
            assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
        }
    }

    #[test]
    fn skip_and_small_db() {
        let db = vec![0.0, 0.0, 1.0, 0.0, 3.0, 0.0];
        let q = vec![0.0, 0.0];
        let hits = search(&db, 2, &q, 10, &|_, i| i == 0);
        assert_eq!(hits[0].len(), 2);
        assert_eq!(hits[0][0].index, 1);
        assert!((hits[0][0].distance - 1.0).abs() < 1e-6);
        assert!((hits[0][1].distance - 3.0).abs() < 1e-6);
    }

    #[test]
    fn ties_prefer_lower_index() {
        let db = vec![1.0, 1.0, 1.0, 1.0];
        let hits = search(&db, 1, &[0.0], 2, &|_, _| false);
        let idx: Vec<usize> = hits[0].iter().map(|h| h.index).collect();
        assert_eq!(idx, vec![0, 1]);
    }
}
