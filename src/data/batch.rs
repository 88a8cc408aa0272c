//! Parallel decoding of image files into one normalised CHW batch buffer.

use crate::data::skipped::Skipped;
use crate::data::transform::{self, ImageError};
use rayon::prelude::*;
use std::path::PathBuf;

/// Decodes images in parallel into one CHW buffer holding only the images that decoded.
pub fn decode_batch(paths: &[PathBuf], size: u32) -> (Vec<f32>, Vec<bool>, Vec<Skipped>) {
    let per = 3 * (size as usize) * (size as usize);
    let results: Vec<Result<Vec<f32>, ImageError>> = paths
        .par_iter()
        .map(|p| {
            let mut v = vec![0f32; per];
            transform::load_tensor(p, size, &mut v).map(|_| v)
        })
        .collect();
    let mut buf = Vec::with_capacity(per * paths.len());
    let mut ok = Vec::with_capacity(paths.len());
    let mut skipped = Vec::new();
    for (p, r) in paths.iter().zip(results) {
        match r {
            Ok(v) => {
                buf.extend_from_slice(&v);
                ok.push(true);
            }
            Err(e) => {
                skipped.push(Skipped {
                    path: p.clone(),
                    reason: e.to_string(),
                });
                ok.push(false);
            }
        }
    }
    (buf, ok, skipped)
}
