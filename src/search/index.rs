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

pub(crate) use crate::cpu::l2::sq_l2;

/// Below this many queries the search scans the DB directly, split across threads by DB rows;
/// from it on, distances come from matrix products (‖x‖² − 2 q·x) over blocks of queries and rows.
const GEMM_MIN_QUERIES: usize = 8;
/// Most queries per block of the matrix-product path (fewer when that leaves threads idle).
const QUERY_BLOCK: usize = 512;
/// DB rows per block (a `QUERY_BLOCK × DB_BLOCK` tile of products stays in cache).
const DB_BLOCK: usize = 1024;
/// Rows per vectorised test of a block's distances against the worst of a query's top-k.
const SCAN: usize = 32;

fn finish(t: TopK) -> Vec<Hit> {
    t.items
        .into_iter()
        .map(|(d, i)| Hit {
            index: i,
            distance: d.max(0.0).sqrt(),
        })
        .collect()
}

/// Top-`k` database rows for each query, nearest first (ties: lower row first). `skip(q, i)`
/// excludes row `i` for query `q` (e.g. the query itself when it is in the database).
pub fn search(
    db: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    skip: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<Vec<Hit>> {
    assert!(dim > 0 && db.len().is_multiple_of(dim) && queries.len().is_multiple_of(dim));
    let nq = queries.len() / dim;
    if nq < GEMM_MIN_QUERIES {
        scan(db, dim, queries, k, skip)
    } else {
        blocked(db, dim, queries, k, skip)
    }
}

/// Few queries: every thread scans a slice of the DB for all queries; partial top-ks are merged.
fn scan(
    db: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    skip: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<Vec<Hit>> {
    let nq = queries.len() / dim;
    let n = db.len() / dim;
    let parts = rayon::current_num_threads().max(1) * 4;
    let chunk = n.div_ceil(parts).max(1024);
    let partial: Vec<Vec<TopK>> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(n));
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            for i in r0..r1 {
                let row = &db[i * dim..(i + 1) * dim];
                for (q, t) in tops.iter_mut().enumerate() {
                    let d = sq_l2(&queries[q * dim..(q + 1) * dim], row);
                    if d < t.worst() && !skip(q, i) {
                        t.push(d, i);
                    }
                }
            }
            tops
        })
        .collect();
    let mut out: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    for tops in partial {
        for (q, t) in tops.into_iter().enumerate() {
            for (d, i) in t.items {
                out[q].push(d, i);
            }
        }
    }
    out.into_iter().map(finish).collect()
}

