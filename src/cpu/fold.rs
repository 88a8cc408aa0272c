//! BatchNorm folding: a convolution and the BatchNorm after it as one convolution with a bias.

use crate::model::device::to_vec as host;
use crate::model::lite::BN_EPS;
use anyhow::Result;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;

/// A convolution with its BatchNorm folded in: weights `[cout][cin·k·k]` (burn's order) and bias.
pub fn fold(conv: &Conv2d, bn: &BatchNorm) -> Result<(Vec<f32>, Vec<f32>, [usize; 4])> {
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
