//! The network: EfficientNet-Lite0 as the ImageNet weights define it, reading those weights, the
//! embedding network of a trained run (backbone + heads), the identity of a run and its folder
//! format, and the compute device. Uses [`crate::data`] only.

pub mod device;
pub mod identity;
pub mod lite0;
pub mod net;
pub mod run;
pub mod weights;
