//! EfficientNet-Lite0/1/2 exactly as the ImageNet weights define them: stem conv 3×3/2 → 32, MBConv
//! blocks (no squeeze-excite), head conv 1×1 → 1280, BatchNorm eps 1e-3, ReLU6, classifier `_fc`.
//! Lite1 and Lite2 are Lite0 scaled as the EfficientNet-Lite builder scales it ([`Backbone::stages`]):
//! channels × the width multiplier rounded to multiples of 8, repeats × the depth multiplier rounded
//! up, the stem, the head and the first and last stages' repeats fixed. Field names mirror the
//! PyTorch state dict (`_conv_stem`, `_blocks.N._expand_conv`, …) minus the leading underscores, so
//! the weights load by name.

use anyhow::{Result, bail};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu6;
use serde::{Deserialize, Serialize};

/// One stage: (expand ratio, output channels, repeats, first stride, kernel).
pub type Stage = (usize, usize, usize, usize, usize);

/// EfficientNet-Lite0's stages, the base the other backbones scale.
pub const STAGES: [Stage; 7] = [
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
];
/// Channels of the stem (fixed for every Lite backbone).
pub const STEM: usize = 32;
/// Width of the pooled features (the head, fixed for every Lite backbone).
pub const FEATURE_DIM: usize = 1280;
/// ImageNet classes of the classifier.
pub const NUM_CLASSES: usize = 1000;
/// BatchNorm epsilon of the TensorFlow-trained weights.
pub const BN_EPS: f64 = 1e-3;

/// Which EfficientNet-Lite network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backbone {
    #[default]
    Lite0,
    Lite1,
    Lite2,
}

impl Backbone {
    pub const ALL: [Backbone; 3] = [Backbone::Lite0, Backbone::Lite1, Backbone::Lite2];

    /// `lite0`, `lite1`, `lite2` (the `--backbone` value).
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Lite0 => "lite0",
            Backbone::Lite1 => "lite1",
            Backbone::Lite2 => "lite2",
        }
    }

    /// `EfficientNet-Lite0` etc.
    pub fn title(self) -> &'static str {
        match self {
            Backbone::Lite0 => "EfficientNet-Lite0",
            Backbone::Lite1 => "EfficientNet-Lite1",
            Backbone::Lite2 => "EfficientNet-Lite2",
        }
    }

    pub fn parse(s: &str) -> Result<Backbone> {
        match Backbone::ALL.into_iter().find(|b| b.name() == s) {
            Some(b) => Ok(b),
            None => bail!("unknown backbone {s:?}: use lite0, lite1 or lite2"),
        }
    }

    /// (width, depth) multipliers of the EfficientNet-Lite family.
    pub fn multipliers(self) -> (f64, f64) {
        match self {
            Backbone::Lite0 => (1.0, 1.0),
            Backbone::Lite1 => (1.0, 1.1),
            Backbone::Lite2 => (1.1, 1.2),
        }
    }

    /// The input side the ImageNet weights were trained at.
    pub fn native_size(self) -> u32 {
        match self {
            Backbone::Lite0 => 224,
            Backbone::Lite1 => 240,
            Backbone::Lite2 => 260,
        }
    }

    /// The side a training run uses by default: the native side rounded to a multiple of 32 (a
    /// trained network's input side must be one): 224, 256, 256.
    pub fn train_size(self) -> u32 {
        (self.native_size() + 16) / 32 * 32
    }

    /// The scaled stages (EfficientNet's `round_filters`/`round_repeats`, with the Lite builder's
    /// fixed stem, head and first/last stage repeats).
    pub fn stages(self) -> Vec<Stage> {
        let (w, d) = self.multipliers();
        let last = STAGES.len() - 1;
        STAGES
            .iter()
            .enumerate()
            .map(|(i, &(t, c, n, s, k))| {
                let n = if i == 0 || i == last {
                    n
                } else {
                    (n as f64 * d).ceil() as usize
                };
                (t, round_filters(c, w), n, s, k)
            })
            .collect()
    }

    /// Number of MBConv blocks (16, 21, 21).
    pub fn blocks(self) -> usize {
        self.stages().iter().map(|s| s.2).sum()
    }

    /// The level of the pooled features: every block, then the head (17 for Lite0, 22 for
    /// Lite1/Lite2; see [`crate::model::net`]).
    pub fn pooled_level(self) -> usize {
        self.blocks() + 1
    }
}

/// EfficientNet's channel rounding: `c·w` to the nearest multiple of 8, never below 90% of it.
fn round_filters(c: usize, w: f64) -> usize {
    let f = c as f64 * w;
    let mut r = ((f + 4.0) as usize / 8 * 8).max(8);
    if (r as f64) < 0.9 * f {
        r += 8;
    }
    r
}

