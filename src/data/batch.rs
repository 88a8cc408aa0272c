//! Parallel decoding of image files into one normalised CHW batch buffer.

use crate::data::skipped::Skipped;
use crate::data::transform;
use rayon::prelude::*;
use std::path::PathBuf;

/// Decodes images in parallel into one CHW buffer holding only the images that decoded.
pub fn decode_batch(paths: &[PathBuf], size: u32) -> (Vec<f32>, Vec<bool>, Vec<Skipped>) {
    decode_batch_into(paths, size, Vec::new())
}

/// [`decode_batch`] into `buf`'s allocation (a previous batch's buffer, whose contents do not
/// matter): each image decodes straight into its slot, and a stream of batches reusing one
/// buffer neither zeroes nor maps fresh pages for 3·size² floats per image again.
pub fn decode_batch_into(
    paths: &[PathBuf],
    size: u32,
    mut buf: Vec<f32>,
) -> (Vec<f32>, Vec<bool>, Vec<Skipped>) {
    let per = 3 * (size as usize) * (size as usize);
    // Only a grown tail is zeroed; every slot is overwritten by its image or dropped below.
    buf.truncate(per * paths.len());
    buf.resize(per * paths.len(), 0.0);
    let results: Vec<_> = buf
        .par_chunks_mut(per)
        .zip(paths.par_iter())
        .map(|(slot, p)| transform::load_tensor(p, size, slot))
        .collect();
    let mut ok = Vec::with_capacity(paths.len());
    let mut skipped = Vec::new();
    let mut kept = 0;
    for (i, (p, r)) in paths.iter().zip(results).enumerate() {
        match r {
            Ok(()) => {
                // Images after a failed one move up over its slot.
                if kept != i {
                    buf.copy_within(i * per..(i + 1) * per, kept * per);
                }
                kept += 1;
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
    buf.truncate(kept * per);
    (buf, ok, skipped)
}
