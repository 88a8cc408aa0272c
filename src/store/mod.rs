//! Storage of embeddings: `.npy` vector files ([`npy`]), the DB folder ([`db`]: vectors, manifest,
//! model identity) and building one from a dataset ([`build`]). Uses [`crate::infer`] and below.

pub mod build;
pub mod db;
pub mod npy;
