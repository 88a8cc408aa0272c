//! EfficientNet-Lite0 exactly as the ImageNet weights define it: stem conv 3×3/2 → 32, 16 MBConv
//! blocks (no squeeze-excite), head conv 1×1 → 1280, BatchNorm eps 1e-3, ReLU6, classifier `_fc`.
//! Field names mirror the PyTorch state dict (`_conv_stem`, `_blocks.N._expand_conv`, …) minus the
//! leading underscores, so the weights load by name.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu6;

/// (expand ratio, output channels, repeats, first stride, kernel) per stage.
pub const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
];
/// Width of the pooled features.
pub const FEATURE_DIM: usize = 1280;
/// ImageNet classes of the classifier.
pub const NUM_CLASSES: usize = 1000;
/// BatchNorm epsilon of the TensorFlow-trained weights.
pub const BN_EPS: f64 = 1e-3;

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

/// EfficientNet-Lite0 with its ImageNet classifier.
#[derive(Module, Debug)]
pub struct Lite0 {
    pub conv_stem: Conv2d,
    pub bn0: BatchNorm,
    pub blocks: Vec<MbConv>,
    pub conv_head: Conv2d,
    pub bn1: BatchNorm,
    pub fc: Linear,
}

impl Lite0 {
    /// A randomly initialised network (load weights with [`crate::model::weights::load_lite0`]).
    pub fn new(device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 32;
        for (t, c, n, s, k) in STAGES {
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
            conv_stem: conv(3, 32, 3, 2, 1, device),
            bn0: bn(32, device),
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
        self.fc.forward(self.pooled(x))
    }
}
