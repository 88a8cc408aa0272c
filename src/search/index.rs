//! Exact nearest-neighbour search by Euclidean distance over a contiguous f32 buffer.
//!
//! Queries are processed in blocks so each database row, once loaded, is compared with every query
//! of the block while it sits in cache; blocks run in parallel; each query keeps a partial top-k.

use crate::cpu::products;
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

/// Candidates of one query in [`fused`]: at least its `m` smallest values, pushed in any order at
/// O(1) amortised where [`TopK`] inserts in order (against `TopK` here, no difference stood out of
/// the noise at 100k or 8k rows; it bounds the cost where the top-k changes often: small or
/// clustered DBs, the first rows of every task): up to `2m` items are kept unsorted, and when full
/// the `m` smallest stay and the largest of those becomes the bound.
struct Reservoir {
    m: usize,
    items: Vec<(f32, usize)>,
    bound: f32,
}

impl Reservoir {
    fn new(m: usize) -> Self {
        Self {
            m,
            items: Vec::with_capacity(2 * m),
            bound: f32::INFINITY,
        }
    }

    /// Adds `(d, i)` when `d` is below the bound; returns the bound.
    #[inline]
    fn push(&mut self, d: f32, i: usize) -> f32 {
        if d < self.bound {
            self.items.push((d, i));
            if self.items.len() == 2 * self.m {
                let m = self.m;
                self.items
                    .select_nth_unstable_by(m - 1, |a, b| a.0.total_cmp(&b.0));
                self.items.truncate(m);
                self.bound = self.items.iter().fold(f32::NEG_INFINITY, |b, x| b.max(x.0));
            }
        }
        self.bound
    }
}

pub(crate) use crate::cpu::l2::sq_l2;

