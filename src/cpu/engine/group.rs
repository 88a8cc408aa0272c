//! The grouped tail of a batch: the blocks whose maps are small run layer by layer over several
//! images at once, each 1×1 convolution as one product over all their pixels.
//!
//! Why: a 1×1 convolution over a 4×4 or 7×7 map uses each weight 16 or 49 times, so one image at a
//! time streams the late blocks' weights (most of the network's 3.4 M) from L3 for every image:
//! per-layer clocks at 128 px had these layers at half ONNX Runtime's speed, which runs each layer
//! over the whole batch. Over a group of images the weight panels are loaded once per group and
//! stay in L2 while every image's pixels go through them. The early blocks still run one image
//! at a time (fused bands), where an image's activations are what must stay in cache.
//!
//! Same bits as one image at a time: the 1×1 kernel computes each pixel alone (its tile only
//! decides which pixels share a pass over the weights), depthwise runs per image, pooling sums each
//! image's rows in the same order (tested in `tests/model_golden.rs`).

use super::{Engine, Lap, Output, Scratch, clocked};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

thread_local! {
    /// A group's tail buffers.
    static TAIL: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Largest map (pixels per image) a block's input may have for the block to run grouped: the
/// 7×7 blocks at 224 px, the 4×4 ones at 128 px. With 8×8 maps (64) grouped as well, blocks 6–10
/// at 128 px got slower (their expansions over a group no longer stay in L2).
const GROUP_PX: usize = 49;
/// Images per group at most: a 4×4 map's products run over 256 pixels. Per-layer clocks, one thread,
/// thread-ms per image (fused alone → grouped by 4 / 8 / 16): 128 px 2.71–2.82 → 2.78 / 2.67 /
/// 2.56; 224 px 8.65–8.90 → 8.11 / 8.06 / 7.86.
const GROUP: usize = 16;

impl Engine {
    /// The first block of the grouped tail at `side` px: every block from it on has an input map
    /// of at most [`GROUP_PX`] pixels (`blocks.len()`: none has).
    pub(super) fn tail_start(&self, side: usize) -> usize {
        let mut h = side / 2;
        let mut start = self.blocks.len();
        for (bi, b) in self.blocks.iter().enumerate() {
            if h * h > GROUP_PX {
                start = self.blocks.len();
            } else if start == self.blocks.len() {
                start = bi;
            }
            h = b.dw.out_side(h);
        }
        start
    }

    /// Images per group for a batch of `n` on `threads` threads (1: no grouping): only for pooled
    /// features, with grouping on, at sides with a tail; at least four groups per thread, so that
    /// a thread slowed by other work (the decoder) leaves the others little to wait for.
    pub(super) fn group_size(
        &self,
        n: usize,
        side: usize,
        output: Output,
        threads: usize,
    ) -> usize {
        if !self.grouped || output != Output::Pooled || self.tail_start(side) == self.blocks.len() {
            return 1;
        }
        GROUP.min(n.div_ceil(4 * threads.max(1))).max(1)
    }

    /// Floats per image of the largest activation in the tail from block `from` (input `h`).
    pub(super) fn tail_len(&self, from: usize, mut h: usize) -> usize {
        let mut need = 0;
        for b in &self.blocks[from..] {
            need = need.max(h * h * b.dw.c);
            h = b.dw.out_side(h);
            need = need.max(h * h * b.dw.c.max(b.project.cout));
        }
        need.max(h * h * self.head.cout)
    }

    /// Blocks `from..` and the pooled head for `g` images whose activations (`[h][h][c]` each,
    /// back to back) are in `s.a`; writes `g × 1280` pooled features to `out`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tail(
        &self,
        from: usize,
        g: usize,
        mut h: usize,
        mut c: usize,
        s: &mut Scratch,
        out: &mut [f32],
        lap: &mut Option<&mut Lap>,
    ) {
        for bi in from..self.blocks.len() {
            h = self.block_layers(bi, g, h, c, s, None, lap);
            c = self.blocks[bi].project.cout;
        }
        self.head_pool(g, h, c, out, s, None, lap);
    }

    /// A batch of `n` images with its tail in groups of `g`: [`Engine::fronts`], then
    /// [`Engine::tails`]. Writes `n × 1280` pooled features to `out`.
    pub(super) fn grouped(
        &self,
        input: &[f32],
        n: usize,
        side: usize,
        g: usize,
        out: &mut [f32],
        clock: Option<&Mutex<Vec<f64>>>,
    ) {
        let f = self.fronts(input, n, side, g, clock);
        self.tails(&f, out, clock);
    }

    /// Every image's blocks before the tail, one image per task (so that the threads stay
    /// balanced), into one buffer.
    pub(super) fn fronts(
        &self,
        input: &[f32],
        n: usize,
        side: usize,
        g: usize,
        clock: Option<&Mutex<Vec<f64>>>,
    ) -> Fronts {
        let from = self.tail_start(side);
        let [c, h, _] = self.output_shape(side, Output::BlocksNhwc(from));
        let per = h * h * c;
        let mut mid = vec![0f32; n * per];
        mid.par_chunks_mut(per)
            .zip(input.par_chunks(3 * side * side))
            .for_each(|(m, x)| {
                self.with_scratch(side, clock, |s, lap| {
                    self.front(x, side, from, s, None, lap);
                    m.copy_from_slice(&s.a[..per]);
                })
            });
        Fronts {
            mid,
            n,
            g,
            from,
            h,
            c,
        }
    }

    /// The tail of a batch whose fronts have run, one group per task: `f.n × 1280` pooled
    /// features into `out`.
    pub(super) fn tails(&self, f: &Fronts, out: &mut [f32], clock: Option<&Mutex<Vec<f64>>>) {
        let (from, g, h, c) = (f.from, f.g, f.h, f.c);
        let per = h * h * c;
        let need = g * self.tail_len(from, h);
        out[..f.n * self.head.cout]
            .par_chunks_mut(g * self.head.cout)
            .zip(f.mid.par_chunks(g * per))
            .for_each(|(o, m)| {
                TAIL.with(|t| {
                    let t = &mut *t.borrow_mut();
                    t.a.grow(need);
                    t.b.grow(need);
                    t.c.grow(need);
                    t.a[..m.len()].copy_from_slice(m);
                    clocked(clock, self.stages(), |lap| {
                        self.tail(from, m.len() / per, h, c, t, o, lap)
                    });
                })
            });
    }
}

