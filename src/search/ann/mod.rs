//! HNSW approximate nearest-neighbour index (Malkov & Yashunin 2016) over vectors the caller owns.
//!
//! The index holds only the graph; vectors come as one contiguous `&[f32]` (row `i` at
//! `[i * dim, (i + 1) * dim)`, e.g. the DB's memory-mapped `vectors.npy`) on every call. Distances are
//! squared Euclidean. Node ids are row numbers.
//!
//! Layout: a fixed-degree neighbour array per layer, `[count, id × cap]` u32 slots — `cap = 2M` on
//! layer 0 (one slot per node, `n × (1 + 2M)`), `cap = M` on upper layers (nodes of level `L ≥ 1` own
//! `L` consecutive slots in a second array at `upper_off[i]`). Both arrays are saved as-is and searched
//! straight from a read-only memory map after [`Hnsw::open`]; a mutation first copies them into memory.
//! Slots are `AtomicU32` so a build inserts from many threads (one spin lock per node for writers;
//! readers load relaxed and tolerate a list being rewritten: every id they may see is a valid node).
//! Deletes are tombstones: deleted nodes still route searches but never come out of them.

use crate::cpu::l2::{L2Fn, L2x4Fn, l2_kernel, prefetch};
use memmap2::Mmap;
use rayon::prelude::*;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

mod build;
pub mod db;
mod delta;

mod file;
#[cfg(test)]
mod tests;
pub mod update;

#[inline(always)]
fn prefetch_u32(s: &[AtomicU32]) {
    // SAFETY: AtomicU32 and f32 have the same size; the pointer is only used as a prefetch hint.
    prefetch(
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) },
        3,
    );
}

/// Build parameters.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Neighbours per node on upper layers (2M on layer 0).
    pub m: usize,
    pub ef_construction: usize,
    /// Seeds the level draw (a hash of seed and id, so levels do not depend on insertion order).
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            seed: 0x5eed,
        }
    }
}

/// One result: node id and squared Euclidean distance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: u32,
    pub dist: f32,
}

const MAGIC: &[u8; 8] = b"DRHNSW02";
const HEADER: usize = 64;
const MAX_LEVEL: u8 = 15;
const NONE: u32 = u32::MAX;

/// A u32 slot array, owned or borrowed from a memory map.
enum Slots {
    Owned(Vec<AtomicU32>),
    Mapped {
        map: std::sync::Arc<Mmap>,
        off: usize,
        len: usize,
    },
}

impl Slots {
    #[inline(always)]
    fn get(&self) -> &[AtomicU32] {
        match self {
            Slots::Owned(v) => v,
            // SAFETY: `off` is 4-aligned inside the map (checked by `open`), AtomicU32 has u32's layout,
            // and a mapped index is never written (mutations copy it first).
            Slots::Mapped { map, off, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*off) as *const AtomicU32, *len)
            },
        }
    }
    fn owned(&mut self) -> &mut Vec<AtomicU32> {
        if let Slots::Mapped { .. } = self {
            *self = Slots::Owned(
                self.get()
                    .iter()
                    .map(|a| AtomicU32::new(a.load(Relaxed)))
                    .collect(),
            );
        }
        match self {
            Slots::Owned(v) => v,
            Slots::Mapped { .. } => unreachable!(),
        }
    }
}

pub struct Hnsw {
    dim: usize,
    m: usize,
    ef_construction: usize,
    seed: u64,
    n: usize,
    levels: Vec<u8>,
    upper_off: Vec<u32>,
    l0: Slots,
    upper: Slots,
    entry: u32,
    max_level: u8,
    deleted: Vec<u64>,
    n_deleted: usize,
    locks: Vec<AtomicBool>,
    /// Nodes whose neighbour lists changed since the last [`Hnsw::take_touched`] (for a journal).
    touched: Vec<AtomicU64>,
    l2: L2Fn,
    l2x4: L2x4Fn,
    /// The saved file this graph was opened from, when it was (what a delta is written against).
    base: Option<delta::Base>,
    /// Neighbour lists a delta file replaces or adds, over the base file's (see `delta.rs`).
    delta: Option<delta::Delta>,
    /// Recall@10 against exact search measured at build time for a ladder of `ef` values
    /// (ascending `ef`), saved with the graph; see [`Hnsw::ef_for_recall`].
    pub calibration: Vec<(u32, f32)>,
}

