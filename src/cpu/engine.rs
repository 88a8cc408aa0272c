//! deeprank's own CPU inference engine for the EfficientNet-Lite networks (any block config): BatchNorm folded into every
//! convolution, channels-last (NHWC) activations, 1×1 convolutions through [`crate::cpu::pointwise`]
//! (weights packed once, an AVX-512 kernel with bias, residual and ReLU6 fused), depthwise
//! convolutions as hand-written channel-vector kernels with bias and ReLU6 fused in, one image per thread with that thread's scratch buffers reused
//! across images and batches; a lone image (batch 1: a search request) has every layer's rows
//! split over the threads instead, which wait for each next layer as one team ([`crate::cpu::team`]).
//!
//! Fused blocks: an MBConv block with an expansion runs band by band of output rows (a lone
//! image's over its team: one part of the rows per thread, band by band): expand only the input rows the band's depthwise taps read (keeping the rows it
//! shares with the previous band), depthwise them, project them. The 6× wide middle never exists
//! whole: a band of it stays in the core's L2 instead of streaming a full expanded image (4.8 MB at
//! 224 px in block 1) through the L3 twice. Every pixel is computed by the same kernel calls as
//! in the layer-by-layer order, so the outputs are the same bits (tested).
//!
//! Why: burn's flex backend runs the same network NCHW with a separate pass per operation; its
//! depthwise and 1×1 convolutions are where the time goes (`bench/RESULTS.md`). Results equal the
//! plain burn network within float rounding (tested in `tests/model_golden.rs`).

use crate::cpu::aligned::Aligned;
use crate::cpu::depthwise::{DwArgs, depthwise_rows};
use crate::cpu::fold::fold;
use crate::cpu::pointwise::{Epilogue, Pointwise};
use crate::cpu::team::{SharedOut, Team, in_parts};
use crate::model::device::on_cpu;
use crate::model::lite::{FEATURE_DIM, Lite};
use anyhow::{Result, bail};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Instant;

mod band;
mod group;
mod layers;

use band::{band_rows, fused_block};
pub use group::Begun;

/// A 1×1 convolution with its BatchNorm folded in.
fn pointwise(conv: &Conv2d, bn: &BatchNorm) -> Result<Pointwise> {
    let (w, b, d) = fold(conv, bn)?;
    if d[2] != 1 || d[3] != 1 {
        bail!("expected a 1×1 convolution, got {d:?}");
    }
    Ok(Pointwise::new(w, b, d[1], d[0]))
}

/// Depthwise k×k convolution, weights stored tap-major `[k·k][c]`, 64-byte aligned.
struct Depthwise {
    w: Aligned,
    b: Vec<f32>,
    c: usize,
    k: usize,
    stride: usize,
}

impl Depthwise {
    fn new(conv: &Conv2d, bn: &BatchNorm, stride: usize) -> Result<Self> {
        let (w, b, d) = fold(conv, bn)?;
        let (c, k) = (d[0], d[2]);
        if d[1] != 1 || d[3] != k {
            bail!("expected a depthwise convolution, got {d:?}");
        }
        let mut t = Aligned::zeroed(c * k * k);
        for ch in 0..c {
            for tap in 0..k * k {
                t[tap * c + ch] = w[ch * k * k + tap];
            }
        }
        Ok(Self {
            w: t,
            b,
            c,
            k,
            stride,
        })
    }

    /// The kernel's arguments for input rows `y0..` (in `x`) of an `h × w` image, ReLU6 fused.
    fn args<'a>(&'a self, x: &'a [f32], y0: usize, h: usize, w: usize) -> DwArgs<'a> {
        DwArgs {
            x,
            y0,
            h,
            w,
            c: self.c,
            k: self.k,
            stride: self.stride,
            wt: &self.w,
            bias: &self.b,
            relu6: true,
        }
    }

    fn out_side(&self, side: usize) -> usize {
        (side + 2 * (self.k / 2) - self.k) / self.stride + 1
    }

    /// `x` is `[h][w][c]`; writes `[ho][wo][c]` = ReLU6(conv + bias), its rows in parts over
    /// on the rayon pool (1: on this thread).
    fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], team: Option<&Team>) {
        let a = self.args(x, 0, h, w);
        let (ho, wo) = (self.out_side(h), self.out_side(w));
        in_parts(out, ho, wo * self.c, team, 1, |rows, o| {
            depthwise_rows(&a, rows, o)
        })
    }
}

