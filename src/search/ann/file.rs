//! The ANN index file: how [`Hnsw`] is saved and memory-mapped back.
//!
//! Layout (little-endian, each section 8-byte aligned): a 64-byte header (magic `DRHNSW02`; dim, M,
//! efConstruction, entry point, top level, calibration count as u32; node count, upper-slot count,
//! seed as u64; FNV-1a of the 56 bytes before it), then levels (u8 × n), upper offsets (u32 × n,
//! `u32::MAX` for level 0), tombstones (u64 × ⌈n/64⌉), layer-0 slots (u32 × n(1 + 2M)), upper slots
//! (u32 × upper count) and the calibration (`ef` u32, recall@10 f32 per entry).

use super::*;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

impl Hnsw {
    /// Writes the index (layout above).
    pub fn save(&self, w: &mut impl Write) -> io::Result<()> {
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        for x in [
            self.dim,
            self.m,
            self.ef_construction,
            self.entry as usize,
            self.max_level as usize,
            self.calibration.len(),
        ] {
            h.extend_from_slice(&(x as u32).to_le_bytes());
        }
        let uppers = self.upper_parts();
        let ulen: usize = uppers.iter().map(|u| u.len()).sum();
        for x in [self.n as u64, ulen as u64, self.seed] {
            h.extend_from_slice(&x.to_le_bytes());
        }
        h.extend_from_slice(&fnv(&h).to_le_bytes());
        debug_assert_eq!(h.len(), HEADER);
        w.write_all(&h)?;
        let pad = |w: &mut dyn Write, len: usize| w.write_all(&[0u8; 8][..(8 - len % 8) % 8]);
        w.write_all(&self.levels)?;
        pad(w, self.levels.len())?;
        let ub: Vec<u8> = self
            .upper_off
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        w.write_all(&ub)?;
        pad(w, ub.len())?;
        let db: Vec<u8> = self.deleted.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&db)?;
        // Layer 0 node by node (a delta's lists in place of the base's), then the upper slots.
        let mut b: Vec<u8> = Vec::with_capacity(1 << 18);
        for i in 0..self.n as u32 {
            b.extend(
                self.slot(i, 0)
                    .iter()
                    .flat_map(|a| a.load(Relaxed).to_le_bytes()),
            );
            if b.len() >= 1 << 18 {
                w.write_all(&b)?;
                b.clear();
            }
        }
        w.write_all(&b)?;
        pad(w, self.n * self.s0() * 4)?;
        for u in uppers {
            for chunk in u.chunks(1 << 16) {
                let b: Vec<u8> = chunk
                    .iter()
                    .flat_map(|a| a.load(Relaxed).to_le_bytes())
                    .collect();
                w.write_all(&b)?;
            }
        }
        pad(w, ulen * 4)?;
        for &(ef, r) in &self.calibration {
            w.write_all(&ef.to_le_bytes())?;
            w.write_all(&r.to_le_bytes())?;
        }
        w.flush()
    }

    /// Opens a saved index through a read-only memory map (see [`Hnsw::from_map`]).
    pub fn open(path: &Path) -> io::Result<Hnsw> {
        let file = std::fs::File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
        // SAFETY: index files are written whole under a new name and never changed in place.
        let map = unsafe { Mmap::map(&file)? };
        Hnsw::from_map(Arc::new(map), path)
    }

    /// The build parameters in a saved index's header (its checksum checked), without opening the
    /// graph.
    pub fn read_params(path: &Path) -> io::Result<Params> {
        let mut h = [0u8; HEADER];
        std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut h)?;
        let u32at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap()) as usize;
        if &h[..8] != MAGIC || u64::from_le_bytes(h[56..64].try_into().unwrap()) != fnv(&h[..56]) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is a damaged ANN index (header)", path.display()),
            ));
        }
        Ok(Params {
            m: u32at(12),
            ef_construction: u32at(16),
            seed: u64::from_le_bytes(h[48..56].try_into().unwrap()),
        })
    }

    /// An index searched straight from `map` (a saved index file; `path` names it in errors). The
    /// structure is checked here — every level, offset, count and neighbour id — so a damaged file
    /// is an error naming it, never a panic or an out-of-bounds read later.
    pub fn from_map(map: Arc<Mmap>, path: &Path) -> io::Result<Hnsw> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is a damaged ANN index ({what})", path.display()),
            )
        };
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("not a deeprank index: wrong header"));
        }
        let u32at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap()) as usize;
        let u64at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        if u64at(56) != fnv(&map[..56]) {
            return Err(bad("header checksum"));
        }
        let (dim, m, efc, entry, max_level, ncal) = (
            u32at(8),
            u32at(12),
            u32at(16),
            u32at(20),
            u32at(24),
            u32at(28),
        );
        let (n, ulen, seed) = (u64at(32), u64at(40), u64at(48));
        if dim == 0
            || !(2..=255).contains(&m)
            || max_level > MAX_LEVEL as usize
            || n > u32::MAX as u64 / 2
            || ulen > u32::MAX as u64
            || ncal > 1024
        {
            return Err(bad("parameters"));
        }
        let (n, ulen) = (n as usize, ulen as usize);
        let r8 = |x: usize| x.div_ceil(8) * 8;
        let (s0, su) = (1 + 2 * m, 1 + m);
        let o_up = HEADER + r8(n);
        let o_del = o_up + r8(4 * n);
        let o_l0 = o_del + 8 * n.div_ceil(64);
        let o_u = o_l0 + r8(4 * n * s0);
        let o_cal = o_u + r8(4 * ulen);
        if map.len() != o_cal + 8 * ncal
            || (n == 0) != (entry == NONE as usize)
            || (n > 0 && entry >= n)
        {
            return Err(bad("size"));
        }
        let levels = map[HEADER..HEADER + n].to_vec();
        let upper_off: Vec<u32> = (0..n).map(|i| u32at(o_up + 4 * i) as u32).collect();
        let deleted: Vec<u64> = (0..n.div_ceil(64)).map(|i| u64at(o_del + 8 * i)).collect();
        for i in 0..n {
            let l = levels[i] as usize;
            let o = upper_off[i] as usize;
            // An offset is the start of a node's lists: a multiple of the list size.
            if l > max_level
                || (l == 0) != (o == NONE as usize)
                || (l > 0 && (!o.is_multiple_of(su) || o + l * su > ulen))
            {
                return Err(bad("levels"));
            }
        }
        if n > 0 && levels[entry] as usize != max_level {
            return Err(bad("entry point"));
        }
        let calibration: Vec<(u32, f32)> = (0..ncal)
            .map(|i| {
                let o = o_cal + 8 * i;
                (u32at(o) as u32, f32::from_bits(u32at(o + 4) as u32))
            })
            .collect();
        if calibration
            .iter()
            .any(|&(ef, r)| ef == 0 || !(0.0..=1.0).contains(&r))
            || calibration.windows(2).any(|w| w[0].0 >= w[1].0)
        {
            return Err(bad("calibration"));
        }
        let sum = u64at(56);
        let h = Hnsw {
            dim,
            m,
            ef_construction: efc,
            seed,
            n,
            n_deleted: deleted.iter().map(|w| w.count_ones() as usize).sum(),
            levels,
            upper_off,
            l0: Slots::Mapped {
                map: map.clone(),
                off: o_l0,
                len: n * s0,
            },
            upper: Slots::Mapped {
                map,
                off: o_u,
                len: ulen,
            },
            entry: entry as u32,
            max_level: max_level as u8,
            deleted,
            locks: vec![],
            touched: vec![],
            l2: l2_kernel(),
            l2x4: crate::cpu::l2::l2x4_kernel(),
            base: Some(delta::Base {
                n,
                ulen,
                sum,
                patched: vec![],
            }),
            delta: None,
            calibration,
        };
        for (arr, s) in [(h.l0.get(), s0), (h.upper.get(), su)] {
            for sl in arr.chunks_exact(s) {
                let c = sl[0].load(Relaxed) as usize;
                if c >= s || sl[1..=c].iter().any(|x| x.load(Relaxed) as usize >= n) {
                    return Err(bad("neighbour list"));
                }
            }
        }
        if !h.upper_lists_reach_their_levels(0..n as u32) {
            return Err(bad("upper neighbour below its level"));
        }
        Ok(h)
    }
}

pub(super) fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}
