//! Training augmentation (random resized crop + horizontal flip, as the seed) and reproducible
//! per-sample randomness.

use image::RgbImage;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mixes numbers into one seed (splitmix64 steps), so every sample's randomness depends only on
/// (seed, epoch, step, slot) and a resumed run draws exactly what the interrupted one would have.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

pub fn rng(parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(parts))
}

/// Random resized crop (side 50–100% of the image, square aspect kept, random position) and a
/// horizontal flip with probability ½, as the reference's `load_img(train=True)`.
pub fn augment(img: &RgbImage, r: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let s: f64 = r.random_range(0.5..=1.0);
    let (cw, ch) = (
        ((w as f64 * s) as u32).max(1),
        ((h as f64 * s) as u32).max(1),
    );
    let x0 = r.random_range(0..=w - cw);
    let y0 = r.random_range(0..=h - ch);
    let mut out = image::imageops::crop_imm(img, x0, y0, cw, ch).to_image();
    if r.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}