/// A 1×1 convolution of `px` pixels in parts over `team`'s threads: by pixels in whole tiles
/// of the AVX-512 kernel's 12 (see [`in_parts`]), or by weight panels of 32 output channels where
/// that gives the busiest thread clearly less work (few pixels: a 4×4 map cuts into 12 + 4 pixels,
/// 36 panels cut evenly; by a margin of a tenth of the layer, since each part then reads all the
/// pixels). Each value is computed exactly as in one call.
fn pw(p: &Pointwise, x: &[f32], px: usize, out: &mut [f32], epi: Epilogue, team: Option<&Team>) {
    let panels = p.panels();
    let split = team.map_or(1, Team::threads);
    let by_px = px.div_ceil(split.max(1)).next_multiple_of(12).min(px) as f64 / px as f64;
    let by_panel = panels.div_ceil(split.max(1)) as f64 / panels as f64;
    if let Some(team) = team.filter(|_| by_panel + 0.1 < by_px && Pointwise::splits_by_panels()) {
        let out = &mut out[..px * p.cout];
        let shared = SharedOut(out.as_mut_ptr());
        team.run(split, &|i| {
            let r = i * panels / split..(i + 1) * panels / split;
            // SAFETY: `out` (px × cout floats) is borrowed mutably for this whole call and each
            // part writes only its own panels' columns of it; AVX-512 is there (checked above).
            unsafe { p.run_panels(x, px, shared.get(), epi, r) }
        });
        return;
    }
    in_parts(out, px, p.cout, team, 12, |r, o| {
        p.run(&x[r.start * p.cin..r.end * p.cin], r.len(), o, epi)
    })
}

struct Block {
    expand: Option<Pointwise>,
    dw: Depthwise,
    project: Pointwise,
    residual: bool,
}

/// The stem's im2col for one `[3][side][side]` image: `[ho·ho][27]` (ho = side/2; 3×3 stride 2,
/// padding 1), burn's `[ci][ky][kx]` order; every value written (padding as 0). Only row −1 and
/// column −1 are padding (the last output pixel's taps end at row and column 2·ho − 1 < side), so
/// each output row copies three values per tap row, with no bounds test per value.
pub fn stem_im2col(x: &[f32], side: usize, col: &mut [f32]) {
    stem_im2col_rows(x, side, 0..side / 2, col)
}

/// [`stem_im2col`] for output rows `rows` only, into `col` (which starts at row `rows.start`): a
/// lone image's im2col in parts over its team.
pub fn stem_im2col_rows(x: &[f32], side: usize, rows: std::ops::Range<usize>, col: &mut [f32]) {
    let ho = side / 2;
    for (i, oy) in rows.enumerate() {
        let rows = &mut col[i * ho * 27..(i + 1) * ho * 27];
        for ci in 0..3 {
            for ky in 0..3 {
                let at = ci * 9 + ky * 3;
                let Some(iy) = (2 * oy + ky).checked_sub(1) else {
                    rows.chunks_exact_mut(27)
                        .for_each(|r| r[at..at + 3].fill(0.0));
                    continue;
                };
                let src = &x[(ci * side + iy) * side..][..side];
                rows[at..at + 3].copy_from_slice(&[0.0, src[0], src[1]]);
                for (ox, r) in rows.chunks_exact_mut(27).enumerate().skip(1) {
                    r[at..at + 3].copy_from_slice(&src[2 * ox - 1..2 * ox + 2]);
                }
            }
        }
    }
}

/// The stem: 3×3 stride-2 convolution 3 → 32 as an im2col matrix product (27 inputs per pixel).
struct Stem {
    conv: Pointwise,
}

/// Output rows of the stem per im2col band: the band's columns (at 224 px 4 × 112 × 27 floats,
/// 48 KB) stay in L2 between their writing and the product. The whole image's (1.4 MB at 224 px)
/// went out to L3 and back.
const STEM_BAND: usize = 4;

thread_local! {
    /// This thread's stem columns for one band.
    static STEM_COL: RefCell<Aligned> = RefCell::new(Aligned::default());
}

