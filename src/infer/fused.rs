//! The inference path of an EfficientNet-Lite network with every BatchNorm folded into the convolution before
//! it (`w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`), so each layer is one convolution with a bias
//! (and ReLU6) instead of a convolution plus four element-wise passes. Same outputs as
//! [`Lite::pooled`] within float rounding (tested).

use crate::cpu::fold;
use crate::model::lite::{Lite, MbConv};
use anyhow::Result;
use burn::module::Param;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu6;

/// A copy of `conv` with `bn` folded in.
fn fold(conv: &Conv2d, bn: &BatchNorm) -> Result<Conv2d> {
    let device = conv.weight.val().device();
    let (w, bias, dims) = fold::fold(conv, bn)?;
    let out = dims[0];
    let mut c = conv.clone();
    c.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, dims), &device));
    c.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(bias, [out]),
        &device,
    )));
    Ok(c)
}

struct Block {
    expand: Option<Conv2d>,
    depthwise: Conv2d,
    project: Conv2d,
    residual: bool,
}

impl Block {
    fn new(b: &MbConv) -> Result<Self> {
        let expand = match (&b.expand_conv, &b.bn0) {
            (Some(c), Some(n)) => Some(fold(c, n)?),
            _ => None,
        };
        Ok(Self {
            expand,
            depthwise: fold(&b.depthwise_conv, &b.bn1)?,
            project: fold(&b.project_conv, &b.bn2)?,
            residual: b.residual,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = x.clone();
        if let Some(e) = &self.expand {
            h = relu6(e.forward(h));
        }
        h = relu6(self.depthwise.forward(h));
        h = self.project.forward(h);
        if self.residual { h + x } else { h }
    }
}

/// An EfficientNet-Lite network for inference, BatchNorm folded.
pub struct FusedLite {
    stem: Conv2d,
    blocks: Vec<Block>,
    head: Conv2d,
}

impl FusedLite {
    pub fn new(m: &Lite) -> Result<Self> {
        Ok(Self {
            stem: fold(&m.conv_stem, &m.bn0)?,
            blocks: m.blocks.iter().map(Block::new).collect::<Result<_>>()?,
            head: fold(&m.conv_head, &m.bn1)?,
        })
    }

    /// Globally average-pooled features: `[n, 1280]`.
    pub fn pooled(&self, x: Tensor<4>) -> Tensor<2> {
        let mut h = relu6(self.stem.forward(x));
        for b in &self.blocks {
            h = b.forward(h);
        }
        let f = relu6(self.head.forward(h));
        let [n, c, _, _] = f.dims();
        f.mean_dim(3).mean_dim(2).reshape([n, c])
    }
}
