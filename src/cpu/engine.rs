//! deeprank's own CPU inference engine for the EfficientNet-Lite networks (any block config): BatchNorm folded into every
//! convolution, channels-last (NHWC) activations, 1×1 convolutions through [`crate::cpu::pointwise`]
//! (weights packed once, an AVX-512 kernel with bias, residual and ReLU6 fused), depthwise
//! convolutions as hand-written channel-vector kernels with bias and ReLU6 fused in, one image per thread with that thread's scratch buffers reused
//! across images and batches; a lone image (batch 1: a search request) has every layer's rows
//! split over the threads instead.
//!
//! Why: burn's flex backend runs the same network NCHW with a separate pass per operation; its
//! depthwise and 1×1 convolutions are where the time goes (`bench/RESULTS.md`). Results equal the
//! plain burn network within float rounding (tested in `tests/model_golden.rs`).

use crate::cpu::depthwise::{DwArgs, depthwise_rows};
use crate::cpu::fold::fold;
use crate::cpu::pointwise::{Epilogue, Pointwise};
use crate::model::device::on_cpu;
use crate::model::lite::{FEATURE_DIM, Lite};
use anyhow::{Result, bail};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// A 1×1 convolution with its BatchNorm folded in.
fn pointwise(conv: &Conv2d, bn: &BatchNorm) -> Result<Pointwise> {
    let (w, b, d) = fold(conv, bn)?;
    if d[2] != 1 || d[3] != 1 {
        bail!("expected a 1×1 convolution, got {d:?}");
    }
    Ok(Pointwise::new(w, b, d[1], d[0]))
}

/// Depthwise k×k convolution, weights stored tap-major `[k·k][c]`.
struct Depthwise {
    w: Vec<f32>,
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
        let mut t = vec![0f32; c * k * k];
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

    fn out_side(&self, side: usize) -> usize {
        (side + 2 * (self.k / 2) - self.k) / self.stride + 1
    }

    /// `x` is `[h][w][c]`; writes `[ho][wo][c]` = ReLU6(conv + bias), its rows in `split` parts
    /// on the rayon pool (1: on this thread).
    fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], split: usize) {
        let a = DwArgs {
            x,
            h,
            w,
            c: self.c,
            k: self.k,
            stride: self.stride,
            wt: &self.w,
            bias: &self.b,
            relu6: true,
        };
        let (ho, wo) = (self.out_side(h), self.out_side(w));
        in_parts(out, ho, wo * self.c, split, 1, |rows, o| {
            depthwise_rows(&a, rows, o)
        })
    }
}

/// `f(rows, part)` over `rows` rows of `row_len` floats at the start of `out`, cut into `parts`
/// contiguous ranges (a multiple of `align` rows each, but the last) run in parallel on the rayon
/// pool; one part: a plain call on this thread.
fn in_parts(
    out: &mut [f32],
    rows: usize,
    row_len: usize,
    parts: usize,
    align: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    let out = &mut out[..rows * row_len];
    let per = rows.div_ceil(parts.max(1)).next_multiple_of(align.max(1));
    if parts <= 1 || per >= rows {
        return f(0..rows, out);
    }
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(i, o)| f(i * per..i * per + o.len() / row_len, o));
}

