//! The triplet network's branch: one network with shared weights applied to query, positive and
//! negative. An EfficientNet-Lite backbone (pretrained) + a linear embedding head (optionally L2-normalised),
//! or the paper's multiscale network (Wang et al. 2014, fig. 3): the CNN plus two shallow
//! convolution branches on 4:1 and 8:1 down-sampled copies of the input, concatenated, embedded
//! linearly and L2-normalised. Or the backbone with its ImageNet classifier's posteriors beside
//! the pooled features (`--arch classes`): the head sees `[f, α·√softmax(fc(f))]`, the classifier
//! frozen, so what the network learnt from 1.28M labelled images enters the embedding (measured:
//! bench/RESULTS.md §3).
//!
//! The backbone is cut at a *level* K: levels 1–B are the outputs of MBConv blocks 1–B (stem
//! included; B = 16 for Lite0, 21 for Lite1/Lite2), level B + 1 ([`pooled_level`](crate::model::lite::Backbone::pooled_level)) the
//! pooled 1280-d features, level 0 the input. With `--freeze-blocks K`,
//! everything below level K is frozen, so its output can be computed once and cached.

use crate::model::device::linear;
use crate::model::lite::{FEATURE_DIM, Lite, NUM_CLASSES};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu, relu6};
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use serde::{Deserialize, Serialize};

/// Channels of each shallow branch of the multiscale network.
pub const SHALLOW_CHANNELS: usize = 96;

/// The weight α of the class posteriors beside the pooled features in `--arch classes` (measured
/// on the selection split with Lite0 at 224 px, P@30 after 15 epochs: α 4 0.575, 8 0.589, 16 0.599,
/// 32 0.602, 64 0.602; 16 is the smallest on the plateau, and keeps the most weight on the pooled
/// features, which carry over to photos that are not ImageNet classes).
pub const POSTERIOR_WEIGHT: f32 = 16.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// The backbone (`--backbone`, EfficientNet-Lite0 by default) + a linear head (named `lite0`
    /// from when Lite0 was the only backbone; kept so existing runs and commands stay valid).
    Lite0,
    /// The paper's multiscale network: the backbone + two shallow branches on 4:1 and 8:1 copies.
    Multiscale,
    /// The backbone + a linear head on its pooled features and its ImageNet classifier's class
    /// posteriors (α·√softmax, the classifier frozen).
    Classes,
}

/// A shallow branch: down-sample, conv 8×8/4 (96), ReLU, max-pool 3×3/2, global max → 96-d.
#[derive(Module, Debug)]
pub struct Shallow {
    pub conv: Conv2d,
    pub pool: MaxPool2d,
    pub factor: usize,
}

impl Shallow {
    fn new(factor: usize, device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([3, SHALLOW_CHANNELS], [8, 8])
                .with_stride([4, 4])
                .with_padding(PaddingConfig2d::Explicit(2, 2, 2, 2))
                .init(device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            factor,
        }
    }

    /// `small` is the input already down-sampled by `factor`.
    pub fn forward(&self, small: Tensor<4>) -> Tensor<2> {
        let h = self.pool.forward(relu(self.conv.forward(small)));
        let [n, c, _, _] = h.dims();
        h.max_dim(3).max_dim(2).reshape([n, c])
    }
}

/// Down-samples a normalised input by an integer factor (average pooling).
pub fn downsample(x: Tensor<4>, factor: usize) -> Tensor<4> {
    avg_pool2d(x, AvgPoolOptions::new([factor, factor]))
}

fn l2n(x: Tensor<2>) -> Tensor<2> {
    let n = x.clone().square().sum_dim(1).clamp_min(1e-12).sqrt();
    x / n
}

/// What the trainable part consumes: the backbone's output at the cut level, and for the
/// multiscale network the down-sampled inputs.
pub struct LevelInput {
    /// `[n, C, H, W]` (pooled level: `[n, 1280, 1, 1]`).
    pub trunk: Tensor<4>,
    pub small4: Option<Tensor<4>>,
    pub small8: Option<Tensor<4>>,
}

#[derive(Module, Debug)]
pub struct EmbedNet {
    pub backbone: Lite,
    pub head: Linear,
    pub shallow4: Option<Shallow>,
    pub shallow8: Option<Shallow>,
    pub normalize: bool,
    /// The head also sees the classifier's posteriors ([`Arch::Classes`]).
    pub classes: bool,
}

