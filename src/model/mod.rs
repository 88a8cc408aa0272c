//! The network: EfficientNet-Lite0/1/2 as the ImageNet weights define them, reading those weights, the
//! embedding network of a trained run (backbone + heads), the identity of a run and its folder
//! format, and the compute device. Uses [`crate::data`] only.

pub mod device;
pub mod identity;
pub mod lite;
pub mod net;
pub mod run;
pub mod weights;