/// A 1×1 convolution of `px` pixels with its pixels in `split` parts (see [`in_parts`]); each
/// pixel is computed exactly as in one call.
fn pw(p: &Pointwise, x: &[f32], px: usize, out: &mut [f32], epi: Epilogue, split: usize) {
    // Parts in whole tiles of the AVX-512 kernel's 12 pixels.
    in_parts(out, px, p.cout, split, 12, |r, o| {
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
/// padding 1), burn's `[ci][ky][kx]` order; every value written (padding as 0).
pub fn stem_im2col(x: &[f32], side: usize, col: &mut [f32]) {
    let ho = side / 2;
    for oy in 0..ho {
        for ox in 0..ho {
            let r = &mut col[(oy * ho + ox) * 27..][..27];
            for ci in 0..3 {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let iy = (oy * 2 + ky) as isize - 1;
                        let ix = (ox * 2 + kx) as isize - 1;
                        r[ci * 9 + ky * 3 + kx] =
                            if iy >= 0 && ix >= 0 && (iy as usize) < side && (ix as usize) < side {
                                x[ci * side * side + iy as usize * side + ix as usize]
                            } else {
                                0.0
                            };
                    }
                }
            }
        }
    }
}

/// The stem: 3×3 stride-2 convolution 3 → 32 as an im2col matrix product (27 inputs per pixel).
struct Stem {
    conv: Pointwise,
}

/// Per-thread buffers, kept between images and batches.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// An EfficientNet-Lite network for inference on the CPU (see the module docs).
pub struct Engine {
    stem: Stem,
    blocks: Vec<Block>,
    head: Pointwise,
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
        Ok(Self { stem, blocks, head })
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
        let per_in = 3 * side * side;
        assert_eq!(input.len(), n * per_in, "input is not n × 3 × side × side");
        let [c, h, w] = self.output_shape(side, output);
        let per_out = c * h * w;
        let mut out = vec![0f32; n * per_out];
        let need = self.scratch_len(side);
        let one = |x: &[f32], o: &mut [f32], split: usize| {
            SCRATCH.with(|s| {
                // A thread that waits for its split parts may run another image meanwhile (rayon
                // work stealing): that one gets fresh buffers rather than a second borrow.
                let mut fresh = Scratch::default();
                let mut held = s.try_borrow_mut();
                let s = match &mut held {
                    Ok(s) => &mut **s,
                    Err(_) => &mut fresh,
                };
                grow(&mut s.a, need);
                grow(&mut s.b, need);
                grow(&mut s.c, need.max((side / 2) * (side / 2) * 27));
                self.image(x, side, output, o, s, split)
            })
        };
        let threads = rayon::current_num_threads();
        if n == 1 && threads > 1 {
            // A lone image (a search request): every layer's rows split over the pool.
            one(input, &mut out, threads);
            return out;
        }
        out.par_chunks_mut(per_out)
            .zip(input.par_chunks(per_in))
            .for_each(|(o, x)| one(x, o, 1));
        out
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
    /// each layer's rows in `split` parts on the rayon pool (1: all on this thread).
    fn image(
        &self,
        x: &[f32],
        side: usize,
        output: Output,
        out: &mut [f32],
        s: &mut Scratch,
        split: usize,
    ) {
        // Stem: im2col (27 values per output pixel, burn's [ci][ky][kx] order) then a product.
        let ho = side / 2;
        {
            let col = &mut s.c[..ho * ho * 27];
            stem_im2col(x, side, col);
            pw(
                &self.stem.conv,
                col,
                ho * ho,
                &mut s.a,
                Epilogue::Relu6,
                split,
            );
        }

        // Blocks: the activation lives in `a`; `b` and `c` are the expansion and depthwise outputs.
        let (mut h, mut c) = (ho, self.stem.conv.cout);
        let nblocks = match output {
            Output::Pooled => self.blocks.len(),
            Output::Blocks(n) | Output::BlocksNhwc(n) => n.min(self.blocks.len()),
        };
        for blk in &self.blocks[..nblocks] {
            let px = h * h;
            let mid_src: &[f32] = match &blk.expand {
                Some(e) => {
                    pw(e, &s.a[..px * c], px, &mut s.b, Epilogue::Relu6, split);
                    &s.b[..px * e.cout]
                }
                None => &s.a[..px * c],
            };
            let ho = blk.dw.out_side(h);
            blk.dw
                .run(mid_src, h, h, &mut s.c[..ho * ho * blk.dw.c], split);
            let opx = ho * ho;
            if blk.residual {
                let x = &s.c[..opx * blk.dw.c];
                pw(&blk.project, x, opx, &mut s.a, Epilogue::Accumulate, split);
            } else {
                let x = &s.c[..opx * blk.dw.c];
                pw(&blk.project, x, opx, &mut s.b, Epilogue::Plain, split);
                std::mem::swap(&mut s.a, &mut s.b);
            }
            h = ho;
            c = blk.project.cout;
        }

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
            Output::Pooled => {
                let px = h * h;
                pw(
                    &self.head,
                    &s.a[..px * c],
                    px,
                    &mut s.b,
                    Epilogue::Relu6,
                    split,
                );
                let f = &s.b[..px * self.head.cout];
                out.fill(0.0);
                for row in f.chunks_exact(self.head.cout) {
                    out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                }
                let inv = 1.0 / px as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
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