/// Below this many queries the search scans the DB directly, split across threads by DB rows;
/// from it on, distances come from products (‖x‖² − 2 q·x) over blocks of queries and rows: the
/// fused kernel of [`products`] where the CPU has it, else matrix products.
const GEMM_MIN_QUERIES: usize = 8;
/// Most queries per block of either product path (fewer when that leaves threads idle).
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
    } else if products::available() {
        fused(db, dim, queries, k, skip)
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

/// The top `k` of a query's candidate `rows` by exact distance (the matrix-product paths' last
/// step: their products' rounding only chose the candidates).
fn rerank(
    q: &[f32],
    db: &[f32],
    dim: usize,
    k: usize,
    rows: impl Iterator<Item = usize>,
) -> Vec<Hit> {
    let mut exact = TopK::new(k);
    for i in rows {
        exact.push(sq_l2(q, &db[i * dim..(i + 1) * dim]), i);
    }
    finish(exact)
}

/// Top-k candidates kept per query beyond `k`: they absorb the rounding of ‖q‖² + ‖x‖² − 2q·x and
/// are re-ranked by exact distances, so results equal the direct computation's.
fn extra(k: usize) -> usize {
    if k == 0 { 0 } else { 8.max(k / 8) }
}

/// Most bytes of one block of queries: the block is what [`products::products_below`] packs and
/// passes over every cache block of rows, so it stays in L2 (512 KB on the machines measured).
const QUERY_BLOCK_BYTES: usize = 256 * 1024;
/// Fewest DB rows per task of [`fused`].
const MIN_RANGE: usize = 4096;
/// Fewest queries per block of [`fused`] (two AVX-512 groups).
const MIN_QUERY_BLOCK: usize = 32;
/// Tasks of [`fused`] per thread, so that a core slowed by another tenant does not hold up the
/// search: split first by queries (each block reads the whole DB, but starts no top-k afresh),
/// then, where queries are too few for that, by DB rows.
const TASKS_PER_THREAD: usize = 4;

/// Many queries, on CPUs with [`products`]' kernel: tasks are (block of queries, range of DB rows)
/// pairs, claimed by the threads as they come (about 4 per thread, so a core slowed by another
/// tenant does not hold up the search); each keeps a candidate top-k per query, and a query's
/// candidates from all ranges are re-ranked by exact distances.
fn fused(
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
    let threads = rayon::current_num_threads().max(1);
    let tasks = threads * TASKS_PER_THREAD;
    let qb_max = (QUERY_BLOCK_BYTES / (dim * 4)).clamp(MIN_QUERY_BLOCK, QUERY_BLOCK);
    let qblocks = nq
        .div_ceil(qb_max)
        .max(tasks.min(nq.div_ceil(MIN_QUERY_BLOCK)));
    let qb = nq.div_ceil(qblocks);
    let qblocks = nq.div_ceil(qb);
    let range = n.div_ceil(tasks.div_ceil(qblocks)).max(MIN_RANGE);
    let ranges = n.div_ceil(range).max(1);
    let parts: Vec<Vec<Reservoir>> = (0..qblocks * ranges)
        .into_par_iter()
        .map(|task| {
            let (q0, r0) = ((task / ranges) * qb, (task % ranges) * range);
            let (q1, r1) = ((q0 + qb).min(nq), (r0 + range).min(n));
            let mut tops: Vec<Reservoir> = (q0..q1).map(|_| Reservoir::new(k + extra(k))).collect();
            let mut bound = vec![f32::INFINITY; q1 - q0];
            if k > 0 {
                products::products_below(
                    &queries[q0 * dim..q1 * dim],
                    dim,
                    &db[r0 * dim..r1 * dim],
                    &xn[r0..r1],
                    &mut bound,
                    &mut |t, j, e| {
                        let (q, i, qq) = (q0 + t, r0 + j, qn[q0 + t]);
                        if skip(q, i) {
                            tops[t].bound - qq
                        } else {
                            tops[t].push(e + qq, i) - qq
                        }
                    },
                );
            }
            tops
        })
        .collect();
    (0..nq)
        .map(|q| {
            let (qi, t) = (q / qb, q % qb);
            let rows = parts[qi * ranges..(qi + 1) * ranges]
                .iter()
                .flat_map(|part| part[t].items.iter().map(|&(_, i)| i));
            rerank(&queries[q * dim..(q + 1) * dim], db, dim, k, rows)
        })
        .collect()
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
            let mut tops: Vec<TopK> = (q0..q1).map(|_| TopK::new(k + extra(k))).collect();
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
                    rerank(q, db, dim, k, top.items.into_iter().map(|(_, i)| i))
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
    fn scan_matrix_product_and_fused_paths_agree_with_brute_force() {
        let dim = 64;
        let n = 3000;
        let mut s = 7u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let db: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
        let skip = |q: usize, i: usize| i == 3 * q;
        for nq in [1, 3, 8, 70] {
            let qs: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
            let mut paths = vec![("search", search(&db, dim, &qs, 20, &skip))];
            if nq >= GEMM_MIN_QUERIES {
                paths.push(("matrix products", blocked(&db, dim, &qs, 20, &skip)));
                if products::available() {
                    paths.push(("fused kernel", fused(&db, dim, &qs, 20, &skip)));
                }
            }
            for (path, got) in paths {
                assert_eq!(got.len(), nq);
                for (qi, hits) in got.iter().enumerate() {
                    let q = &qs[qi * dim..(qi + 1) * dim];
                    let mut want = brute(&db, dim, q, 21);
                    want.retain(|&(_, i)| i != 3 * qi);
                    want.truncate(20);
                    check(
                        &db,
                        dim,
                        q,
                        hits,
                        &want,
                        &format!("{path}, {nq} queries, query {qi}"),
                    );
                }
            }
        }
    }

    /// The fused path's tasks: queries split into blocks, and the DB into row ranges where
    /// queries are few, each range's candidates re-ranked together (with skips in every range).
    #[test]
    fn fused_path_split_by_queries_and_rows_agrees_with_brute_force() {
        if !products::available() {
            return;
        }
        let (dim, n) = (16, 3 * MIN_RANGE + 5);
        let mut s = 11u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32
        };
        let db: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
        let skip = |q: usize, i: usize| i % MIN_RANGE == q % 7;
        for nq in [8, 100] {
            let qs: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
            let got = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap()
                .install(|| fused(&db, dim, &qs, 15, &skip));
            assert_eq!(got.len(), nq);
            for (qi, hits) in got.iter().enumerate() {
                let q = &qs[qi * dim..(qi + 1) * dim];
                let mut want = brute(&db, dim, q, 30);
                want.retain(|&(_, i)| !skip(qi, i));
                want.truncate(15);
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
