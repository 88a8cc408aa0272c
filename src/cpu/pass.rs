//! deeprank's own CPU training pass for the EfficientNet-Lite backbone: forward with the
//! activations kept, and the backward pass by hand, channels-last, each layer over the whole batch
//! (BatchNorm needs the batch's statistics). The convolutions run fused with the BatchNorm around
//! them ([`crate::cpu::conv_bn`]): 1×1 convolutions in parts of rows, depthwise ones per image; a
//! BatchNorm keeps its input `z` and statistics, and the expansion's and the depthwise
//! convolution's normalised outputs are recomputed where they are read instead of stored.
//!
//! The rest of the step stays in burn: the backbone's pooled features enter burn's graph as a leaf
//! tensor, burn runs the head and the ranking loss and hands back the leaf's gradient, and this module
//! turns it into the backbone parameters' gradients ([`Backward`]), which the trainer's glue
//! (the training glue, `train/glue.rs`) registers with burn's optimiser like any other. A frozen prefix runs through the inference [`Engine`]. Same gradients as burn's autodiff of
//! the same network within float rounding (tested in `tests/train.rs`).

use crate::cpu::conv_bn::{
    Depthwise, NormBack, Pointwise, depthwise_back, depthwise_forward, pointwise_back,
    pointwise_forward,
};
use crate::cpu::engine::{self, Engine, Output};
use crate::cpu::norm::{BackCols, Cols, Moments, Sums, masked_col_dot, normalise};
use crate::cpu::pool::{self, give_all, per_image};
use crate::model::device::device;
use crate::model::lite::Lite;
use anyhow::{Result, bail};
use burn::module::ParamId;
use burn::prelude::*;
use rayon::prelude::*;

mod layer;
use layer::{Bn, Conv};

struct Block {
    expand: Option<Conv>,
    dw: Conv,
    project: Conv,
    residual: bool,
}

impl Block {
    /// The depthwise convolution over `n` images `h` → `ho`: its input is the expansion's
    /// BatchNorm + ReLU6 of its `z` (in `t1`), or without expansion the block's input `x`.
    fn dw_input<'a>(
        &'a self,
        t1: &'a Option<NormTape>,
        x: &'a [f32],
        n: usize,
        h: usize,
        ho: usize,
    ) -> Depthwise<'a> {
        let (x, x_norm) = match (&self.expand, t1) {
            (Some(e), Some(t)) => (&t.z[..], Some(t.cols(&e.bn))),
            _ => (x, None),
        };
        Depthwise {
            x,
            x_norm,
            wt: &self.dw.w,
            n,
            h,
            ho,
            c: self.dw.cout(),
            k: self.dw.dims[2],
            stride: self.dw.stride,
        }
    }
}

/// What a BatchNorm layer keeps for the backward pass.
struct NormTape {
    /// The convolution's output, before normalisation (x̂ is recomputed from it, [`NormTape::cols`]).
    z: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// Batch statistics (training mode), for the running averages.
    batch: Option<(Vec<f32>, Vec<f32>)>,
}

struct BlockTape {
    x: Vec<f32>,
    t1: Option<NormTape>,
    t2: NormTape,
    t3: NormTape,
    side_in: usize,
    side_out: usize,
}

/// The trainable part of a backbone, read from the module at the start of a step.
pub struct Backbone {
    level: usize,
    train_bn: bool,
    below: Below,
    blocks: Vec<Block>,
    head: Conv,
}

/// What feeds the first trainable block: the trainable stem (level 0), the frozen prefix run
/// through the inference engine, or the frozen prefix's output given as the input (a feature
/// cache at the level, [`Backbone::read_above`]).
enum Below {
    Stem(Conv),
    Frozen(Engine),
    Given,
}

/// A forward pass's saved state, until the backward pass.
pub struct Tape {
    n: usize,
    stem: Option<(Vec<f32>, NormTape)>,
    blocks: Vec<BlockTape>,
    head_x: Vec<f32>,
    head: NormTape,
    head_side: usize,
}

