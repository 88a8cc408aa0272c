//! The burn glue around deeprank's own CPU backbone pass ([`crate::cpu::pass`]): the pass's pooled
//! features enter burn's graph as a leaf tensor, burn runs the head and the loss, and the leaf's
//! gradient comes back through the pass's backward into burn's [`GradientsParams`], with the
//! BatchNorm running averages stored in the module.

use crate::cpu::pass::{Backbone, Backward, Grad, Tape};
use crate::model::device::to_vec;
use crate::model::net::{EmbedNet, LevelInput};
use crate::train::cache::FeatureCache;
use crate::train::plan::Slot;
use anyhow::{Result, anyhow};
use burn::nn::BatchNorm;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;

/// The step's pass through the backbone, until its backward pass.
pub struct Pending {
    backbone: Backbone,
    tape: Tape,
    leaf: Tensor<4>,
}

/// The level input of a training step for `model`'s trainable backbone above `level`, computed
/// by [`crate::cpu::pass`]: the pooled features as a leaf of burn's graph on `device` (autodiff), with the
/// multiscale network's down-sampled inputs.
pub fn prefix(
    model: &EmbedNet,
    batch: Vec<f32>,
    n: usize,
    size: usize,
    level: usize,
    train_bn: bool,
    device: &Device,
) -> Result<(LevelInput, Pending)> {
    let backbone = Backbone::read(&model.backbone, level, train_bn)?;
    let (pooled, tape) = backbone.forward(&batch, n, size);
    let small = model.small_inputs_host(&batch, n, size, device);
    Ok(leaf(backbone, pooled, tape, n, small, device))
}

/// As [`prefix`], from a feature cache at `level` (≥ 1) instead of images: the trainable part
/// above it runs through [`crate::cpu::pass`] from the cached activations of `slots`.
pub fn cached(
    model: &EmbedNet,
    cache: &FeatureCache,
    slots: &[Slot],
    level: usize,
    train_bn: bool,
    device: &Device,
) -> Result<(LevelInput, Pending)> {
    let backbone = Backbone::read_above(&model.backbone, level, train_bn)?;
    let (x, side) = cache.gather_nhwc(slots);
    let n = slots.len();
    let (pooled, tape) = backbone.forward(&x, n, side);
    let small = cache.gather_small(slots, device);
    Ok(leaf(backbone, pooled, tape, n, small, device))
}

/// The pooled features as a leaf of burn's graph, with the multiscale inputs `small`.
fn leaf(
    backbone: Backbone,
    pooled: Vec<f32>,
    tape: Tape,
    n: usize,
    (small4, small8): (Option<Tensor<4>>, Option<Tensor<4>>),
    device: &Device,
) -> (LevelInput, Pending) {
    let c = pooled.len() / n;
    let leaf = Tensor::<4>::from_data(TensorData::new(pooled, [n, c, 1, 1]), device).require_grad();
    (
        LevelInput {
            trunk: leaf.clone(),
            small4,
            small8,
        },
        Pending {
            backbone,
            tape,
            leaf,
        },
    )
}

impl Pending {
    /// burn's gradients of the step (loss backward) plus the backbone's, and the running averages
    /// stored in `model`.
    pub fn gradients(self, mut g: Gradients, model: &EmbedNet) -> Result<GradientsParams> {
        let d = self
            .leaf
            .grad_remove(&mut g)
            .ok_or_else(|| anyhow!("the loss does not depend on the backbone's features"))?;
        let d = to_vec(d)?;
        let mut grads = GradientsParams::from_grads(g, model);
        apply(self.backbone.backward(self.tape, &d), &mut grads, model);
        Ok(grads)
    }
}

/// Registers the backbone pass's gradients and stores its running averages in `model`'s backbone.
fn apply(pass: Backward, grads: &mut GradientsParams, model: &EmbedNet) {
    for (id, g) in pass.grads {
        match g {
            Grad::D1(t) => grads.register(id, t),
            Grad::D4(t) => grads.register(id, t),
        }
    }
    if pass.running.is_empty() {
        return;
    }
    let b = &model.backbone;
    let mut bns: Vec<&BatchNorm> = vec![&b.bn0, &b.bn1];
    for blk in &b.blocks {
        bns.extend(blk.bn0.iter());
        bns.push(&blk.bn1);
        bns.push(&blk.bn2);
    }
    for (id, mean, var) in pass.running {
        if let Some(bn) = bns.iter().find(|bn| bn.gamma.id == id) {
            let dev = bn.running_mean.value().device();
            let c = mean.len();
            bn.running_mean
                .update(Tensor::from_data(TensorData::new(mean, [c]), &dev));
            bn.running_var
                .update(Tensor::from_data(TensorData::new(var, [c]), &dev));
        }
    }
}
