//! Building the graph: parallel inserts with one spin lock per node, the neighbour-selection
//! heuristic, and extending an opened (memory-mapped) index with appended rows.

use super::*;

/// The `ef` values [`Hnsw::calibrate`] measures.
pub const EF_LADDER: [u32; 12] = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];

impl Hnsw {
    /// An empty index for vectors of `dim` floats.
    pub fn new(dim: usize, p: &Params) -> Hnsw {
        assert!(dim > 0 && p.m >= 2 && p.m <= 255);
        Hnsw {
            dim,
            m: p.m,
            ef_construction: p.ef_construction.max(p.m),
            seed: p.seed,
            n: 0,
            levels: vec![],
            upper_off: vec![],
            l0: Slots::Owned(vec![]),
            upper: Slots::Owned(vec![]),
            entry: NONE,
            max_level: 0,
            deleted: vec![],
            n_deleted: 0,
            locks: vec![],
            touched: vec![],
            l2: l2_kernel(),
            l2x4: crate::cpu::l2::l2x4_kernel(),
            base: None,
            delta: None,
            calibration: vec![],
        }
    }

    /// Builds an index over all rows of `vectors`, inserting in parallel on the current rayon pool.
    pub fn build(vectors: &[f32], dim: usize, p: &Params) -> Hnsw {
        let mut h = Hnsw::new(dim, p);
        h.extend(vectors);
        h
    }

    /// Makes the index writable (copies a memory-mapped graph into memory) and sized for `n` nodes.
    pub(super) fn grow(&mut self, n: usize) {
        self.flatten();
        let (s0, su) = (self.s0(), self.su());
        let mut extra = 0;
        for i in self.n..n {
            let l = draw_level(self.seed, i, self.m);
            self.levels.push(l);
            self.upper_off.push(if l == 0 {
                NONE
            } else {
                (self.upper.get().len() + extra) as u32
            });
            extra += l as usize * su;
        }
        self.l0.owned().resize_with(n * s0, || AtomicU32::new(0));
        let ul = self.upper.get().len() + extra;
        self.upper.owned().resize_with(ul, || AtomicU32::new(0));
        self.locks.resize_with(n, || AtomicBool::new(false));
        self.touched
            .resize_with(n.div_ceil(64), || AtomicU64::new(0));
        self.deleted.resize(n.div_ceil(64), 0);
    }

    /// Inserts rows `len()..vectors.len() / dim` (appended rows of the caller's vectors), in parallel.
    pub fn extend(&mut self, vectors: &[f32]) {
        let (old, n) = (self.n, vectors.len() / self.dim);
        if n <= old {
            return;
        }
        self.grow(n);
        self.n = n;
        let mut rest: Vec<u32> = Vec::with_capacity(n - old);
        if self.entry == NONE {
            // The first highest node becomes the entry point before anything else goes in.
            let top = (old..n)
                .max_by_key(|&i| (self.levels[i], Reverse(i)))
                .unwrap() as u32;
            self.entry = top;
            self.max_level = self.levels[top as usize];
            self.touch(top);
        }
        // Nodes above the current top level go in one by one (each becomes the entry point);
        // with them in, the entry point is fixed and the rest go in parallel.
        for i in old as u32..n as u32 {
            if i == self.entry {
                continue;
            }
            if self.levels[i as usize] > self.max_level {
                self.insert(vectors, i);
                self.entry = i;
                self.max_level = self.levels[i as usize];
            } else {
                rest.push(i);
            }
        }
        let me = &*self;
        rest.par_iter()
            .with_min_len(64)
            .for_each(|&i| me.insert(vectors, i));
    }

    pub(super) fn insert(&self, vectors: &[f32], q: u32) {
        let v = self.row(vectors, q);
        let lq = self.levels[q as usize];
        let mut ep = self.entry;
        let mut dep = (self.l2)(v, self.row(vectors, ep));
        for lev in (lq + 1..=self.max_level).rev() {
            (ep, dep) = self.greedy(vectors, v, ep, dep, lev);
        }
        CTX.with_borrow_mut(|ctx| {
            for lev in (0..=lq.min(self.max_level)).rev() {
                self.search_layer(
                    vectors,
                    v,
                    ep,
                    dep,
                    self.ef_construction,
                    lev,
                    ctx,
                    None,
                    usize::MAX,
                );
                let mut cands: Vec<u64> = std::mem::take(&mut ctx.res).into_sorted_vec();
                cands.retain(|&c| unkey(c).1 != q);
                (dep, ep) = cands.first().map(|&c| unkey(c)).unwrap_or((dep, ep));
                let sel = self.select(vectors, &cands, self.m);
                self.set_own(vectors, q, lev, &sel);
                for &c in &sel {
                    self.link(vectors, unkey(c).1, q, unkey(c).0, lev);
                }
                cands.clear();
                ctx.res = BinaryHeap::from(cands);
            }
        });
    }

