//! Fused blocks (see the engine's module docs): an MBConv block with an expansion, one image on
//! this thread, run band by band of output rows so that the 6× wide middle stays in L2; a lone
//! image's block over a team splits its output rows between the threads, each running its part
//! band by band.

use super::{Block, Scratch};
use crate::cpu::aligned::Aligned;
use crate::cpu::depthwise::depthwise_rows;
use crate::cpu::pointwise::{Epilogue, Pointwise};
use crate::cpu::team::{Team, in_parts};
use std::cell::RefCell;
use std::ops::Range;

/// Bytes of expanded input rows a fused block's band aims at (see the module docs): a quarter of
/// this CPU's L2 per core (Linux's sysfs; 2 MB where it cannot be read), within 128–512 KB. The
/// L2 also holds the band's depthwise output, the block's input and its weights. Blocks whose
/// whole expansion fits run layer by layer. On a 2 MB-L2 Xeon, 128–1024 KB were within noise of
/// each other (`deeprank-bench layers`, bench/RESULTS.md §13); on a 512 KB-L2 Zen 3 core, 512 KB
/// bands ran slower than no bands at all.
fn band_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| (l2_bytes().unwrap_or(2 << 20) / 4).clamp(128 << 10, 512 << 10))
}

/// The L2 cache of CPU 0 as Linux reports it (`…/cache/index*/size` of the level-2 unified or data
/// cache, e.g. "512K").
fn l2_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|i| {
        let idx = dir.join(format!("index{i}"));
        let read = |f: &str| std::fs::read_to_string(idx.join(f)).ok();
        if read("level")?.trim() != "2" || read("type")?.trim() == "Instruction" {
            return None;
        }
        parse_size(read("size")?.trim())
    })
}

/// "512K", "2048K", "1M" or a plain byte count, as sysfs writes cache sizes.
fn parse_size(s: &str) -> Option<usize> {
    let (num, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * unit)
}

/// Fewer output rows per band than this and a block runs layer by layer: with one or two rows
/// per band, the kernels' short calls (a few pixels each) cost more than the cache misses saved.
const MIN_BAND: usize = 4;

/// Output rows per band when `blk` (input side `h`) runs fused: as many as keep the expanded
/// input rows they read within [`band_bytes`]; None where the whole expansion fits it or the band
/// would be under [`MIN_BAND`] rows (layer by layer then).
pub(super) fn band_rows(blk: &Block, h: usize) -> Option<usize> {
    let (k, st, row) = (blk.dw.k, blk.dw.stride, h * blk.dw.c * 4);
    let ho = blk.dw.out_side(h);
    let bytes = band_bytes();
    if h * row <= bytes {
        return None;
    }
    let fits = |b: usize| ((b - 1) * st + k) * row <= bytes;
    let band = (1..=ho).take_while(|&b| fits(b)).last()?;
    (band >= MIN_BAND.min(ho)).then_some(band)
}

thread_local! {
    /// This thread's band buffers: a fused block's expanded input rows and depthwise output.
    static BAND: RefCell<(Aligned, Aligned)> = RefCell::new(Default::default());
}

/// One block with an expansion, `band` output rows at a time (module docs): input `[h][h][c]` in
/// `s.a`, output in `s.a` (swapped in from `s.b`). Returns the output side. Over `team` (a lone
/// image), the output rows are cut into one contiguous part per thread, each run band by band
/// with that thread's band buffers; a part expands the input rows its output rows read, so the
/// few rows around a cut are expanded by both. Each value is computed the same way either way.
pub(super) fn fused_block(
    blk: &Block,
    e: &Pointwise,
    band: usize,
    h: usize,
    c: usize,
    s: &mut Scratch,
    team: Option<&Team>,
) -> usize {
    let (ho, co) = (blk.dw.out_side(h), blk.project.cout);
    let len = ho * ho * co;
    s.b.grow(len);
    if blk.residual {
        // The projection adds to a copy of the input, so no part writes rows another part reads.
        s.b[..len].copy_from_slice(&s.a[..len]);
    }
    let x = &s.a[..h * h * c];
    in_parts(&mut s.b, ho, ho * co, team, 1, |rows, o| {
        BAND.with(|b| {
            let (eb, db) = &mut *b.borrow_mut();
            bands(blk, e, band, h, c, x, rows, o, eb, db);
        })
    });
    std::mem::swap(&mut s.a, &mut s.b);
    ho
}

/// Output rows `rows` of a block with an expansion, `band` rows at a time, from its whole input
/// `x` (`[h][h][c]`) into `out` (those rows; for a residual block already holding the input, to
/// which the projection adds), with `eb`, `db` as the band's expanded rows and depthwise output.
#[allow(clippy::too_many_arguments)]
fn bands(
    blk: &Block,
    e: &Pointwise,
    band: usize,
    h: usize,
    c: usize,
    x: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
    eb: &mut Aligned,
    db: &mut Aligned,
) {
    let (k, st, cm) = (blk.dw.k, blk.dw.stride, blk.dw.c);
    let (w, ho, co) = (h, blk.dw.out_side(h), blk.project.cout);
    let row = w * cm;
    eb.grow(((band - 1) * st + k).min(h) * row);
    db.grow(band * ho * cm);
    let epi = if blk.residual {
        Epilogue::Accumulate
    } else {
        Epilogue::Plain
    };
    // Input rows held in `eb` (its row 0 is image row `held.start`).
    let mut held = 0..0;
    for oy0 in rows.clone().step_by(band) {
        let oy1 = (oy0 + band).min(rows.end);
        let need = (oy0 * st).saturating_sub(k / 2)..((oy1 - 1) * st + k - k / 2).min(h);
        // Keep the rows this band shares with the previous one; expand only the new ones.
        let from = if need.start >= held.start && need.start < held.end {
            let keep = (need.start - held.start) * row..(held.end - held.start) * row;
            eb.copy_within(keep, 0);
            held.end
        } else {
            need.start
        };
        let xs = &x[from * w * c..need.end * w * c];
        let at = (from - need.start) * row;
        e.run(xs, (need.end - from) * w, &mut eb[at..], Epilogue::Relu6);
        held = need.clone();
        let a = blk.dw.args(&eb[..need.len() * row], need.start, h, w);
        let d = &mut db[..(oy1 - oy0) * ho * cm];
        depthwise_rows(&a, oy0..oy1, d);
        let px = (oy1 - oy0) * ho;
        let o = &mut out[(oy0 - rows.start) * ho * co..(oy1 - rows.start) * ho * co];
        blk.project.run(d, px, o, epi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_read_as_sysfs_writes_them() {
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
        let b = band_bytes();
        assert!((128 << 10..=512 << 10).contains(&b), "{b}");
    }
}