impl Backbone {
    /// Reads the layers of `m` above `level` (0 ≤ level < its pooled level; see
    /// [`crate::model::net`]).
    pub fn read(m: &Lite, level: usize, train_bn: bool) -> Result<Self> {
        if level > m.blocks.len() {
            bail!("level {level}: nothing of the backbone trains");
        }
        let below = if level == 0 {
            Below::Stem(Conv::read(&m.conv_stem, &m.bn0)?)
        } else {
            Below::Frozen(Engine::new(m)?)
        };
        Self::with_below(m, level, train_bn, below)
    }

    /// Reads the layers of `m` above `level` (1 ≤ level < its pooled level) for a [`Backbone::forward`] whose
    /// input is the frozen prefix's output at `level`, channels-last (`[n][side][side][c]`), as a
    /// feature cache holds it, instead of images.
    pub fn read_above(m: &Lite, level: usize, train_bn: bool) -> Result<Self> {
        if level == 0 || level > m.blocks.len() {
            bail!("level {level}: no frozen prefix below a trainable part to start from");
        }
        Self::with_below(m, level, train_bn, Below::Given)
    }

    fn with_below(m: &Lite, level: usize, train_bn: bool, below: Below) -> Result<Self> {
        let mut blocks = Vec::new();
        for b in m.blocks.iter().skip(level) {
            let expand = match (&b.expand_conv, &b.bn0) {
                (Some(c), Some(n)) => Some(Conv::read(c, n)?),
                _ => None,
            };
            blocks.push(Block {
                expand,
                dw: Conv::read(&b.depthwise_conv, &b.bn1)?,
                project: Conv::read(&b.project_conv, &b.bn2)?,
                residual: b.residual,
            });
        }
        Ok(Self {
            level,
            train_bn,
            below,
            blocks,
            head: Conv::read(&m.conv_head, &m.bn1)?,
        })
    }

    /// Pooled features `[n][1280]` of a normalised batch `[n][3][side][side]` (with
    /// [`Backbone::read_above`]: of the level's activations `[n][side][side][c]`), and the tape.
    pub fn forward(&self, input: &[f32], n: usize, side: usize) -> (Vec<f32>, Tape) {
        on_workers(|| self.forward_here(input, n, side))
    }

    fn forward_here(&self, input: &[f32], n: usize, side: usize) -> (Vec<f32>, Tape) {
        let (mut x, mut h, stem) = match &self.below {
            Below::Stem(stem) => {
                let ho = side / 2;
                let col = im2col(input, n, side);
                let (z, m) = self.conv_forward(stem, &col, None, n * ho * ho);
                let (t, a) = norm_forward(&stem.bn, z, m, stem.cout(), true);
                (a, ho, Some((col, t)))
            }
            Below::Frozen(engine) => {
                let out = Output::BlocksNhwc(self.level);
                let [_, hh, _] = engine.output_shape(side, out);
                (engine.run(input, n, side, out), hh, None)
            }
            Below::Given => (pool::copy_of(input), side, None),
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            // The expansion's BatchNorm + ReLU6 output is computed per image where the depthwise
            // convolution reads it (forward and backward), never stored.
            // So is the depthwise convolution's, computed per part of rows where the projection
            // reads it.
            let t1 = b.expand.as_ref().map(|e| {
                let (z, m) = self.conv_forward(e, &x, None, x.len() / e.cin());
                norm_stats(&e.bn, z, m, e.cout())
            });
            let ho = b.dw.out_side(h);
            let (z, m) = depthwise_forward(b.dw_input(&t1, &x, n, h, ho), self.train_bn);
            let t2 = norm_stats(&b.dw.bn, z, m, b.dw.cout());
            let p = &b.project;
            let x_norm = Some(t2.cols(&b.dw.bn));
            let (z, m) = self.conv_forward(p, &t2.z, x_norm, n * ho * ho);
            let (t3, mut y) = norm_forward(&p.bn, z, m, p.cout(), false);
            if b.residual {
                y.par_iter_mut()
                    .zip(x.par_iter())
                    .for_each(|(o, v)| *o += v);
            }
            blocks.push(BlockTape {
                x: std::mem::replace(&mut x, y),
                t1,
                t2,
                t3,
                side_in: h,
                side_out: ho,
            });
            h = ho;
        }
        let hd = &self.head;
        let px = h * h;
        let (z, m) = self.conv_forward(hd, &x, None, n * px);
        let (t, a) = norm_forward(&hd.bn, z, m, hd.cout(), true);
        let c = hd.cout();
        let mut pooled = vec![0f32; n * c];
        pooled
            .par_chunks_mut(c)
            .zip(a.par_chunks(px * c))
            .for_each(|(p, img)| {
                for row in img.chunks_exact(c) {
                    p.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                }
                let inv = 1.0 / px as f32;
                p.iter_mut().for_each(|o| *o *= inv);
            });
        pool::give(a);
        let tape = Tape {
            n,
            stem,
            blocks,
            head_x: x,
            head: t,
            head_side: h,
        };
        (pooled, tape)
    }

