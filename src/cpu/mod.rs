//! Every hand-written CPU kernel: BatchNorm folding, the `gemm` wrappers, one AVX-512/AVX2/baseline
//! dispatch, the packed 1×1-convolution kernel of inference ([`pointwise`]), the squared-L2 kernels
//! ([`l2`]), exact search's fused products-and-bound kernel ([`products`]), depthwise convolution
//! forward and backward, BatchNorm/ReLU6 row passes, the inference [`engine`] and the trainable
//! backbone's forward and backward [`pass`]. Uses [`crate::model`] (reads the backbone's weights)
//! and nothing above it.

pub mod aligned;
pub mod conv_bn;
pub mod depthwise;
pub mod depthwise_back;
pub mod engine;
pub mod fold;
pub mod gemm;
pub mod l2;
pub mod norm;
pub mod pass;
pub mod pointwise;
pub mod pool;
pub mod products;
pub mod simd;
pub mod team;
