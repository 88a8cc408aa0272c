pub mod ann;
pub mod ann_simd;
pub mod exact;
pub mod npy;
