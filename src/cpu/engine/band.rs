//! Fused blocks (see the engine's module docs): an MBConv block with an expansion, one image on
//! this thread, run band by band of output rows so that the 6× wide middle stays in L2.

use super::{Block, Scratch, grow};
use crate::cpu::depthwise::depthwise_rows;
use crate::cpu::pointwise::{Epilogue, Pointwise};

/// Bytes of expanded input rows a fused block's band aims at (see the module docs): a quarter of
/// a core's L2, which also holds the band's depthwise output, the block's input and its weights.
/// Blocks whose whole expansion fits run layer by layer. Chosen with `deeprank-bench layers`
/// (bench/RESULTS.md §13): 128–1024 KB were within this machine's noise of each other.
const BAND_BYTES: usize = 512 << 10;
/// Fewer output rows per band than this and a block runs layer by layer: with one or two rows
/// per band, the kernels' short calls (a few pixels each) cost more than the cache misses saved.
const MIN_BAND: usize = 4;

/// Output rows per band when `blk` (input side `h`) runs fused: as many as keep the expanded
/// input rows they read within [`BAND_BYTES`]; None where the whole expansion fits it or the band
/// would be under [`MIN_BAND`] rows (layer by layer then).
pub(super) fn band_rows(blk: &Block, h: usize) -> Option<usize> {
    let (k, st, row) = (blk.dw.k, blk.dw.stride, h * blk.dw.c * 4);
    let ho = blk.dw.out_side(h);
    if h * row <= BAND_BYTES {
        return None;
    }
    let fits = |b: usize| ((b - 1) * st + k) * row <= BAND_BYTES;
    let band = (1..=ho).take_while(|&b| fits(b)).last()?;
    (band >= MIN_BAND.min(ho)).then_some(band)
}

/// One block with an expansion on this thread, `band` output rows at a time (module docs): input
/// `[h][h][c]` in `s.a`, output in `s.a` (swapped in from `s.b` unless the block adds its input
/// in place). Returns the output side.
pub(super) fn fused_block(
    blk: &Block,
    e: &Pointwise,
    band: usize,
    h: usize,
    c: usize,
    s: &mut Scratch,
) -> usize {
    let (k, st, cm) = (blk.dw.k, blk.dw.stride, blk.dw.c);
    let (w, ho, co) = (h, blk.dw.out_side(h), blk.project.cout);
    let row = w * cm;
    grow(&mut s.e, ((band - 1) * st + k).min(h) * row);
    grow(&mut s.d, band * ho * cm);
    // Input rows held in `s.e` (its row 0 is image row `held.start`).
    let mut held = 0..0;
    for oy0 in (0..ho).step_by(band) {
        let oy1 = (oy0 + band).min(ho);
        let need = (oy0 * st).saturating_sub(k / 2)..((oy1 - 1) * st + k - k / 2).min(h);
        // Keep the rows this band shares with the previous one; expand only the new ones.
        let from = if need.start >= held.start && need.start < held.end {
            let keep = (need.start - held.start) * row..(held.end - held.start) * row;
            s.e.copy_within(keep, 0);
            held.end
        } else {
            need.start
        };
        let x = &s.a[from * w * c..need.end * w * c];
        let at = (from - need.start) * row;
        e.run(x, (need.end - from) * w, &mut s.e[at..], Epilogue::Relu6);
        held = need.clone();
        let a = blk.dw.args(&s.e[..need.len() * row], need.start, h, w);
        let d = &mut s.d[..(oy1 - oy0) * ho * cm];
        depthwise_rows(&a, oy0..oy1, d);
        let px = (oy1 - oy0) * ho;
        if blk.residual {
            // In place: later bands read only input rows from `held.end` (≥ oy1) on; the rows
            // they share with this band are kept in `s.e`.
            let o = &mut s.a[oy0 * ho * co..oy1 * ho * co];
            blk.project.run(d, px, o, Epilogue::Accumulate);
        } else {
            let o = &mut s.b[oy0 * ho * co..oy1 * ho * co];
            blk.project.run(d, px, o, Epilogue::Plain);
        }
    }
    if !blk.residual {
        std::mem::swap(&mut s.a, &mut s.b);
    }
    ho
}