impl EmbedNet {
    /// A head of `dim` outputs on a (pretrained) backbone.
    pub fn new(backbone: Lite, arch: Arch, dim: usize, normalize: bool, device: &Device) -> Self {
        let (shallow4, shallow8, input) = match arch {
            Arch::Lite0 => (None, None, FEATURE_DIM),
            Arch::Classes => (None, None, FEATURE_DIM + NUM_CLASSES),
            Arch::Multiscale => (
                Some(Shallow::new(4, device)),
                Some(Shallow::new(8, device)),
                FEATURE_DIM + 2 * SHALLOW_CHANNELS,
            ),
        };
        Self {
            backbone,
            head: LinearConfig::new(input, dim).init(device),
            shallow4,
            shallow8,
            // The multiscale network is L2-normalised by definition.
            normalize: normalize || arch == Arch::Multiscale,
            classes: arch == Arch::Classes,
        }
    }

    /// The level of the pooled features ([`pooled_level`](crate::model::lite::Backbone::pooled_level) of this network's backbone).
    pub fn pooled_level(&self) -> usize {
        self.backbone.backbone.pooled_level()
    }

    pub fn is_multiscale(&self) -> bool {
        self.shallow4.is_some()
    }

    /// The multiscale network's 4:1 and 8:1 down-sampled inputs (None for the plain network).
    pub fn small_inputs(&self, x: &Tensor<4>) -> (Option<Tensor<4>>, Option<Tensor<4>>) {
        if self.is_multiscale() {
            (
                Some(downsample(x.clone(), 4)),
                Some(downsample(x.clone(), 8)),
            )
        } else {
            (None, None)
        }
    }

    /// [`EmbedNet::small_inputs`] of a host batch `[n][3][size][size]`.
    pub fn small_inputs_host(
        &self,
        batch: &[f32],
        n: usize,
        size: usize,
        device: &Device,
    ) -> (Option<Tensor<4>>, Option<Tensor<4>>) {
        if !self.is_multiscale() {
            return (None, None);
        }
        self.small_inputs(&Tensor::from_data(
            TensorData::new(batch.to_vec(), [n, 3, size, size]),
            device,
        ))
    }

    /// The backbone from the input up to `level` (see the module docs).
    pub fn prefix(&self, x: Tensor<4>, level: usize) -> LevelInput {
        let (small4, small8) = self.small_inputs(&x);
        let b = &self.backbone;
        let trunk = if level == 0 {
            x
        } else {
            let mut h = relu6(b.bn0.forward(b.conv_stem.forward(x)));
            for blk in b.blocks.iter().take(level) {
                h = blk.forward(h);
            }
            if level >= self.pooled_level() {
                let p = pool(relu6(b.bn1.forward(b.conv_head.forward(h))));
                let [n, c] = p.dims();
                p.reshape([n, c, 1, 1])
            } else {
                h
            }
        };
        LevelInput {
            trunk,
            small4,
            small8,
        }
    }

    /// From the backbone's output at `level` to the embedding.
    pub fn suffix(&self, input: LevelInput, level: usize) -> Tensor<2> {
        let b = &self.backbone;
        let pooled = if level >= self.pooled_level() {
            let [n, c, _, _] = input.trunk.dims();
            input.trunk.reshape([n, c])
        } else {
            let mut h = input.trunk;
            if level == 0 {
                h = relu6(b.bn0.forward(b.conv_stem.forward(h)));
            }
            for blk in b.blocks.iter().skip(level) {
                h = blk.forward(h);
            }
            pool(relu6(b.bn1.forward(b.conv_head.forward(h))))
        };
        let features = match (&self.shallow4, &self.shallow8, input.small4, input.small8) {
            (Some(s4), Some(s8), Some(x4), Some(x8)) => Tensor::cat(
                vec![l2n(pooled), l2n(s4.forward(x4)), l2n(s8.forward(x8))],
                1,
            ),
            _ if self.classes => {
                // √softmax as exp(½·log_softmax): finite gradients where a posterior underflows.
                let logits = linear(&self.backbone.fc, pooled.clone());
                let root = (log_softmax(logits, 1) * 0.5).exp() * POSTERIOR_WEIGHT;
                Tensor::cat(vec![pooled, root], 1)
            }
            _ => pooled,
        };
        let e = linear(&self.head, features);
        if self.normalize { l2n(e) } else { e }
    }

    /// Input image batch `[n, 3, s, s]` to embeddings `[n, dim]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.suffix(self.prefix(x, 0), 0)
    }
}

