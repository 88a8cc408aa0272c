//! deeprank's own CPU inference engine for EfficientNet-Lite0: BatchNorm folded into every
//! convolution, channels-last (NHWC) activations, 1×1 convolutions as matrix products (the `gemm`
//! crate, runtime AVX-512/AVX2 dispatch), depthwise convolutions as a hand-written channel-vector
//! loop with bias and ReLU6 fused in, one image per thread with that thread's scratch buffers reused
//! across images and batches.
//!
//! Why: burn's flex backend runs the same network NCHW with a separate pass per operation; its
//! depthwise and 1×1 convolutions are where the time goes (`bench/RESULTS.md`). Results equal the
//! plain burn network within float rounding (tested in `tests/model_golden.rs`).

use crate::model::{BN_EPS, FEATURE_DIM, Lite0};
use anyhow::{Result, anyhow, bail};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use rayon::prelude::*;
use std::cell::RefCell;

fn host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow!("{e:?}"))
}

/// A convolution with its BatchNorm folded in: weights `[cout][cin·k·k]` (burn's order) and bias.
pub(crate) fn fold(conv: &Conv2d, bn: &BatchNorm) -> Result<(Vec<f32>, Vec<f32>, [usize; 4])> {
    let w = conv.weight.val();
    let dims = w.dims();
    let mut wv = host(w)?;
    let gamma = host(bn.gamma.val())?;
    let beta = host(bn.beta.val())?;
    let mean = host(bn.running_mean.value())?;
    let var = host(bn.running_var.value())?;
    let out = dims[0];
    let per = wv.len() / out;
    let mut bias = vec![0f32; out];
    let eps = if bn.epsilon > 0.0 { bn.epsilon } else { BN_EPS };
    for o in 0..out {
        let s = gamma[o] / (var[o] + eps as f32).sqrt();
        for x in &mut wv[o * per..(o + 1) * per] {
            *x *= s;
        }
        bias[o] = beta[o] - mean[o] * s;
    }
    Ok((wv, bias, dims))
}

/// 1×1 convolution: `[cout][cin]` weights.
struct Pointwise {
    w: Vec<f32>,
    b: Vec<f32>,
    cin: usize,
    cout: usize,
}

impl Pointwise {
    fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        let (w, b, d) = fold(conv, bn)?;
        if d[2] != 1 || d[3] != 1 {
            bail!("expected a 1×1 convolution, got {d:?}");
        }
        Ok(Self {
            w,
            b,
            cin: d[1],
            cout: d[0],
        })
    }

    /// `out[p] = W·x[p] + b (+ out[p] when `accumulate`)` for `pixels` rows of `cin` channels.
    fn run(&self, x: &[f32], pixels: usize, out: &mut [f32], accumulate: bool) {
        let out = &mut out[..pixels * self.cout];
        if accumulate {
            for row in out.chunks_exact_mut(self.cout) {
                row.iter_mut().zip(&self.b).for_each(|(o, b)| *o += b);
            }
        } else {
            for row in out.chunks_exact_mut(self.cout) {
                row.copy_from_slice(&self.b);
            }
        }
        matmul_acc(x, pixels, self.cin, &self.w, self.cout, out);
    }
}

/// `dst[m][n] += lhs[m][k] · rhsᵀ` with `rhs` stored `[n][k]`, all row-major, single-threaded.
fn matmul_acc(lhs: &[f32], m: usize, k: usize, rhs: &[f32], n: usize, dst: &mut [f32]) {
    let (lrs, lcs, rrs, rcs) = (k as isize, 1, 1, k as isize);
    gemm_rm(
        dst,
        [m, n, k],
        lhs,
        [lrs, lcs],
        rhs,
        [rrs, rcs],
        true,
        false,
    );
}