/// Squared norm of every row.
pub(crate) fn norms(x: &[f32], dim: usize) -> Vec<f32> {
    x.par_chunks(dim.max(1) * 4096)
        .flat_map_iter(|c| {
            c.chunks_exact(dim)
                .map(|r| r.iter().map(|v| v * v).sum::<f32>())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `dots[m × nb]` (row-major, row stride `nb`) = `a[a0..a0+m] · b[b0..b0+nb]ᵀ`, rows of `dim`
/// values, by one single-threaded matrix product (callers parallelise over blocks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_block(
    a: &[f32],
    a0: usize,
    m: usize,
    b: &[f32],
    b0: usize,
    nb: usize,
    dim: usize,
    dots: &mut [f32],
) {
    assert!(
        a.len() >= (a0 + m) * dim && b.len() >= (b0 + nb) * dim && dots.len() >= m * nb,
        "dot_block out of bounds"
    );
    // SAFETY: the assert above: the pointers cover m×dim, nb×dim and m×nb f32 values with the
    // strides given.
    unsafe {
        gemm::gemm(
            m,
            nb,
            dim,
            dots.as_mut_ptr(),
            1,
            nb as isize,
            false,
            a[a0 * dim..].as_ptr(),
            1,
            dim as isize,
            b[b0 * dim..].as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Many queries: blocks of queries in parallel; per block, `q·x` for a block of rows by one
/// matrix product, then `‖q‖² + ‖x‖² − 2 q·x` into each query's top-k.
fn blocked(
    db: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    skip: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<Vec<Hit>> {
    let nq = queries.len() / dim;
    let n = db.len() / dim;
    let xn = norms(db, dim);
    let qn = norms(queries, dim);
    let qb = nq
        .div_ceil(rayon::current_num_threads().max(1))
        .clamp(16, QUERY_BLOCK);
    let blocks: Vec<usize> = (0..nq).step_by(qb).collect();
    let per_block: Vec<Vec<Vec<Hit>>> = blocks
        .par_iter()
        .map(|&q0| {
            let q1 = (q0 + qb).min(nq);
            let m = q1 - q0;
            // Candidates beyond k absorb the rounding of ‖q‖² + ‖x‖² − 2q·x; they are re-ranked by
            // exact distances below, so results equal the direct computation's.
            let extra = if k == 0 { 0 } else { 8.max(k / 8) };
            let mut tops: Vec<TopK> = (q0..q1).map(|_| TopK::new(k + extra)).collect();
            let mut dots = vec![0f32; m * DB_BLOCK];
            for r0 in (0..n).step_by(DB_BLOCK) {
                let r1 = (r0 + DB_BLOCK).min(n);
                let nb = r1 - r0;
                dot_block(queries, q0, m, db, r0, nb, dim, &mut dots);
                let xb = &xn[r0..r1];
                for (t, top) in tops.iter_mut().enumerate() {
                    let qq = qn[q0 + t];
                    let row = &dots[t * nb..(t + 1) * nb];
                    // Compare ‖x‖² − 2q·x against (worst − ‖q‖²): one subtraction per row fewer.
                    let mut bound = top.worst() - qq;
                    for (c, (dc, xc)) in row.chunks(SCAN).zip(xb.chunks(SCAN)).enumerate() {
                        // Most rows of a block lose to the worst of the top-k: a vectorised test
                        // of the whole chunk first (a quarter of the time went to this loop
                        // row by row, perf), the same comparison row by row only where one wins.
                        let hit = dc
                            .iter()
                            .zip(xc)
                            .fold(false, |h, (&dot, &x2)| h | (x2 - 2.0 * dot < bound));
                        if !hit {
                            continue;
                        }
                        for (j, (&dot, &x2)) in dc.iter().zip(xc).enumerate() {
                            let e = x2 - 2.0 * dot;
                            let i = r0 + c * SCAN + j;
                            if e < bound && !skip(q0 + t, i) {
                                top.push((e + qq).max(0.0), i);
                                bound = top.worst() - qq;
                            }
                        }
                    }
                }
            }
            tops.into_iter()
                .enumerate()
                .map(|(t, top)| {
                    let q = &queries[(q0 + t) * dim..(q0 + t + 1) * dim];
                    let mut exact = TopK::new(k);
                    for (_, i) in top.items {
                        exact.push(sq_l2(q, &db[i * dim..(i + 1) * dim]), i);
                    }
                    finish(exact)
                })
                .collect()
        })
        .collect();
    per_block.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference squared distance, independent of `sq_l2`: f64, one plain loop.
    fn ref_sq(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let mut s = 0f64;
        for i in 0..a.len() {
            let d = a[i] as f64 - b[i] as f64;
            s += d * d;
        }
        s
    }

    /// Reference top-k by a full sort of f64 distances (ties: lower row first).
    fn brute(db: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<(f64, usize)> {
        let mut d = Vec::new();
        for i in 0..db.len() / dim {
            d.push((ref_sq(q, &db[i * dim..(i + 1) * dim]), i));
        }
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        d.truncate(k);
        d
    }

    /// `hits` are the reference's rows in its order, up to swaps of near-ties (f32 rounding can
    /// order two rows whose exact distances differ by < 1e-5 relative either way), with distances
    /// within 1e-5 relative of the exact ones.
    fn check(db: &[f32], dim: usize, q: &[f32], hits: &[Hit], want: &[(f64, usize)], what: &str) {
        assert_eq!(hits.len(), want.len(), "{what}");
        for (r, (h, &(wd, wi))) in hits.iter().zip(want).enumerate() {
            let exact = ref_sq(q, &db[h.index * dim..(h.index + 1) * dim]);
            assert!(
                h.index == wi || (exact - wd).abs() <= 1e-5 * wd.max(1e-3),
                "{what}: rank {r} is row {} (d² {exact}), reference row {wi} (d² {wd})",
                h.index
            );
            let e = exact.sqrt();
            assert!(
                (h.distance as f64 - e).abs() <= 1e-5 * e.max(1e-3),
                "{what}: rank {r} distance {} vs exact {e}",
                h.distance
            );
        }
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
            let q = &qs[qi * dim..(qi + 1) * dim];
            let want = brute(&db, dim, q, 10);
            check(&db, dim, q, hits, &want, &format!("query {qi}"));
            assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
        }
    }

    #[test]
    fn scan_and_matrix_product_paths_agree_with_brute_force() {
        let dim = 64;
        let n = 3000;
        let mut s = 7u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let db: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
        for nq in [1, 3, 8, 70] {
            let qs: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
            let got = search(&db, dim, &qs, 20, &|_, _| false);
            for (qi, hits) in got.iter().enumerate() {
                let q = &qs[qi * dim..(qi + 1) * dim];
                let want = brute(&db, dim, q, 20);
                check(
                    &db,
                    dim,
                    q,
                    hits,
                    &want,
                    &format!("{nq} queries, query {qi}"),
                );
            }
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