    /// Gradients of the trainable parameters given the pooled features' gradient `[n][1280]`,
    /// as (parameter, gradient) pairs in burn's layouts, and the BatchNorm running averages to
    /// store (training mode).
    pub fn backward(&self, tape: Tape, d_pooled: &[f32]) -> Backward {
        on_workers(|| self.backward_here(tape, d_pooled))
    }

    fn backward_here(&self, tape: Tape, d_pooled: &[f32]) -> Backward {
        let mut out = Backward::default();
        let n = tape.n;
        let hd = &self.head;
        let c = hd.cout();
        let px = tape.head_side * tape.head_side;
        // Pooling: every pixel gets 1/px of its image's gradient.
        let da = per_image(n, px * c, |i, img| {
            let (g, inv) = (&d_pooled[i * c..(i + 1) * c], 1.0 / px as f32);
            for row in img.chunks_exact_mut(c) {
                row.iter_mut().zip(g).for_each(|(o, v)| *o = v * inv);
            }
        });
        let stem_trains = matches!(self.below, Below::Stem(_));
        let need_dx = !self.blocks.is_empty() || stem_trains;
        let mut dx = self.pointwise_backward(
            hd,
            &tape.head,
            da,
            true,
            (&tape.head_x, None),
            need_dx,
            None,
            &mut out,
        );
        give_all([tape.head_x, tape.head.z]);
        for (i, (b, t)) in self.blocks.iter().zip(tape.blocks).enumerate().rev() {
            let first = i == 0 && !stem_trains;
            let d_res = if b.residual && !first {
                Some(pool::copy_of(&dx))
            } else {
                None
            };
            // Project (no activation).
            let input = (&t.t2.z[..], Some(t.t2.cols(&b.dw.bn)));
            let da2 =
                self.pointwise_backward(&b.project, &t.t3, dx, false, input, true, None, &mut out);
            pool::give(t.t3.z);
            // Depthwise, with the expansion BatchNorm's column sums.
            let need_src_grad = b.expand.is_some() || !first;
            let dw = &b.dw;
            let f = self.norm_grads(dw, &t.t2, &da2, true, None, &mut out);
            let shape = b.dw_input(&t.t1, &t.x, n, t.side_in, t.side_out);
            let norm = f.norm(&t.t2, &dw.bn, true);
            let (da1, g, sums) = depthwise_back(da2, norm, shape, need_src_grad);
            out.push_weight(dw, g);
            pool::give(t.t2.z);
            // Expand.
            dx = match (&b.expand, t.t1) {
                (Some(e), Some(t1)) => {
                    let dx = self.pointwise_backward(
                        e,
                        &t1,
                        da1,
                        true,
                        (&t.x, None),
                        !first,
                        sums,
                        &mut out,
                    );
                    pool::give(t1.z);
                    dx
                }
                _ => da1,
            };
            pool::give(t.x);
            if let Some(r) = d_res {
                dx.par_iter_mut()
                    .zip(r.par_iter())
                    .for_each(|(o, v)| *o += v);
                pool::give(r);
            }
        }
        if let (Below::Stem(stem), Some((col, t))) = (&self.below, tape.stem) {
            self.pointwise_backward(stem, &t, dx, true, (&col, None), false, None, &mut out);
            give_all([col, t.z]);
        }
        out
    }

