//! The first stage of the data path: datasets and any folder tree of images on disk, the seed's triplet sampler, image decoding
//! and the input transform, batch decoding, training augmentation, and the record of files left out.
//! Uses nothing else of the crate (but [`crate::progress`]).

pub mod augment;
pub mod batch;
pub mod collection;
pub mod dataset;
pub mod sampler;
pub mod skipped;
pub mod transform;
pub mod walk;