impl Stem {
    /// Output rows `rows` of one `[3][side][side]` image into `out` (`[rows][side/2][cout]`,
    /// ReLU6), band by band.
    fn rows(&self, x: &[f32], side: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (ho, cout) = (side / 2, self.conv.cout);
        STEM_COL.with(|col| {
            let col = &mut *col.borrow_mut();
            col.grow(STEM_BAND * ho * 27);
            for (i, r0) in rows.clone().step_by(STEM_BAND).enumerate() {
                let band = r0..(r0 + STEM_BAND).min(rows.end);
                let px = band.len() * ho;
                stem_im2col_rows(x, side, band, &mut col[..px * 27]);
                let o = &mut out[i * STEM_BAND * ho * cout..][..px * cout];
                self.conv.run(&col[..px * 27], px, o, Epilogue::Relu6);
            }
        })
    }
}

/// Per-thread buffers, kept between images and batches; 64-byte aligned, so that where a
/// layer's channel count is a multiple of 16 (all of Lite0's), every channel vector of an
/// activation row is one cache line.
#[derive(Default)]
struct Scratch {
    a: Aligned,
    b: Aligned,
    c: Aligned,
}

/// Per-stage clock of [`Engine::profile`]: stage 0 the stem, `1 + 3·b + {0, 1, 2}` block `b`'s
/// expansion, depthwise and projection (a fused block's whole time under its depthwise), last
/// the head and pooling.
struct Lap {
    t: Instant,
    secs: Vec<f64>,
}

fn tick(lap: &mut Option<&mut Lap>, stage: usize) {
    if let Some(l) = lap {
        let now = Instant::now();
        l.secs[stage] += (now - l.t).as_secs_f64();
        l.t = now;
    }
}

/// Runs `f` with a fresh [`Lap`] when `clock` is given (its `stages` times then added to it).
fn clocked(clock: Option<&Mutex<Vec<f64>>>, stages: usize, f: impl FnOnce(&mut Option<&mut Lap>)) {
    let Some(clock) = clock else {
        return f(&mut None);
    };
    let mut lap = Lap {
        t: Instant::now(),
        secs: vec![0.0; stages],
    };
    f(&mut Some(&mut lap));
    let mut t = clock.lock().unwrap_or_else(|e| e.into_inner());
    t.iter_mut().zip(&lap.secs).for_each(|(t, l)| *t += l);
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// An EfficientNet-Lite network for inference on the CPU (see the module docs).
pub struct Engine {
    stem: Stem,
    blocks: Vec<Block>,
    head: Pointwise,
    /// Blocks with an expansion run band by band (module docs); over a team, each thread its part
    /// of the output rows.
    fused: bool,
    /// A batch's small-map blocks run over groups of images (`group.rs`).
    grouped: bool,
}

/// What [`Engine::run`] returns per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The pooled 1280-d features.
    Pooled,
    /// The output of the first `n` MBConv blocks (stem included), `[c][h][w]` like burn's NCHW.
    Blocks(usize),
    /// The same, channels last: `[h][w][c]`.
    BlocksNhwc(usize),
}

impl Engine {
    /// Folds the network's BatchNorms (running statistics) into an inference copy.
    pub fn new(m: &Lite) -> Result<Self> {
        let (w, b, d) = fold(&m.conv_stem, &m.bn0)?;
        if d[1] != 3 || d[2] != 3 || d[3] != 3 {
            bail!("unexpected stem shape {d:?}");
        }
        let stem = Stem {
            conv: Pointwise::new(w, b, 27, d[0]),
        };
        let mut blocks = Vec::new();
        for blk in &m.blocks {
            let expand = match (&blk.expand_conv, &blk.bn0) {
                (Some(c), Some(n)) => Some(pointwise(c, n)?),
                _ => None,
            };
            let stride = blk.depthwise_conv.stride[0];
            blocks.push(Block {
                expand,
                dw: Depthwise::new(&blk.depthwise_conv, &blk.bn1, stride)?,
                project: pointwise(&blk.project_conv, &blk.bn2)?,
                residual: blk.residual,
            });
        }
        let head = pointwise(&m.conv_head, &m.bn1)?;
        if head.cout != FEATURE_DIM {
            bail!("unexpected head width {}", head.cout);
        }
        Ok(Self {
            stem,
            blocks,
            head,
            fused: true,
            grouped: true,
        })
    }