    /// A 1×1 convolution's forward over `rows` rows of `x` (normalised with `x_norm`), and the
    /// column statistics of its output when the BatchNorm after it trains.
    fn conv_forward(
        &self,
        conv: &Conv,
        x: &[f32],
        x_norm: Option<Cols>,
        rows: usize,
    ) -> (Vec<f32>, Option<Moments>) {
        let p = Pointwise {
            x,
            x_norm,
            w: &conv.w,
            rows,
            n: conv.cout(),
            k: conv.cin(),
        };
        pointwise_forward(p, self.train_bn)
    }

    /// A 1×1 convolution (the stem as its im2col's product) and its BatchNorm (+ ReLU6) backward
    /// from `d`, the gradient at the BatchNorm's output: the weight's and γ, β's gradients and the
    /// running averages recorded in `out`; returns the input gradient (empty unless `need_dx`).
    /// `sums`: the BatchNorm's column sums when already known.
    #[allow(clippy::too_many_arguments)]
    fn pointwise_backward(
        &self,
        conv: &Conv,
        t: &NormTape,
        d: Vec<f32>,
        relu6: bool,
        (x, x_norm): (&[f32], Option<Cols>),
        need_dx: bool,
        sums: Option<Sums>,
        out: &mut Backward,
    ) -> Vec<f32> {
        let f = self.norm_grads(conv, t, &d, relu6, sums, out);
        let (n, k) = (conv.cout(), conv.cin());
        let shape = Pointwise {
            x,
            x_norm,
            w: &conv.w,
            rows: d.len() / n,
            n,
            k,
        };
        let (g, dx) = pointwise_back(d, f.norm(t, &conv.bn, relu6), shape, need_dx);
        out.push_weight(conv, g);
        dx
    }

    /// BatchNorm (+ ReLU6) backward's first half, from `d`, the gradient at its output: γ, β's
    /// gradients and the running averages recorded in `out`, and the factors of the second half.
    /// `sums`: the column sums when already known (else computed here).
    fn norm_grads(
        &self,
        conv: &Conv,
        t: &NormTape,
        d: &[f32],
        relu6: bool,
        sums: Option<Sums>,
        out: &mut Backward,
    ) -> Factors {
        let bn = &conv.bn;
        let c = bn.gamma.len();
        // The column sums of the masked d and d·x̂, x̂ and the ReLU6 mask (zero where γ·x̂ + β is
        // outside (0, 6)) recomputed from z.
        let (sum_d, sum_dx) = sums.unwrap_or_else(|| masked_col_dot(d, &t.z, c, t.cols(bn), relu6));
        let rows = (d.len() / c) as f32;
        let g: Vec<f32> = (0..c).map(|j| bn.gamma[j] * t.invstd[j]).collect();
        let (md, mdx): (Vec<f32>, Vec<f32>) = if self.train_bn {
            (
                sum_d.iter().map(|v| v / rows).collect(),
                sum_dx.iter().map(|v| v / rows).collect(),
            )
        } else {
            (vec![0.0; c], vec![0.0; c])
        };
        let dev = device();
        out.grads.push((
            bn.gamma_id,
            Grad::D1(Tensor::from_data(TensorData::new(sum_dx, [c]), &dev)),
        ));
        out.grads.push((
            bn.beta_id,
            Grad::D1(Tensor::from_data(TensorData::new(sum_d, [c]), &dev)),
        ));
        if let Some((m, v)) = &t.batch {
            let mo = bn.momentum;
            let mix = |run: &[f32], b: &[f32]| -> Vec<f32> {
                run.iter()
                    .zip(b)
                    .map(|(r, x)| r * (1.0 - mo) + x * mo)
                    .collect()
            };
            out.running
                .push((bn.gamma_id, mix(&bn.mean, m), mix(&bn.var, v)));
        }
        Factors { g, md, mdx }
    }
}