/// Per-thread search scratch: visited marks by generation, candidate and result heaps.
#[derive(Default)]
struct Ctx {
    mark: Vec<u16>,
    epoch: u16,
    cand: BinaryHeap<Reverse<u64>>,
    res: BinaryHeap<u64>,
    buf: Vec<u32>,
}

impl Ctx {
    fn reset(&mut self, n: usize) {
        if self.mark.len() < n {
            self.mark.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.mark.fill(0);
            self.epoch = 1;
        }
        self.cand.clear();
        self.res.clear();
    }
    #[inline(always)]
    fn visit(&mut self, j: u32) -> bool {
        let m = &mut self.mark[j as usize];
        let fresh = *m != self.epoch;
        *m = self.epoch;
        fresh
    }
}

thread_local! { static CTX: RefCell<Ctx> = RefCell::new(Ctx::default()); }

/// Heap key: squared distances are ≥ 0, so their bit patterns order like the floats.
#[inline(always)]
fn key(d: f32, id: u32) -> u64 {
    ((d.to_bits() as u64) << 32) | id as u64
}
#[inline(always)]
fn unkey(k: u64) -> (f32, u32) {
    (f32::from_bits((k >> 32) as u32), k as u32)
}

fn draw_level(seed: u64, id: usize, m: usize) -> u8 {
    let mut z = seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    ((-u.ln() / (m as f64).ln()) as u32).min(MAX_LEVEL as u32) as u8
}

/// Filter type for batch searches (shared across threads).
pub type Filter<'a> = &'a (dyn Fn(u32) -> bool + Sync);

impl Hnsw {
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn live(&self) -> usize {
        self.n - self.n_deleted
    }
    /// The build parameters (M, efConstruction, seed) the graph was made with.
    pub fn params(&self) -> Params {
        Params {
            m: self.m,
            ef_construction: self.ef_construction,
            seed: self.seed,
        }
    }

    /// The smallest calibrated `ef` whose measured recall@10 reaches `target`; `None` when no
    /// calibrated `ef` does (or the index has no calibration).
    pub fn ef_for_recall(&self, target: f64) -> Option<usize> {
        self.calibration
            .iter()
            .find(|&&(_, r)| r as f64 >= target)
            .map(|&(ef, _)| ef as usize)
    }

    /// Replaces the tombstones: node `i` is deleted exactly when `removed(i)` (the DB's removed rows
    /// are the truth; the ones saved in the file are not trusted).
    pub fn set_deleted(&mut self, removed: impl Fn(u32) -> bool) {
        self.deleted.iter_mut().for_each(|w| *w = 0);
        self.n_deleted = 0;
        for i in 0..self.n as u32 {
            if removed(i) {
                self.remove(i);
            }
        }
    }

    fn s0(&self) -> usize {
        1 + 2 * self.m
    }
    fn su(&self) -> usize {
        1 + self.m
    }
    /// Slot of node `i` on layer `lev` (`[count, ids…]`).
    #[inline(always)]
    /// Whether every upper-level list of `nodes` names only nodes that reach that level: a search
    /// at level L reads the level-L list of each node it finds there (checked when a graph file or
    /// a delta is opened).
    fn upper_lists_reach_their_levels(&self, nodes: impl IntoIterator<Item = u32>) -> bool {
        nodes.into_iter().all(|i| {
            (1..=self.levels[i as usize]).all(|lv| {
                let sl = self.slot(i, lv);
                let c = (sl[0].load(Relaxed) as usize).min(sl.len() - 1);
                sl[1..=c]
                    .iter()
                    .all(|x| self.levels[x.load(Relaxed) as usize] >= lv)
            })
        })
    }