/// A batch whose blocks before the grouped tail have run: each image's activation `[h][h][c]`
/// entering block `from`, back to back, and the images per tail group.
pub(super) struct Fronts {
    mid: Vec<f32>,
    n: usize,
    g: usize,
    from: usize,
    h: usize,
    c: usize,
}

/// A batch's pooled features begun by [`Engine::begin_pooled`] and finished by
/// [`Engine::finish_pooled`]: in a stream of batches, the next batch's front blocks run while
/// this one's tail finishes, so neither half waits for the other's slowest task
/// ([`crate::infer::stream`]).
pub struct Begun(Stage);

enum Stage {
    Fronts(Fronts),
    Done(Vec<f32>),
}

impl Engine {
    /// The part of [`Engine::pooled`] for `n` images that does not need the previous batch to
    /// be done: the blocks before the grouped tail; the whole network where the batch has no
    /// grouped tail (a lone image, a side without small maps, grouping off).
    pub fn begin_pooled(&self, input: &[f32], n: usize, side: usize) -> Begun {
        let g = self.group_size(n, side, Output::Pooled, rayon::current_num_threads());
        Begun(if g > 1 {
            Stage::Fronts(self.fronts(input, n, side, g, None))
        } else {
            Stage::Done(self.pooled(input, n, side))
        })
    }

    /// The rest of a begun batch: `n × 1280` pooled features, the same bits as
    /// [`Engine::pooled`].
    pub fn finish_pooled(&self, b: Begun) -> Vec<f32> {
        match b.0 {
            Stage::Done(v) => v,
            Stage::Fronts(f) => {
                let mut out = vec![0f32; f.n * self.head.cout];
                self.tails(&f, &mut out, None);
                out
            }
        }
    }
}
