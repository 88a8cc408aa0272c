//! Delta files: an index update written without rewriting the index file it extends (the base).
//!
//! A delta holds, for one base file, every neighbour list that differs from the base's: the lists
//! of the base nodes that inserts changed since the base was written (`patched`), and all lists of
//! the nodes added since. Each update writes a new delta with the previous one's lists plus its
//! own changes (so only the base and one delta are ever in use, and each is written whole under a
//! new name and never changed: readers map both). A search reads a patched node's layer-0 list
//! from the delta through a per-node index, and an upper list at an offset past the base's upper
//! slots from the delta's; a mutation first flattens both into memory.
//!
//! Layout (little-endian, each section 8-byte aligned): a 72-byte header (magic `DRHNSD01`; dim, M,
//! entry point, top level as u32; base node count, node count, patched count, upper-slot count,
//! the base header's checksum as u64; FNV-1a of the 64 bytes before it), then the patched node ids
//! (u32 × P, ascending), the new nodes' levels (u8 × (n − base n)), upper offsets of the patched
//! then the new nodes (u32 × (P + new): `u32::MAX` for level 0, else base upper count + offset in
//! this file's upper slots), their layer-0 slots (u32 × (P + new)(1 + 2M)) and the upper slots.

use super::*;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

const DMAGIC: &[u8; 8] = b"DRHNSD01";
const DHEADER: usize = 72;

/// The saved file a graph was opened from.
pub(super) struct Base {
    /// Nodes and upper slots in the base file.
    pub n: usize,
    pub ulen: usize,
    /// The base header's checksum: a delta names its base by it.
    pub sum: u64,
    /// Base nodes whose lists the applied delta replaces (ascending).
    pub patched: Vec<u32>,
}

/// The lists a delta file replaces or adds.
pub(super) struct Delta {
    base_n: usize,
    /// Per base node, the index of its layer-0 list in `l0` (`NONE`: the base's own).
    idx: Vec<u32>,
    patched: usize,
    /// Layer-0 lists: the patched nodes', then the new nodes'.
    pub l0: Slots,
    /// Upper offsets at or past this are into `upper`.
    pub base_ulen: usize,
    pub upper: Slots,
}

impl Delta {
    /// Where node `i`'s layer-0 list is in `l0`; `None`: in the base.
    #[inline(always)]
    pub fn l0_index(&self, i: u32) -> Option<usize> {
        let i = i as usize;
        if i < self.base_n {
            let k = self.idx[i];
            (k != NONE).then_some(k as usize)
        } else {
            Some(self.patched + i - self.base_n)
        }
    }
}

fn slots_bytes(w: &mut impl Write, s: &[AtomicU32]) -> io::Result<()> {
    let b: Vec<u8> = s
        .iter()
        .flat_map(|a| a.load(Relaxed).to_le_bytes())
        .collect();
    w.write_all(&b)
}

fn pad(w: &mut impl Write, len: usize) -> io::Result<()> {
    w.write_all(&[0u8; 8][..(8 - len % 8) % 8])
}

impl Hnsw {
    /// The upper slot arrays in order: the base's, then a delta's (offsets past the base's point
    /// into it).
    pub(super) fn upper_parts(&self) -> Vec<&[AtomicU32]> {
        let mut v = vec![self.upper.get()];
        if let Some(d) = &self.delta {
            v.push(d.upper.get());
        }
        v
    }

    /// Copies an applied delta's lists and the base's into one in-memory graph (before a mutation).
    pub(super) fn flatten(&mut self) {
        let Some(d) = self.delta.take() else { return };
        let s0 = self.s0();
        let copy = |s: &[AtomicU32]| -> Vec<AtomicU32> {
            s.iter().map(|a| AtomicU32::new(a.load(Relaxed))).collect()
        };
        let mut l0 = Vec::with_capacity(self.n * s0);
        for i in 0..self.n {
            l0.extend(copy(match d.l0_index(i as u32) {
                Some(k) => &d.l0.get()[k * s0..(k + 1) * s0],
                None => &self.l0.get()[i * s0..(i + 1) * s0],
            }));
        }
        let mut upper = copy(self.upper.get());
        upper.extend(copy(d.upper.get()));
        self.l0 = Slots::Owned(l0);
        self.upper = Slots::Owned(upper);
    }

