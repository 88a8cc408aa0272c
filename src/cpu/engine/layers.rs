//! One block, or the head and pooling, layer by layer over one image or a group of images stacked
//! in the scratch buffers: the path of a lone image split over a team, of blocks too small to
//! fuse, and of a batch's grouped tail (`group.rs`).

use super::{Engine, Lap, Scratch, pw, tick};
use crate::cpu::pointwise::Epilogue;
use crate::cpu::team::Team;

impl Engine {
    /// Block `bi` layer by layer over `g` images whose activations (`[h][h][c]` each, back to
    /// back) are in `s.a`: each 1×1 convolution one product over all their pixels, the depthwise
    /// image by image; the outputs end in `s.a`. Returns the output side.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_layers(
        &self,
        bi: usize,
        g: usize,
        h: usize,
        c: usize,
        s: &mut Scratch,
        team: Option<&Team>,
        lap: &mut Option<&mut Lap>,
    ) -> usize {
        let mut lap = lap.as_deref_mut();
        let (blk, px, stage) = (&self.blocks[bi], h * h, 1 + 3 * bi);
        let cm = blk.dw.c;
        let mid: &[f32] = match &blk.expand {
            Some(e) => {
                pw(
                    e,
                    &s.a[..g * px * c],
                    g * px,
                    &mut s.b,
                    Epilogue::Relu6,
                    team,
                );
                &s.b[..g * px * cm]
            }
            None => &s.a[..g * px * c],
        };
        tick(&mut lap, stage);
        let ho = blk.dw.out_side(h);
        let opx = ho * ho;
        for (x, o) in mid
            .chunks_exact(px * cm)
            .zip(s.c[..g * opx * cm].chunks_exact_mut(opx * cm))
        {
            blk.dw.run(x, h, h, o, team);
        }
        tick(&mut lap, stage + 1);
        let x = &s.c[..g * opx * cm];
        if blk.residual {
            pw(
                &blk.project,
                x,
                g * opx,
                &mut s.a,
                Epilogue::Accumulate,
                team,
            );
        } else {
            pw(&blk.project, x, g * opx, &mut s.b, Epilogue::Plain, team);
            std::mem::swap(&mut s.a, &mut s.b);
        }
        tick(&mut lap, stage + 2);
        ho
    }

    /// The head and pooling for `g` images whose activations (`[h][h][c]` each, back to back)
    /// are in `s.a`: the head's product over all their pixels, then each image's mean into its
    /// row of `out` (`g × 1280`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn head_pool(
        &self,
        g: usize,
        h: usize,
        c: usize,
        out: &mut [f32],
        s: &mut Scratch,
        team: Option<&Team>,
        lap: &mut Option<&mut Lap>,
    ) {
        let (px, d) = (h * h, self.head.cout);
        pw(
            &self.head,
            &s.a[..g * px * c],
            g * px,
            &mut s.b,
            Epilogue::Relu6,
            team,
        );
        let inv = 1.0 / px as f32;
        for (f, o) in s.b[..g * px * d]
            .chunks_exact(px * d)
            .zip(out.chunks_exact_mut(d))
        {
            o.fill(0.0);
            for row in f.chunks_exact(d) {
                o.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            o.iter_mut().for_each(|o| *o *= inv);
        }
        tick(lap, 1 + 3 * self.blocks.len());
    }
}
