//! What each training step trains on: the sampling modes, the readable items by class, the plan of
//! a step (a pure function of the seed and position, so a resumed run draws what the interrupted
//! one would have), and loading a plan's images (augmented) into a batch.

use crate::data::augment::{augment, rng};
use crate::data::dataset::Dataset;
use crate::data::sampler::Triplet;
use crate::data::transform;
use crate::progress::progress;
use anyhow::{Result, bail};
use image::RgbImage;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One image of a batch: dataset item and view (0 = plain; ≥ 1 = an augmented view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub item: usize,
    pub view: usize,
}

/// How triplets or batches are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// Triplets read from a file written by `deeprank sample` (the seed).
    File,
    /// The seed's rule, drawn fresh each step: q any class, p same class, n another class.
    Random,
    /// P classes × K images per batch, each anchor's hardest positive and negative.
    BatchHard,
    /// P classes × K images per batch, every positive pair with its semi-hard negative.
    SemiHard,
}

impl Sampling {
    pub fn mines(self) -> bool {
        matches!(self, Sampling::BatchHard | Sampling::SemiHard)
    }
}

/// Items grouped by class, classes with at least two images only.
pub struct ClassIndex {
    pub by_class: Vec<Vec<usize>>,
}

impl ClassIndex {
    pub fn new(ds: &Dataset, usable: &[bool]) -> Result<Self> {
        let mut by_class = vec![Vec::new(); ds.classes.len()];
        for (i, it) in ds.items.iter().enumerate() {
            if usable[i] {
                by_class[it.class].push(i);
            }
        }
        by_class.retain(|c| c.len() >= 2);
        if by_class.len() < 2 {
            bail!("training needs at least two classes with two or more readable images each");
        }
        Ok(Self { by_class })
    }

    pub fn images(&self) -> usize {
        self.by_class.iter().map(Vec::len).sum()
    }
}

/// What one step trains on.
pub enum StepPlan {
    /// `3n` slots: queries, then positives, then negatives.
    Triplets(Vec<Slot>),
    /// P×K slots with their class labels, for in-batch mining.
    Mining(Vec<Slot>, Vec<usize>),
}

fn view(r: &mut ChaCha8Rng, views: usize) -> usize {
    if views <= 1 {
        0
    } else {
        r.random_range(0..views)
    }
}