    /// The base nodes a delta written now must carry: the applied delta's and those of `touched`
    /// (from [`Hnsw::take_touched`]) below the base's count. `None` when the graph was not opened
    /// from a file (there is no base to write a delta against).
    pub fn delta_nodes(&self, touched: &[u32]) -> Option<Vec<u32>> {
        let b = self.base.as_ref()?;
        let mut p: Vec<u32> = b
            .patched
            .iter()
            .copied()
            .chain(touched.iter().copied().filter(|&i| (i as usize) < b.n))
            .collect();
        p.sort_unstable();
        p.dedup();
        Some(p)
    }

    /// Nodes of the base file (the one the graph was opened from; 0 when none).
    pub fn base_len(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.n)
    }

    /// Writes a delta over the base file: the lists of `patched` (from [`Hnsw::delta_nodes`]) and
    /// of every node past the base (layout above).
    pub fn save_delta(&self, patched: &[u32], w: &mut impl Write) -> io::Result<()> {
        let b = self
            .base
            .as_ref()
            .ok_or_else(|| io::Error::other("a delta needs an index opened from a file"))?;
        let nodes: Vec<u32> = patched
            .iter()
            .copied()
            .chain(b.n as u32..self.n as u32)
            .collect();
        let su = self.su();
        let mut offs = Vec::with_capacity(nodes.len());
        let mut ulen = 0usize;
        for &i in &nodes {
            let l = self.levels[i as usize] as usize;
            if l == 0 {
                offs.push(NONE);
            } else {
                let o = u32::try_from(b.ulen + ulen)
                    .ok()
                    .filter(|&o| o != NONE)
                    .ok_or_else(|| io::Error::other("too many upper-layer slots for a delta"))?;
                offs.push(o);
                ulen += l * su;
            }
        }
        let mut h = Vec::with_capacity(DHEADER);
        h.extend_from_slice(DMAGIC);
        for x in [
            self.dim,
            self.m,
            self.entry as usize,
            self.max_level as usize,
        ] {
            h.extend_from_slice(&(x as u32).to_le_bytes());
        }
        for x in [b.n, self.n, patched.len(), ulen] {
            h.extend_from_slice(&(x as u64).to_le_bytes());
        }
        h.extend_from_slice(&b.sum.to_le_bytes());
        h.extend_from_slice(&file::fnv(&h).to_le_bytes());
        debug_assert_eq!(h.len(), DHEADER);
        w.write_all(&h)?;
        let ids: Vec<u8> = patched.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&ids)?;
        pad(w, ids.len())?;
        w.write_all(&self.levels[b.n..self.n])?;
        pad(w, self.n - b.n)?;
        let ob: Vec<u8> = offs.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&ob)?;
        pad(w, ob.len())?;
        for &i in &nodes {
            slots_bytes(w, self.slot(i, 0))?;
        }
        pad(w, nodes.len() * self.s0() * 4)?;
        for &i in &nodes {
            for lev in 1..=self.levels[i as usize] {
                slots_bytes(w, self.slot(i, lev))?;
            }
        }
        pad(w, ulen * 4)?;
        w.flush()
    }

    /// Opens the delta file at `path` over this graph (its base, just opened).
    pub fn open_delta(self, path: &Path) -> io::Result<Hnsw> {
        let file = std::fs::File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
        // SAFETY: delta files are written whole under a new name and never changed in place.
        let map = unsafe { Mmap::map(&file)? };
        self.with_delta(Arc::new(map), path)
    }

    /// This graph (a base file just opened) with the delta in `map` applied. Every count, offset
    /// and id is checked, and the delta must name this base (its node count and header checksum):
    /// a damaged or foreign delta is an error naming `path`, never a panic.
    pub fn with_delta(mut self, map: Arc<Mmap>, path: &Path) -> io::Result<Hnsw> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is a damaged ANN index delta ({what})", path.display()),
            )
        };
        let Some(b) = self.base.as_ref().filter(|_| self.delta.is_none()) else {
            return Err(bad("no base index to apply it to"));
        };
        if map.len() < DHEADER || &map[..8] != DMAGIC {
            return Err(bad("not a deeprank index delta: wrong header"));
        }
        let u32at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        if u64at(64) != file::fnv(&map[..64]) {
            return Err(bad("header checksum"));
        }
        let (dim, m, entry, max_level) = (u32at(8), u32at(12), u32at(16), u32at(20));
        let (base_n, n, np, dulen, sum) = (u64at(24), u64at(32), u64at(40), u64at(48), u64at(56));
        if dim as usize != self.dim || m as usize != self.m || base_n != b.n as u64 || sum != b.sum
        {
            return Err(bad("it belongs to another index file"));
        }
        if n < base_n
            || n > u32::MAX as u64 / 2
            || np > base_n
            || dulen > u32::MAX as u64
            || max_level > MAX_LEVEL as u32
            || (max_level as u8) < self.max_level
            || entry as u64 >= n
        {
            return Err(bad("parameters"));
        }
        let (base_n, n, np, dulen) = (base_n as usize, n as usize, np as usize, dulen as usize);
        let (s0, su) = (self.s0(), self.su());
        let new = n - base_n;
        let r8 = |x: usize| x.div_ceil(8) * 8;
        let o_lev = DHEADER + r8(4 * np);
        let o_off = o_lev + r8(new);
        let o_l0 = o_off + r8(4 * (np + new));
        let o_up = o_l0 + r8(4 * (np + new) * s0);
        if map.len() != o_up + r8(4 * dulen) {
            return Err(bad("size"));
        }
        let patched: Vec<u32> = (0..np).map(|k| u32at(DHEADER + 4 * k)).collect();
        if patched.iter().any(|&i| i as usize >= base_n) || patched.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(bad("patched nodes"));
        }
        let base_ulen = b.ulen;
        self.levels.extend_from_slice(&map[o_lev..o_lev + new]);
        self.upper_off.resize(n, NONE);
        let nodes = patched.iter().copied().chain(base_n as u32..n as u32);
        for (k, i) in nodes.enumerate() {
            let o = u32at(o_off + 4 * k);
            let l = self.levels[i as usize] as usize;
            let (ou, ok) = (o as usize, l as u32 <= max_level);
            if !ok
                || (l == 0) != (o == NONE)
                || (l > 0
                    && (ou < base_ulen
                        || !(ou - base_ulen).is_multiple_of(su)
                        || ou - base_ulen + l * su > dulen))
            {
                return Err(bad("levels"));
            }
            self.upper_off[i as usize] = o;
        }
        if self.levels[entry as usize] as u32 != max_level {
            return Err(bad("entry point"));
        }
        let mut idx = vec![NONE; base_n];
        for (k, &i) in patched.iter().enumerate() {
            idx[i as usize] = k as u32;
        }
        let d = Delta {
            base_n,
            idx,
            patched: np,
            l0: Slots::Mapped {
                map: map.clone(),
                off: o_l0,
                len: (np + new) * s0,
            },
            base_ulen,
            upper: Slots::Mapped {
                map,
                off: o_up,
                len: dulen,
            },
        };
        for (arr, s) in [(d.l0.get(), s0), (d.upper.get(), su)] {
            for sl in arr.chunks_exact(s) {
                let c = sl[0].load(Relaxed) as usize;
                if c >= s || sl[1..=c].iter().any(|x| x.load(Relaxed) as usize >= n) {
                    return Err(bad("neighbour list"));
                }
            }
        }
        self.n = n;
        self.entry = entry;
        self.max_level = max_level as u8;
        self.deleted.resize(n.div_ceil(64), 0);
        if let Some(b) = self.base.as_mut() {
            b.patched = patched;
        }
        self.delta = Some(d);
        // The lists the delta replaces or adds (the base file's were checked when it was opened).
        let changed = self.base.as_ref().map_or(vec![], |b| b.patched.clone());
        if !self.upper_lists_reach_their_levels(changed.into_iter().chain(base_n as u32..n as u32))
        {
            return Err(bad("upper neighbour below its level"));
        }
        Ok(self)
    }
}
