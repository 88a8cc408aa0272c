//! deeprank: image similarity search with a triplet deep-ranking network.
//!
//! The data path, one module per stage: [`dataset`] → [`sampler`] → [`transform`] → [`model`]
//! ([`weights`]) → [`embed`] ([`engine`] on the CPU, [`fused`] elsewhere) → [`db`] / [`index`] →
//! [`query`] / [`eval`] ([`grid`]) → [`demo`]; [`train`] fine-tunes the network, [`serve`] answers
//! over HTTP.

pub mod benchkit;
pub mod dataset;
pub mod db;
pub mod demo;
pub mod embed;
pub mod engine;
pub mod eval;
pub mod fused;
pub mod grid;
pub mod index;
pub mod model;
pub mod query;
pub mod sampler;
pub mod serve;
pub mod train;
pub mod transform;
pub mod weights;
