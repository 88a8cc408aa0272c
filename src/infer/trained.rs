//! A trained run's embedding network ([`EmbedNet`]) fed from host batches in inference mode, its
//! backbone through deeprank's CPU engine when there is one.

use crate::cpu::engine::{Engine, Output};
use crate::model::net::{EmbedNet, LevelInput};
use burn::prelude::*;

/// [`EmbedNet::prefix`] of `net` for a host batch `[n][3][size][size]`, through deeprank's CPU engine
/// when one is given (an engine built from `net`'s backbone, for inference only).
pub fn prefix_host(
    net: &EmbedNet,
    engine: Option<&Engine>,
    batch: &[f32],
    n: usize,
    size: usize,
    level: usize,
    device: &Device,
) -> LevelInput {
    let Some(engine) = engine.filter(|_| level >= 1) else {
        let x = Tensor::from_data(TensorData::new(batch.to_vec(), [n, 3, size, size]), device);
        return net.prefix(x, level);
    };
    let output = if level >= net.pooled_level() {
        Output::Pooled
    } else {
        Output::Blocks(level)
    };
    let [c, h, w] = engine.output_shape(size, output);
    let trunk = engine.run(batch, n, size, output);
    let trunk = Tensor::from_data(TensorData::new(trunk, [n, c, h, w]), device);
    let (small4, small8) = net.small_inputs_host(batch, n, size, device);
    LevelInput {
        trunk,
        small4,
        small8,
    }
}

/// `net`'s embeddings of a host batch in inference mode, the backbone through `engine` when given.
pub fn embed_host(
    net: &EmbedNet,
    engine: Option<&Engine>,
    batch: &[f32],
    n: usize,
    size: usize,
    device: &Device,
) -> Tensor<2> {
    let level = if engine.is_some() {
        net.pooled_level()
    } else {
        0
    };
    net.suffix(
        prefix_host(net, engine, batch, n, size, level, device),
        level,
    )
}