    /// Turns the fused blocks off (layer by layer, as with a split image) or on (the default).
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// Turns the grouped tail of a batch off (every image alone) or on (the default).
    pub fn set_grouped(&mut self, on: bool) {
        self.grouped = on;
    }

    /// How many stages [`Engine::profile`] clocks (without building their names).
    fn stages(&self) -> usize {
        2 + 3 * self.blocks.len()
    }

    /// Names of [`Engine::profile`]'s stages.
    pub fn stage_names(&self) -> Vec<String> {
        let mut v = vec!["stem".to_string()];
        for b in 0..self.blocks.len() {
            for part in ["expand", "depthwise", "project"] {
                v.push(format!("block {b} {part}"));
            }
        }
        v.push("head + pool".into());
        v
    }

    /// [`Engine::pooled`] with a clock: the thread-seconds each stage took over the `n` images
    /// (summed over the pool's threads), in [`Engine::stage_names`] order.
    pub fn profile(&self, input: &[f32], n: usize, side: usize) -> Vec<f64> {
        let total = Mutex::new(vec![0f64; self.stage_names().len()]);
        self.run_with(input, n, side, Output::Pooled, Some(&total));
        total.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Values per image of `output` for inputs of `side` px, and its `[c, h, w]`.
    pub fn output_shape(&self, side: usize, output: Output) -> [usize; 3] {
        match output {
            Output::Pooled => [FEATURE_DIM, 1, 1],
            Output::Blocks(n) | Output::BlocksNhwc(n) => {
                let mut s = side / 2;
                let mut c = self.stem.conv.cout;
                for b in self.blocks.iter().take(n) {
                    s = b.dw.out_side(s);
                    c = b.project.cout;
                }
                [c, s, s]
            }
        }
    }

    /// Runs `n` images (`[n][3][side][side]`, normalised) and returns `n` outputs back to back.
    /// Images are spread over the rayon pool, one image per thread at a time.
    pub fn run(&self, input: &[f32], n: usize, side: usize, output: Output) -> Vec<f32> {
        self.run_with(input, n, side, output, None)
    }

    /// [`Engine::run`], each image's stage times added to `clock` when given.
    fn run_with(
        &self,
        input: &[f32],
        n: usize,
        side: usize,
        output: Output,
        clock: Option<&Mutex<Vec<f64>>>,
    ) -> Vec<f32> {
        let per_in = 3 * side * side;
        assert_eq!(input.len(), n * per_in, "input is not n × 3 × side × side");
        let [c, h, w] = self.output_shape(side, output);
        let per_out = c * h * w;
        let mut out = vec![0f32; n * per_out];
        let one = |x: &[f32], o: &mut [f32], team: Option<&Team>| {
            self.with_scratch(side, clock, |s, lap| {
                self.image(x, side, output, o, s, team, lap.as_deref_mut())
            })
        };
        let threads = rayon::current_num_threads();
        if n == 1 && threads > 1 {
            // A lone image (a search request): every layer's rows split over the pool's threads,
            // which spin between layers as one team (cpu::team) for this image.
            Team::with(threads, |team| one(input, &mut out, Some(team)));
            return out;
        }
        let g = self.group_size(n, side, output, threads);
        if g > 1 {
            self.grouped(input, n, side, g, &mut out, clock);
            return out;
        }
        out.par_chunks_mut(per_out)
            .zip(input.par_chunks(per_in))
            .for_each(|(o, x)| one(x, o, None));
        out
    }

    /// Runs `f` on this thread's scratch buffers, grown for `side` px, with a clock whose stage
    /// times are added to `clock` when given.
    fn with_scratch(
        &self,
        side: usize,
        clock: Option<&Mutex<Vec<f64>>>,
        f: impl FnOnce(&mut Scratch, &mut Option<&mut Lap>),
    ) {
        let need = self.scratch_len(side);
        SCRATCH.with(|s| {
            // A thread that waits for its split parts may run another image meanwhile (rayon
            // work stealing): that one gets fresh buffers rather than a second borrow.
            let mut fresh = Scratch::default();
            let mut held = s.try_borrow_mut();
            let s = match &mut held {
                Ok(s) => &mut **s,
                Err(_) => &mut fresh,
            };
            s.a.grow(need);
            s.b.grow(need);
            s.c.grow(need);
            clocked(clock, self.stages(), |lap| f(s, lap));
        })
    }

    /// Floats of the largest activation at `side` px: the widest block input, output or expansion
    /// at its resolution.
    fn scratch_len(&self, side: usize) -> usize {
        let mut res = side / 2;
        let mut need = res * res * self.stem.conv.cout;
        for b in &self.blocks {
            need = need.max(res * res * b.dw.c);
            res = b.dw.out_side(res);
        }
        need.max(res * res * self.head.cout)
    }

    /// Pooled features of `n` images: `n × 1280`.
    pub fn pooled(&self, input: &[f32], n: usize, side: usize) -> Vec<f32> {
        self.run(input, n, side, Output::Pooled)
    }

    /// One image through the network; `s` holds at least [`Engine::scratch_len`] floats per buffer;
    /// each layer's rows in parts over `team` (none: all on this thread, blocks fused).
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        x: &[f32],
        side: usize,
        output: Output,
        out: &mut [f32],
        s: &mut Scratch,
        team: Option<&Team>,
        mut lap: Option<&mut Lap>,
    ) {
        let nblocks = match output {
            Output::Pooled => self.blocks.len(),
            Output::Blocks(n) | Output::BlocksNhwc(n) => n.min(self.blocks.len()),
        };
        let (h, c) = self.front(x, side, nblocks, s, team, &mut lap);
        self.finish(h, c, output, out, s, team, &mut lap);
    }