    fn slot(&self, i: u32, lev: u8) -> &[AtomicU32] {
        if lev == 0 {
            let s = self.s0();
            if let Some(d) = &self.delta
                && let Some(k) = d.l0_index(i)
            {
                return &d.l0.get()[k * s..(k + 1) * s];
            }
            &self.l0.get()[i as usize * s..(i as usize + 1) * s]
        } else {
            let s = self.su();
            let o = self.upper_off[i as usize] as usize + (lev as usize - 1) * s;
            if let Some(d) = &self.delta
                && o >= d.base_ulen
            {
                return &d.upper.get()[o - d.base_ulen..o - d.base_ulen + s];
            }
            &self.upper.get()[o..o + s]
        }
    }
    #[inline(always)]
    fn row<'v>(&self, vectors: &'v [f32], i: u32) -> &'v [f32] {
        &vectors[i as usize * self.dim..(i as usize + 1) * self.dim]
    }
    fn lock(&self, i: u32) {
        while self.locks[i as usize]
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }
    fn unlock(&self, i: u32) {
        self.locks[i as usize].store(false, Release);
    }
    fn touch(&self, i: u32) {
        self.touched[i as usize / 64].fetch_or(1 << (i % 64), Relaxed);
    }

    fn greedy(
        &self,
        vectors: &[f32],
        q: &[f32],
        mut cur: u32,
        mut dcur: f32,
        lev: u8,
    ) -> (u32, f32) {
        loop {
            let s = self.slot(cur, lev);
            let cnt = (s[0].load(Relaxed) as usize).min(s.len() - 1);
            let mut moved = false;
            for a in &s[1..=cnt] {
                let j = a.load(Relaxed);
                if j as usize >= self.n {
                    continue;
                }
                let d = (self.l2)(q, self.row(vectors, j));
                if d < dcur {
                    (cur, dcur, moved) = (j, d, true);
                }
            }
            if !moved {
                return (cur, dcur);
            }
        }
    }

    /// Best-first search of one layer from `ep`, leaving the best `ef` accepted nodes in `ctx.res`.
    /// Rejected nodes (filter, tombstones) are still expanded. Returns false when more than `budget`
    /// nodes were visited (the caller then falls back to a scan).
    #[allow(clippy::too_many_arguments)]
    fn search_layer(
        &self,
        vectors: &[f32],
        q: &[f32],
        ep: u32,
        dep: f32,
        ef: usize,
        lev: u8,
        ctx: &mut Ctx,
        accept: Option<&dyn Fn(u32) -> bool>,
        budget: usize,
    ) -> bool {
        ctx.reset(self.n);
        let ok = |j: u32| accept.is_none_or(|f| f(j));
        let lines = (self.dim * 4).div_ceil(64).min(8);
        ctx.visit(ep);
        ctx.cand.push(Reverse(key(dep, ep)));
        if ok(ep) {
            ctx.res.push(key(dep, ep));
        }
        let mut lower = f32::INFINITY;
        let mut visited = 1usize;
        let mut buf = std::mem::take(&mut ctx.buf);
        while let Some(Reverse(c)) = ctx.cand.pop() {
            let (dc, i) = unkey(c);
            if dc > lower {
                break;
            }
            let s = self.slot(i, lev);
            let cnt = (s[0].load(Relaxed) as usize).min(s.len() - 1);
            if let Some(Reverse(nx)) = ctx.cand.peek() {
                // The next candidate's neighbour list, while this one's distances are computed.
                prefetch_u32(self.slot(unkey(*nx).1, lev));
            }
            buf.clear();
            for a in &s[1..=cnt] {
                let j = a.load(Relaxed);
                if (j as usize) < self.n && ctx.visit(j) {
                    buf.push(j);
                }
            }
            for &j in buf.iter().take(4) {
                prefetch(self.row(vectors, j), lines);
            }
            // Four neighbours per pass over `q` (the next four fetched meanwhile), then one at a
            // time; the distances are the same either way, and are used in list order.
            let mut ds = [0f32; 4];
            let full = buf.len() - buf.len() % 4;
            for t in 0..buf.len() {
                let j = buf[t];
                let d = if t >= full {
                    (self.l2)(q, self.row(vectors, j))
                } else {
                    if t % 4 == 0 {
                        let rows = [0, 1, 2, 3].map(|u| self.row(vectors, buf[t + u]));
                        let next = [0, 1, 2, 3].map(|u| {
                            buf.get(t + 4 + u)
                                .map_or(rows[u], |&x| self.row(vectors, x))
                        });
                        ds = (self.l2x4)(q, rows, next);
                    }
                    ds[t % 4]
                };
                if d < lower || ctx.res.len() < ef {
                    ctx.cand.push(Reverse(key(d, j)));
                    if ok(j) {
                        ctx.res.push(key(d, j));
                        if ctx.res.len() > ef {
                            ctx.res.pop();
                        }
                        if ctx.res.len() >= ef {
                            lower = unkey(*ctx.res.peek().unwrap()).0;
                        }
                    }
                }
            }
            visited += buf.len();
            if visited > budget {
                ctx.buf = buf;
                return false;
            }
        }
        ctx.buf = buf;
        true
    }

    /// Marks `id` deleted: it keeps routing searches but is never returned. Returns whether it was live.
    pub fn remove(&mut self, id: u32) -> bool {
        let (w, b) = (id as usize / 64, 1u64 << (id % 64));
        if id as usize >= self.n || self.deleted[w] & b != 0 {
            return false;
        }
        self.deleted[w] |= b;
        self.n_deleted += 1;
        true
    }

    #[inline(always)]
    pub fn is_deleted(&self, id: u32) -> bool {
        self.deleted[id as usize / 64] & (1 << (id % 64)) != 0
    }

    /// Ids whose neighbour lists changed since the last call (what an incremental save must rewrite).
    pub fn take_touched(&mut self) -> Vec<u32> {
        let mut out = vec![];
        for (w, a) in self.touched.iter().enumerate() {
            let mut x = a.swap(0, Relaxed);
            while x != 0 {
                out.push((w * 64) as u32 + x.trailing_zeros());
                x &= x - 1;
            }
        }
        out
    }

    /// The `k` nearest live nodes to `q` that pass `filter`, nearest first. `ef` (≥ k) trades speed for
    /// recall. A filter that few nodes pass (estimated on a sample) is answered by an exact scan over
    /// the passing nodes; so is a filtered search that wanders too far.
    pub fn search(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Hit> {
        assert!(
            vectors.len() >= self.n * self.dim,
            "vectors hold fewer rows than the index"
        );
        assert_eq!(q.len(), self.dim, "query dimension");
        if self.n == 0 || k == 0 {
            return vec![];
        }
        let ef = ef.max(k);
        let accept = |j: u32| !self.is_deleted(j) && filter.is_none_or(|f| f(j));
        let budget = if filter.is_some() {
            let step = (self.n / 1024).max(1);
            let hit = (0..self.n)
                .step_by(step)
                .filter(|&i| accept(i as u32))
                .count();
            let sel = hit as f64 / self.n.div_ceil(step) as f64;
            if sel * sel * (self.n as f64) < 64.0 * ef as f64 {
                return self.scan(vectors, q, k, &accept);
            }
            self.n / 4
        } else {
            usize::MAX
        };
        let mut ep = self.entry;
        let mut dep = (self.l2)(q, self.row(vectors, ep));
        for lev in (1..=self.max_level).rev() {
            (ep, dep) = self.greedy(vectors, q, ep, dep, lev);
        }
        let acc: Option<&dyn Fn(u32) -> bool> = if filter.is_some() || self.n_deleted > 0 {
            Some(&accept)
        } else {
            None
        };
        CTX.with_borrow_mut(|ctx| {
            if !self.search_layer(vectors, q, ep, dep, ef, 0, ctx, acc, budget) {
                return self.scan(vectors, q, k, &accept);
            }
            let mut v: Vec<u64> = ctx.res.drain().collect();
            v.sort_unstable();
            v.iter()
                .take(k)
                .map(|&c| Hit {
                    id: unkey(c).1,
                    dist: unkey(c).0,
                })
                .collect()
        })
    }

    /// Exact top-`k` over the nodes `accept` lets through.
    pub fn scan(
        &self,
        vectors: &[f32],
        q: &[f32],
        k: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<Hit> {
        let mut top: BinaryHeap<u64> = BinaryHeap::with_capacity(k + 1);
        for i in 0..self.n as u32 {
            if accept(i) {
                let d = (self.l2)(q, self.row(vectors, i));
                if top.len() < k || key(d, i) < *top.peek().unwrap() {
                    top.push(key(d, i));
                    if top.len() > k {
                        top.pop();
                    }
                }
            }
        }
        top.into_sorted_vec()
            .into_iter()
            .map(|c| Hit {
                id: unkey(c).1,
                dist: unkey(c).0,
            })
            .collect()
    }

    /// [`Hnsw::search`] for many queries (rows of `queries`) in parallel on the current rayon pool.
    pub fn search_batch(
        &self,
        vectors: &[f32],
        queries: &[f32],
        k: usize,
        ef: usize,
        filter: Option<Filter>,
    ) -> Vec<Vec<Hit>> {
        queries
            .par_chunks(self.dim)
            .map(|q| self.search(vectors, q, k, ef, filter.map(|f| f as &dyn Fn(u32) -> bool)))
            .collect()
    }
}