    /// Sets `q`'s list on `lev` to `sel`, keeping links that concurrent inserts already added to it
    /// (one may have reached `q` through an upper layer first); re-prunes when they do not all fit.
    pub(super) fn set_own(&self, vectors: &[f32], q: u32, lev: u8, sel: &[u64]) {
        let cap = if lev == 0 { 2 * self.m } else { self.m };
        let s = self.slot(q, lev);
        self.lock(q);
        let cnt = (s[0].load(Relaxed) as usize).min(cap);
        let mut all: Vec<u64> = sel.to_vec();
        let vq = self.row(vectors, q);
        for a in &s[1..=cnt] {
            let x = a.load(Relaxed);
            if x != q && !all.iter().any(|&c| unkey(c).1 == x) {
                all.push(key((self.l2)(vq, self.row(vectors, x)), x));
            }
        }
        if all.len() > cap {
            all.sort_unstable();
            all = self.select(vectors, &all, cap);
        }
        for (t, &c) in all.iter().enumerate() {
            s[1 + t].store(unkey(c).1, Relaxed);
        }
        s[0].store(all.len() as u32, Relaxed);
        self.unlock(q);
        self.touch(q);
    }

    /// Adds `q` to `j`'s list on `lev`, re-pruning with the heuristic when the list is full.
    pub(super) fn link(&self, vectors: &[f32], j: u32, q: u32, d: f32, lev: u8) {
        let cap = if lev == 0 { 2 * self.m } else { self.m };
        let s = self.slot(j, lev);
        self.lock(j);
        let cnt = (s[0].load(Relaxed) as usize).min(cap);
        if (1..=cnt).any(|t| s[t].load(Relaxed) == q) {
        } else if cnt < cap {
            s[1 + cnt].store(q, Relaxed);
            s[0].store(cnt as u32 + 1, Relaxed);
        } else {
            let vj = self.row(vectors, j);
            let mut c: Vec<u64> = (1..=cnt)
                .map(|t| {
                    let x = s[t].load(Relaxed);
                    key((self.l2)(vj, self.row(vectors, x)), x)
                })
                .collect();
            c.push(key(d, q));
            c.sort_unstable();
            let sel = self.select(vectors, &c, cap);
            for (t, &k) in sel.iter().enumerate() {
                s[1 + t].store(unkey(k).1, Relaxed);
            }
            s[0].store(sel.len() as u32, Relaxed);
        }
        self.unlock(j);
        self.touch(j);
    }

    /// The neighbour-selection heuristic: keep a candidate (nearest first) only when it is closer to
    /// the base than to every one kept so far.
    pub(super) fn select(&self, vectors: &[f32], sorted: &[u64], cap: usize) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::with_capacity(cap);
        for &c in sorted {
            if out.len() >= cap {
                break;
            }
            let (d, id) = unkey(c);
            let v = self.row(vectors, id);
            if out
                .iter()
                .all(|&o| (self.l2)(v, self.row(vectors, unkey(o).1)) > d)
            {
                out.push(c);
            }
        }
        out
    }

    /// Measures recall@10 against exact search for each `ef` of [`EF_LADDER`], with up to `samples`
    /// live rows (evenly spaced) as the queries, each left out of its own results, and keeps it in
    /// [`Hnsw::calibration`] (saved with the index). `vectors` holds at least the indexed rows.
    pub fn calibrate(&mut self, vectors: &[f32], samples: usize) {
        self.calibration.clear();
        let live: Vec<u32> = (0..self.n as u32)
            .filter(|&i| !self.is_deleted(i))
            .collect();
        if live.len() < 2 || samples == 0 {
            return;
        }
        let step = live.len().div_ceil(samples).max(1);
        let rows: Vec<u32> = live.iter().step_by(step).copied().collect();
        let dim = self.dim;
        let queries: Vec<f32> = rows
            .iter()
            .flat_map(|&r| self.row(vectors, r).iter().copied())
            .collect();
        let data = &vectors[..self.n * dim];
        let me = &*self;
        let truth = crate::search::index::search(data, dim, &queries, 10, &|q, i| {
            i as u32 == rows[q] || me.is_deleted(i as u32)
        });
        let mut cal = Vec::with_capacity(EF_LADDER.len());
        for &ef in &EF_LADDER {
            let (found, want) = rows
                .par_iter()
                .zip(&truth)
                .map(|(&r, t)| {
                    let got: Vec<u32> = me
                        .search(vectors, me.row(vectors, r), 11, ef as usize, None)
                        .into_iter()
                        .map(|h| h.id)
                        .filter(|&id| id != r)
                        .take(10)
                        .collect();
                    let hit = t.iter().filter(|h| got.contains(&(h.index as u32))).count();
                    (hit, t.len())
                })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            cal.push((ef, found as f32 / want.max(1) as f32));
        }
        self.calibration = cal;
    }
}