/// Dense row-major `dst[m][n] (+)= lhs · rhs` (`dims` = [m, n, k]), the operands given by
/// (row, column) strides over their slices: `lhs` is m × k, `rhs` is k × n. Threaded over the
/// rayon pool when `threaded`; adds to `dst` when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rm(
    dst: &mut [f32],
    dims: [usize; 3],
    lhs: &[f32],
    lhs_strides: [isize; 2],
    rhs: &[f32],
    rhs_strides: [isize; 2],
    accumulate: bool,
    threaded: bool,
) {
    let [m, n, k] = dims;
    // The layouts used here are dense: every operand holds exactly its product of dimensions.
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= n * k);
    let [lrs, lcs] = lhs_strides;
    let [rrs, rcs] = rhs_strides;
    let far = |rs: isize, cs: isize, r: usize, c: usize| {
        (r.saturating_sub(1) as isize * rs + c.saturating_sub(1) as isize * cs) as usize
    };
    assert!(far(lrs, lcs, m, k) < lhs.len().max(1) && far(rrs, rcs, k, n) < rhs.len().max(1));
    let par = if threaded {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the strides reach is inside its slice (checked above); the
    // destination is a distinct, exclusively borrowed slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn relu6(v: &mut [f32]) {
    for x in v {
        *x = x.clamp(0.0, 6.0);
    }
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

    /// `x` is `[h][w][c]`; writes `[ho][wo][c]` = ReLU6(conv + bias).
    fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
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
        depthwise(&a, out)
    }
}

/// Depthwise convolution of one `[h][w][c]` image into `[ho][wo][c]` (padding k/2), with the CPU's
/// widest vector instructions.
pub(crate) fn depthwise(a: &DwArgs, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { dw_avx512(a, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { dw_avx2(a, out) };
        }
    }
    dw_generic::<false>(a, out)
}

