//! What inference needs to know about a trained run: its network's shape and input size. Read from
//! the run's `config.json` (which holds the whole training config; the other fields are ignored
//! here), so loading a run never needs the training code.

use crate::model::lite::Backbone;
use crate::model::net::Arch;
use serde::{Deserialize, Serialize};

/// The identity of a trained run's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The EfficientNet-Lite network under the head (runs from before there was a choice: Lite0).
    #[serde(default)]
    pub backbone: Backbone,
    pub arch: Arch,
    /// Embedding dimension.
    pub dim: usize,
    /// Whether the embeddings are L2-normalised (the multiscale network always is).
    pub normalize: bool,
    /// Training input side in pixels (the default for embedding with the run).
    pub size: u32,
}