fn pool(f: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = f.dims();
    f.mean_dim(3).mean_dim(2).reshape([n, c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::{device, to_vec};
    use crate::model::lite::Backbone;

    /// A classes network at the pooled level and a batch of pooled features scaled by `scale`.
    fn classes_net(scale: f32) -> (EmbedNet, Vec<f32>, Tensor<4>) {
        let dev = device().autodiff();
        let net = EmbedNet::new(
            Lite::new(Backbone::Lite0, &dev),
            Arch::Classes,
            8,
            false,
            &dev,
        );
        let n = 3;
        let f: Vec<f32> = (0..n * FEATURE_DIM)
            .map(|i| scale * (((i * 7919) % 1000) as f32 / 1000.0))
            .collect();
        let x = Tensor::from_data(TensorData::new(f.clone(), [n, FEATURE_DIM, 1, 1]), &dev);
        (net, f, x)
    }

    /// The head sees `[f, α·√softmax(fc(f))]`: the embeddings equal that input, computed here in
    /// f64 from the network's own weights, through the head.
    #[test]
    fn classes_head_sees_the_pooled_features_and_the_root_posteriors() {
        let (net, f, x) = classes_net(1.0);
        let level = net.pooled_level();
        let got = to_vec(net.suffix(
            LevelInput {
                trunk: x,
                small4: None,
                small8: None,
            },
            level,
        ))
        .unwrap();
        let w = to_vec(net.backbone.fc.weight.val()).unwrap(); // [1280, 1000]
        let b = to_vec(net.backbone.fc.bias.as_ref().unwrap().val()).unwrap();
        let hw = to_vec(net.head.weight.val()).unwrap(); // [2280, 8]
        let hb = to_vec(net.head.bias.as_ref().unwrap().val()).unwrap();
        let input = FEATURE_DIM + NUM_CLASSES;
        for (r, row) in f.chunks_exact(FEATURE_DIM).enumerate() {
            let logits: Vec<f64> = (0..NUM_CLASSES)
                .map(|c| {
                    let dot: f64 = (0..FEATURE_DIM)
                        .map(|k| row[k] as f64 * w[k * NUM_CLASSES + c] as f64)
                        .sum();
                    dot + b[c] as f64
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let mut feat: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            feat.extend(
                logits
                    .iter()
                    .map(|l| POSTERIOR_WEIGHT as f64 * ((l - m).exp() / z).sqrt()),
            );
            for d in 0..8 {
                let want: f64 = hb[d] as f64
                    + (0..input)
                        .map(|k| feat[k] * hw[k * 8 + d] as f64)
                        .sum::<f64>();
                let g = got[r * 8 + d] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "row {r} dim {d}: {g} vs {want}"
                );
            }
        }
    }

    /// Posteriors that underflow to 0 (logits hundreds apart) still give finite gradients; with
    /// ordinary logits the gradient reaches the pooled features through the classifier too (it
    /// differs from the direct path's, the column sums of the head's pooled-feature weights).
    #[test]
    fn classes_gradients_are_finite_and_flow_through_the_classifier() {
        for scale in [2000.0, 1.0] {
            let (net, _, x) = classes_net(scale);
            let x = x.require_grad();
            let level = net.pooled_level();
            let logits =
                to_vec(net.backbone.fc.forward(x.clone().reshape([3, FEATURE_DIM]))).unwrap();
            let row = &logits[..NUM_CLASSES];
            let spread = row.iter().cloned().fold(f32::MIN, f32::max)
                - row.iter().cloned().fold(f32::MAX, f32::min);
            let input = LevelInput {
                trunk: x.clone(),
                small4: None,
                small8: None,
            };
            let g = net.suffix(input, level).sum().backward();
            let d = to_vec(x.grad(&g).unwrap()).unwrap();
            assert!(
                d.iter().all(|v| v.is_finite()),
                "scale {scale}: non-finite gradient"
            );
            if scale > 1.0 {
                assert!(
                    spread > 200.0,
                    "logits spread {spread}: the test needs underflow"
                );
                continue;
            }
            let hw = to_vec(net.head.weight.val()).unwrap();
            let direct: Vec<f32> = (0..FEATURE_DIM)
                .map(|k| hw[k * 8..k * 8 + 8].iter().sum())
                .collect();
            let through = d[..FEATURE_DIM]
                .iter()
                .zip(&direct)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                through > 1e-4,
                "no gradient through the classifier: {through:e}"
            );
        }
    }
}