/// The per-channel factors of a BatchNorm backward's second half (see [`BackCols`]).
struct Factors {
    g: Vec<f32>,
    md: Vec<f32>,
    mdx: Vec<f32>,
}

impl Factors {
    /// The BatchNorm's part of a convolution's backward.
    fn norm<'a>(&'a self, t: &'a NormTape, bn: &'a Bn, relu6: bool) -> NormBack<'a> {
        NormBack {
            z: &t.z,
            cols: t.cols(bn),
            mask: relu6,
            back: BackCols {
                g: &self.g,
                md: &self.md,
                mdx: &self.mdx,
            },
        }
    }
}

/// Runs `f` on one of rayon's worker threads, so that the pass's many parallel loops fork and
/// join inside the pool: called from a thread outside it, each loop would hand its work to the pool
/// and put the caller to sleep until it is done, a wake-up across threads per loop.
fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}

/// A parameter gradient.
pub enum Grad {
    D1(Tensor<1>),
    D4(Tensor<4>),
}

/// The backward pass's results.
#[derive(Default)]
pub struct Backward {
    pub grads: Vec<(ParamId, Grad)>,
    /// New running mean and variance per BatchNorm, keyed by its γ's id.
    pub running: Vec<(ParamId, Vec<f32>, Vec<f32>)>,
}

impl Backward {
    fn push_weight(&mut self, conv: &Conv, g: Vec<f32>) {
        self.grads.push((conv.id, Grad::D4(conv.weight_grad(g))));
    }
}

/// The stem's im2col for a batch: `[n·ho·ho][27]` ([`engine::stem_im2col`] per image, threaded).
fn im2col(x: &[f32], n: usize, side: usize) -> Vec<f32> {
    let (ho, per) = (side / 2, 3 * side * side);
    per_image(n, ho * ho * 27, |i, c| {
        engine::stem_im2col(&x[i * per..(i + 1) * per], side, c)
    })
}

/// A BatchNorm's tape, which keeps `z` (`[rows][c]`): with `batch`, the batch's statistics of `z`
/// (training mode), else the running ones.
fn norm_stats(bn: &Bn, z: Vec<f32>, batch: Option<Moments>, c: usize) -> NormTape {
    let (mean, var, batch) = match batch {
        Some(m) => {
            let (m, v) = m.mean_var();
            (m.clone(), v.clone(), Some((m, v)))
        }
        None => (bn.mean.clone(), bn.var.clone(), None),
    };
    debug_assert_eq!(mean.len(), c);
    let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + bn.eps).sqrt()).collect();
    NormTape {
        z,
        mean,
        invstd,
        batch,
    }
}

/// BatchNorm forward over `[rows][c]` (see [`norm_stats`]): the tape and the activation
/// `γ·x̂ + β` (ReLU6'd when `relu6`).
fn norm_forward(
    bn: &Bn,
    z: Vec<f32>,
    batch: Option<Moments>,
    c: usize,
    relu6: bool,
) -> (NormTape, Vec<f32>) {
    let t = norm_stats(bn, z, batch, c);
    let len = t.z.len();
    let mut a = pool::take(len);
    normalise(
        &t.z,
        &mut a.spare_capacity_mut()[..len],
        c,
        t.cols(bn),
        relu6,
    );
    // SAFETY: `normalise` wrote every one of the `len` floats.
    unsafe { a.set_len(len) };
    (t, a)
}

impl NormTape {
    /// The layer's normalisation and affine numbers for the row kernels.
    fn cols<'a>(&'a self, bn: &'a Bn) -> Cols<'a> {
        Cols {
            mean: &self.mean,
            invstd: &self.invstd,
            gamma: &bn.gamma,
            beta: &bn.beta,
        }
    }
}
