//! The training pass's layers as read from burn's module at the start of a step: a convolution's
//! weights (depthwise ones tap-major) and the BatchNorm after it, and the weight gradient back in
//! burn's layout.

use crate::model::device::{device, to_vec as host};
use anyhow::Result;
use burn::module::ParamId;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

/// A BatchNorm layer's parameters and running statistics, and its parameters' ids.
pub(super) struct Bn {
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) mean: Vec<f32>,
    pub(super) var: Vec<f32>,
    pub(super) eps: f32,
    pub(super) momentum: f32,
    pub(super) gamma_id: ParamId,
    pub(super) beta_id: ParamId,
}

impl Bn {
    pub(super) fn read(bn: &BatchNorm) -> Result<Self> {
        Ok(Self {
            gamma: host(bn.gamma.val())?,
            beta: host(bn.beta.val())?,
            mean: host(bn.running_mean.value())?,
            var: host(bn.running_var.value())?,
            eps: bn.epsilon as f32,
            momentum: bn.momentum as f32,
            gamma_id: bn.gamma.id,
            beta_id: bn.beta.id,
        })
    }
}

/// A convolution and the BatchNorm after it. Weights `[cout][cin·k·k]` (burn's order), or for a
/// depthwise convolution tap-major `[k·k][c]`.
pub(super) struct Conv {
    pub(super) w: Vec<f32>,
    pub(super) id: ParamId,
    pub(super) dims: [usize; 4],
    pub(super) stride: usize,
    pub(super) depthwise: bool,
    pub(super) bn: Bn,
}

impl Conv {
    pub(super) fn read(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        let w = conv.weight.val();
        let dims = w.dims();
        let mut w = host(w)?;
        let depthwise = dims[1] == 1 && dims[0] > 1 && dims[2] > 1;
        if depthwise {
            let (c, kk) = (dims[0], dims[2] * dims[3]);
            let mut t = vec![0f32; c * kk];
            for ch in 0..c {
                for tap in 0..kk {
                    t[tap * c + ch] = w[ch * kk + tap];
                }
            }
            w = t;
        }
        Ok(Self {
            w,
            id: conv.weight.id,
            dims,
            stride: conv.stride[0],
            depthwise,
            bn: Bn::read(bn)?,
        })
    }

    pub(super) fn cout(&self) -> usize {
        self.dims[0]
    }

    pub(super) fn cin(&self) -> usize {
        self.dims[1] * self.dims[2] * self.dims[3]
    }

    pub(super) fn out_side(&self, side: usize) -> usize {
        let k = self.dims[2];
        (side + 2 * (k / 2) - k) / self.stride + 1
    }

    /// The weight gradient in burn's layout.
    pub(super) fn weight_grad(&self, g: Vec<f32>) -> Tensor<4> {
        let g = if self.depthwise {
            let (c, kk) = (self.dims[0], self.dims[2] * self.dims[3]);
            let mut t = vec![0f32; c * kk];
            for tap in 0..kk {
                for ch in 0..c {
                    t[ch * kk + tap] = g[tap * c + ch];
                }
            }
            t
        } else {
            g
        };
        Tensor::from_data(TensorData::new(g, self.dims), &device())
    }
}