pub(crate) struct DwArgs<'a> {
    pub x: &'a [f32],
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    /// Tap-major weights `[k·k][c]`.
    pub wt: &'a [f32],
    pub bias: &'a [f32],
    /// Clamp the outputs to [0, 6] (ReLU6).
    pub relu6: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dw_avx512(a: &DwArgs, out: &mut [f32]) {
    dw_generic::<true>(a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_avx2(a: &DwArgs, out: &mut [f32]) {
    dw_generic::<true>(a, out)
}

/// `acc + x·w`, fused when the caller is compiled with FMA.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FMA { x.mul_add(w, acc) } else { acc + x * w }
}

/// One block of `CB` channels starting at `c0` for output pixel (oy, ox).
#[inline(always)]
fn dw_pixel<const CB: usize, const FMA: bool>(
    a: &DwArgs,
    c0: usize,
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
    iy0: isize,
    ix0: isize,
    out: &mut [f32],
) {
    let c = a.c;
    let mut acc = [0f32; CB];
    acc.copy_from_slice(&a.bias[c0..c0 + CB]);
    for dy in ky {
        let iy = (iy0 + dy as isize) as usize;
        for dx in kx.clone() {
            let ix = (ix0 + dx as isize) as usize;
            let src = &a.x[(iy * a.w + ix) * c + c0..][..CB];
            let wr = &a.wt[(dy * a.k + dx) * c + c0..][..CB];
            for t in 0..CB {
                acc[t] = madd::<FMA>(acc[t], src[t], wr[t]);
            }
        }
    }
    let o = &mut out[..CB];
    if a.relu6 {
        for t in 0..CB {
            o[t] = acc[t].clamp(0.0, 6.0);
        }
    } else {
        o.copy_from_slice(&acc);
    }
}

#[inline(always)]
fn dw_generic<const FMA: bool>(a: &DwArgs, out: &mut [f32]) {
    let (k, s, c) = (a.k, a.stride, a.c);
    let p = (k / 2) as isize;
    let ho = (a.h + 2 * (k / 2) - k) / s + 1;
    let wo = (a.w + 2 * (k / 2) - k) / s + 1;
    let taps = |o: usize, side: usize| {
        let i0 = (o * s) as isize - p;
        let lo = (-i0).max(0) as usize;
        let hi = ((side as isize - i0).min(k as isize)).max(0) as usize;
        (i0, lo..hi)
    };
    for oy in 0..ho {
        let (iy0, ky) = taps(oy, a.h);
        for ox in 0..wo {
            let (ix0, kx) = taps(ox, a.w);
            let o = &mut out[(oy * wo + ox) * c..(oy * wo + ox + 1) * c];
            let mut c0 = 0;
            while c0 + 32 <= c {
                dw_pixel::<32, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 32;
            }
            while c0 + 8 <= c {
                dw_pixel::<8, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 8;
            }
            while c0 < c {
                dw_pixel::<1, FMA>(a, c0, ky.clone(), kx.clone(), iy0, ix0, &mut o[c0..]);
                c0 += 1;
            }
        }
    }
}

struct Block {
    expand: Option<Pointwise>,
    dw: Depthwise,
    project: Pointwise,
    residual: bool,
}

/// The stem's im2col for one `[3][side][side]` image: `[ho·ho][27]` (ho = side/2; 3×3 stride 2,
/// padding 1), burn's `[ci][ky][kx]` order; every value written (padding as 0).
pub(crate) fn stem_im2col(x: &[f32], side: usize, col: &mut [f32]) {
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

/// The stem: 3×3 stride-2 convolution 3 → 32 as an im2col matrix product.
struct Stem {
    w: Vec<f32>,
    b: Vec<f32>,
    cout: usize,
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

/// EfficientNet-Lite0 for inference on the CPU (see the module docs).
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
    pub fn new(m: &Lite0) -> Result<Self> {
        let (w, b, d) = fold(&m.conv_stem, &m.bn0)?;
        if d[1] != 3 || d[2] != 3 || d[3] != 3 {
            bail!("unexpected stem shape {d:?}");
        }
        let stem = Stem { w, b, cout: d[0] };
        let mut blocks = Vec::new();
        for blk in &m.blocks {
            let expand = match (&blk.expand_conv, &blk.bn0) {
                (Some(c), Some(n)) => Some(Pointwise::new(c, n)?),
                _ => None,
            };
            let stride = blk.depthwise_conv.stride[0];
            blocks.push(Block {
                expand,
                dw: Depthwise::new(&blk.depthwise_conv, &blk.bn1, stride)?,
                project: Pointwise::new(&blk.project_conv, &blk.bn2)?,
                residual: blk.residual,
            });
        }
        let head = Pointwise::new(&m.conv_head, &m.bn1)?;
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
                let mut c = self.stem.cout;
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
        out.par_chunks_mut(per_out)
            .zip(input.par_chunks(per_in))
            .for_each(|(o, x)| {
                SCRATCH.with(|s| {
                    let s = &mut *s.borrow_mut();
                    grow(&mut s.a, need);
                    grow(&mut s.b, need);
                    grow(&mut s.c, need.max((side / 2) * (side / 2) * 27));
                    self.image(x, side, output, o, s)
                });
            });
        out
    }

    /// Floats of the largest activation at `side` px: the widest block input, output or expansion
    /// at its resolution.
    fn scratch_len(&self, side: usize) -> usize {
        let mut res = side / 2;
        let mut need = res * res * self.stem.cout;
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

    /// One image through the network; `s` holds at least [`Engine::scratch_len`] floats per buffer.
    fn image(&self, x: &[f32], side: usize, output: Output, out: &mut [f32], s: &mut Scratch) {
        // Stem: im2col (27 values per output pixel, burn's [ci][ky][kx] order) then a product.
        let ho = side / 2;
        {
            let col = &mut s.c[..ho * ho * 27];
            stem_im2col(x, side, col);
            let dst = &mut s.a[..ho * ho * self.stem.cout];
            for row in dst.chunks_exact_mut(self.stem.cout) {
                row.copy_from_slice(&self.stem.b);
            }
            matmul_acc(col, ho * ho, 27, &self.stem.w, self.stem.cout, dst);
            relu6(dst);
        }

        // Blocks: the activation lives in `a`; `b` and `c` are the expansion and depthwise outputs.
        let (mut h, mut c) = (ho, self.stem.cout);
        let nblocks = match output {
            Output::Pooled => self.blocks.len(),
            Output::Blocks(n) | Output::BlocksNhwc(n) => n.min(self.blocks.len()),
        };
        for blk in &self.blocks[..nblocks] {
            let px = h * h;
            let mid_src: &[f32] = match &blk.expand {
                Some(e) => {
                    e.run(&s.a[..px * c], px, &mut s.b, false);
                    relu6(&mut s.b[..px * e.cout]);
                    &s.b[..px * e.cout]
                }
                None => &s.a[..px * c],
            };
            let ho = blk.dw.out_side(h);
            blk.dw.run(mid_src, h, h, &mut s.c[..ho * ho * blk.dw.c]);
            let opx = ho * ho;
            if blk.residual {
                blk.project.run(&s.c[..opx * blk.dw.c], opx, &mut s.a, true);
            } else {
                blk.project
                    .run(&s.c[..opx * blk.dw.c], opx, &mut s.b, false);
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
                self.head.run(&s.a[..px * c], px, &mut s.b, false);
                let f = &mut s.b[..px * self.head.cout];
                relu6(f);
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