/// The plan of step `step` of `epoch`: a pure function of the seed and position.
// About 100 lines: one match over the sampling modes, kept in one place so each mode's order of
// random draws (which resumed runs must repeat exactly) reads top to bottom.
#[allow(clippy::too_many_arguments)]
pub fn plan_step(
    sampling: Sampling,
    idx: &ClassIndex,
    file: &[Triplet],
    seed: u64,
    epoch: usize,
    step: usize,
    batch: usize,
    per_class: usize,
    views: usize,
) -> StepPlan {
    let mut r = rng(&[seed, 1, epoch as u64, step as u64]);
    match sampling {
        Sampling::File => {
            // A per-epoch permutation of the file, sliced by step.
            let mut order: Vec<usize> = (0..file.len()).collect();
            let mut pr = rng(&[seed, 2, epoch as u64]);
            for i in (1..order.len()).rev() {
                order.swap(i, pr.random_range(0..=i));
            }
            let mut slots = [Vec::new(), Vec::new(), Vec::new()];
            for k in 0..batch {
                let t = file[order[(step * batch + k) % file.len()]];
                slots[0].push(Slot {
                    item: t.query,
                    view: view(&mut r, views),
                });
                slots[1].push(Slot {
                    item: t.positive,
                    view: view(&mut r, views),
                });
                slots[2].push(Slot {
                    item: t.negative,
                    view: view(&mut r, views),
                });
            }
            StepPlan::Triplets(slots.concat())
        }
        Sampling::Random => {
            let nc = idx.by_class.len();
            let mut slots = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..batch {
                let c = r.random_range(0..nc);
                let mut o = r.random_range(0..nc - 1);
                if o >= c {
                    o += 1;
                }
                let members = &idx.by_class[c];
                let qi = r.random_range(0..members.len());
                let mut pi = r.random_range(0..members.len() - 1);
                if pi >= qi {
                    pi += 1;
                }
                let neg = &idx.by_class[o];
                slots[0].push(Slot {
                    item: members[qi],
                    view: view(&mut r, views),
                });
                slots[1].push(Slot {
                    item: members[pi],
                    view: view(&mut r, views),
                });
                slots[2].push(Slot {
                    item: neg[r.random_range(0..neg.len())],
                    view: view(&mut r, views),
                });
            }
            StepPlan::Triplets(slots.concat())
        }
        Sampling::BatchHard | Sampling::SemiHard => {
            let nc = idx.by_class.len();
            let p = (batch / per_class).clamp(2, nc);
            // P distinct classes (partial Fisher–Yates), K images each.
            let mut classes: Vec<usize> = (0..nc).collect();
            for i in 0..p {
                let j = r.random_range(i..nc);
                classes.swap(i, j);
            }
            let mut slots = Vec::with_capacity(p * per_class);
            let mut labels = Vec::with_capacity(p * per_class);
            for (ci, &c) in classes[..p].iter().enumerate() {
                let mut members = idx.by_class[c].clone();
                for k in 0..per_class {
                    let item = if k < members.len() {
                        let j = r.random_range(k..members.len());
                        members.swap(k, j);
                        members[k]
                    } else {
                        members[r.random_range(0..members.len())]
                    };
                    slots.push(Slot {
                        item,
                        view: view(&mut r, views),
                    });
                    labels.push(ci);
                }
            }
            StepPlan::Mining(slots, labels)
        }
    }
}

/// Decodes, augments (views ≥ 1, or every image when `augment_all`) and normalises the images of
/// `slots` into one CHW batch buffer.
pub fn load_batch(
    ds: &Dataset,
    slots: &[Slot],
    size: u32,
    rng_parts: &[u64],
    augment_all: bool,
) -> Result<Vec<f32>> {
    let per = 3 * (size as usize) * (size as usize);
    let rows: Vec<Result<Vec<f32>>> = slots
        .par_iter()
        .enumerate()
        .map(|(k, s)| {
            let path = &ds.items[s.item].path;
            // Images are checked before training; one that turns unreadable later is reported and
            // trained on as a blank image rather than stopping the run.
            let img = match transform::load_rgb(path) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!(
                        "warning: {} became unreadable ({e}); using a blank image",
                        path.display()
                    );
                    RgbImage::from_pixel(size, size, image::Rgb([127, 127, 127]))
                }
            };
            let img = if s.view > 0 || augment_all {
                let mut parts = rng_parts.to_vec();
                parts.extend([s.item as u64, s.view as u64, k as u64]);
                augment(&img, &mut rng(&parts))
            } else {
                img
            };
            let img = transform::resize_rgb(&img, size)?;
            let mut v = vec![0f32; per];
            transform::normalise_chw(&img, &mut v)?;
            Ok(v)
        })
        .collect();
    let mut buf = Vec::with_capacity(per * slots.len());
    for r in rows {
        buf.extend(r?);
    }
    Ok(buf)
}

/// Images (paths) that decode, checked in parallel before training.
pub fn readable(ds: &Dataset) -> (Vec<bool>, Vec<String>) {
    let pb = progress(ds.items.len(), "check images");
    let ok: Vec<std::result::Result<(), String>> = ds
        .items
        .par_iter()
        .map(|it| {
            let r = transform::load_rgb(&it.path)
                .map(|_| ())
                .map_err(|e| format!("{}: {e}", it.path.display()));
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    let mut skipped = Vec::new();
    let flags = ok
        .into_iter()
        .map(|r| match r {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipped {e}");
                skipped.push(e);
                false
            }
        })
        .collect();
    (flags, skipped)
}