    /// The stem and the first `nblocks` blocks of one image: the activation ends in `s.a`, as
    /// `[h][h][c]`; returns `(h, c)`.
    fn front(
        &self,
        x: &[f32],
        side: usize,
        nblocks: usize,
        s: &mut Scratch,
        team: Option<&Team>,
        lap: &mut Option<&mut Lap>,
    ) -> (usize, usize) {
        let mut lap = lap.as_deref_mut();
        // Stem: im2col (27 values per output pixel, burn's [ci][ky][kx] order) then a product.
        let ho = side / 2;
        let cout = self.stem.conv.cout;
        in_parts(&mut s.a, ho, ho * cout, team, 1, |rows, out| {
            self.stem.rows(x, side, rows, out)
        });
        tick(&mut lap, 0);

        // Blocks: the activation lives in `a`; `b` and `c` are the expansion and depthwise outputs.
        let (mut h, mut c) = (ho, self.stem.conv.cout);
        for (bi, blk) in self.blocks[..nblocks].iter().enumerate() {
            let band = band_rows(blk, h).filter(|_| self.fused);
            if let (Some(e), Some(band)) = (&blk.expand, band) {
                h = fused_block(blk, e, band, h, c, s, team);
                c = blk.project.cout;
                tick(&mut lap, 2 + 3 * bi);
                continue;
            }
            h = self.block_layers(bi, 1, h, c, s, team, &mut lap);
            c = blk.project.cout;
        }
        (h, c)
    }

    /// One image's output from its activation `[h][h][c]` in `s.a` (the head and pooling for
    /// [`Output::Pooled`]).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        h: usize,
        c: usize,
        output: Output,
        out: &mut [f32],
        s: &mut Scratch,
        team: Option<&Team>,
        lap: &mut Option<&mut Lap>,
    ) {
        let mut lap = lap.as_deref_mut();
        match output {
            Output::BlocksNhwc(_) => out.copy_from_slice(&s.a[..h * h * c]),
            Output::Blocks(_) => {
                // NHWC → NCHW.
                let px = h * h;
                for p in 0..px {
                    for ch in 0..c {
                        out[ch * px + p] = s.a[p * c + ch];
                    }
                }
            }
            Output::Pooled => self.head_pool(1, h, c, out, s, team, &mut lap),
        }
    }
}

/// deeprank's CPU engine for `backbone` when computing on the CPU (None on other devices).
pub fn cpu_engine(backbone: &Lite) -> Result<Option<Engine>> {
    Ok(if on_cpu() {
        Some(Engine::new(backbone)?)
    } else {
        None
    })
}
