//! deeprank: image similarity search with a triplet deep-ranking network.
//!
//! Each folder is a stage of the data path, and a module uses only its own stage and those listed
//! before it (checked by `tests/architecture.rs`; see `docs/ARCHITECTURE.md`):
//! [`progress`] → [`data`] (datasets, decoding, augmentation) → [`model`] (EfficientNet-Lite, weights, the
//! embedding network, a run's identity and folder, the device) → [`cpu`] (deeprank's own kernels:
//! the inference engine and the training pass) → [`infer`] (the embedder) → [`store`] (npy, DB
//! folders) → [`render`] (grids, plots) → [`search`] (index, query, metrics) → [`train`]
//! (fine-tuning) → [`serve`] → [`benchkit`]. The `deeprank` binary (`src/main.rs`,
//! `src/cli/`, which also holds the demo) and `deeprank-bench` (`src/bin/`) sit on top.

pub mod benchkit;
pub mod cpu;
pub mod data;
pub mod infer;
pub mod model;
pub mod progress;
pub mod render;
pub mod search;
pub mod serve;
pub mod store;
pub mod train;
