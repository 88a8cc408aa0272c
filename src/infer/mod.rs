//! Inference: the [`embedder::Embedder`] over deeprank's CPU engine or, on a GPU, burn's network
//! with BatchNorm folded ([`fused`]); a trained run's network fed from host batches ([`trained`]);
//! streaming many files through it ([`stream`]). Uses [`crate::cpu`], [`crate::model`],
//! [`crate::data`].

pub mod embedder;
pub mod fused;
pub mod stream;
pub mod trained;