fn bn(c: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(c)
        .with_epsilon(BN_EPS)
        .with_momentum(0.01)
        .init(device)
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_groups(groups)
        .with_bias(false)
        .init(device)
}

/// Mobile inverted bottleneck: expand 1×1 → depthwise k×k → project 1×1 (+ residual).
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand_conv: Option<Conv2d>,
    pub bn0: Option<BatchNorm>,
    pub depthwise_conv: Conv2d,
    pub bn1: BatchNorm,
    pub project_conv: Conv2d,
    pub bn2: BatchNorm,
    #[module(skip)]
    pub residual: bool,
}

impl MbConv {
    pub fn new(
        cin: usize,
        cout: usize,
        expand: usize,
        k: usize,
        stride: usize,
        device: &Device,
    ) -> Self {
        let mid = cin * expand;
        let (expand_conv, bn0) = if expand != 1 {
            (Some(conv(cin, mid, 1, 1, 1, device)), Some(bn(mid, device)))
        } else {
            (None, None)
        };
        Self {
            expand_conv,
            bn0,
            depthwise_conv: conv(mid, mid, k, stride, mid, device),
            bn1: bn(mid, device),
            project_conv: conv(mid, cout, 1, 1, 1, device),
            bn2: bn(cout, device),
            residual: stride == 1 && cin == cout,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = x.clone();
        if let (Some(c), Some(b)) = (&self.expand_conv, &self.bn0) {
            h = relu6(b.forward(c.forward(h)));
        }
        h = relu6(self.bn1.forward(self.depthwise_conv.forward(h)));
        h = self.bn2.forward(self.project_conv.forward(h));
        if self.residual { h + x } else { h }
    }
}

/// An EfficientNet-Lite network with its ImageNet classifier.
#[derive(Module, Debug)]
pub struct Lite {
    #[module(skip)]
    pub backbone: Backbone,
    pub conv_stem: Conv2d,
    pub bn0: BatchNorm,
    pub blocks: Vec<MbConv>,
    pub conv_head: Conv2d,
    pub bn1: BatchNorm,
    pub fc: Linear,
}

impl Lite {
    /// A randomly initialised network (load weights with [`crate::model::weights::load`]).
    pub fn new(backbone: Backbone, device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (t, c, n, s, k) in backbone.stages() {
            for i in 0..n {
                blocks.push(MbConv::new(
                    cin,
                    c,
                    t,
                    k,
                    if i == 0 { s } else { 1 },
                    device,
                ));
                cin = c;
            }
        }
        Self {
            backbone,
            conv_stem: conv(3, STEM, 3, 2, 1, device),
            bn0: bn(STEM, device),
            blocks,
            conv_head: conv(cin, FEATURE_DIM, 1, 1, 1, device),
            bn1: bn(FEATURE_DIM, device),
            fc: LinearConfig::new(FEATURE_DIM, NUM_CLASSES).init(device),
        }
    }

    /// The feature map before pooling: `[n, 1280, h/32, w/32]`.
    pub fn feature_map(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = relu6(self.bn0.forward(self.conv_stem.forward(x)));
        for b in &self.blocks {
            h = b.forward(h);
        }
        relu6(self.bn1.forward(self.conv_head.forward(h)))
    }

    /// Globally average-pooled features: `[n, 1280]`.
    pub fn pooled(&self, x: Tensor<4>) -> Tensor<2> {
        let f = self.feature_map(x);
        let [n, c, _, _] = f.dims();
        f.mean_dim(3).mean_dim(2).reshape([n, c])
    }

    /// ImageNet logits: `[n, 1000]`.
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        crate::model::device::linear(&self.fc, self.pooled(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scaled configs are the published ones (and the checkpoints' shapes: tests/backbones.rs).
    #[test]
    fn scaled_stages() {
        assert_eq!(Backbone::Lite0.stages(), STAGES.to_vec());
        let reps = |b: Backbone| b.stages().iter().map(|s| s.2).collect::<Vec<_>>();
        let chans = |b: Backbone| b.stages().iter().map(|s| s.1).collect::<Vec<_>>();
        assert_eq!(reps(Backbone::Lite1), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(reps(Backbone::Lite2), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(chans(Backbone::Lite1), [16, 24, 40, 80, 112, 192, 320]);
        assert_eq!(chans(Backbone::Lite2), [16, 24, 48, 88, 120, 208, 352]);
        assert_eq!(
            Backbone::ALL.map(Backbone::pooled_level),
            [17, 22, 22],
            "Lite0 keeps level 17 for its pooled features (existing runs' freeze_blocks)"
        );
        for b in Backbone::ALL {
            assert_eq!(Backbone::parse(b.name()).unwrap(), b);
        }
        assert!(Backbone::parse("lite3").is_err());
    }
}
