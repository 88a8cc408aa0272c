//! Storage of embeddings: `.npy` vector files ([`npy`]), the DB folder ([`db`]: vectors, manifest,
//! model identity; [`manifest`] its rows, [`state`] its commit record), building one from a dataset
//! ([`build`]), changing one safely ([`commit`]: the writer, repair, compaction; [`changes`]:
//! add, remove, sync), checking one ([`check`]), the crash points its tests use ([`crash`]), and
//! a collection in PostgreSQL + pgvector, sharded or not ([`pg`]).
//! Uses [`crate::infer`] and below.

pub mod build;
pub mod changes;
pub mod check;
pub mod commit;
pub mod crash;
pub mod db;
pub mod manifest;
pub mod npy;
pub mod pg;
pub mod plan;
pub mod state;
pub mod uploads;
