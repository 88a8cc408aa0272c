//! Training data: augmentation (random resized crop + horizontal flip, as the seed), reproducible
//! per-sample randomness, batch plans per sampling mode, and the cache of frozen-backbone outputs.

use crate::dataset::Dataset;
use crate::sampler::Triplet;
use crate::train::net::{EmbedNet, LevelInput};
use crate::transform;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use image::RgbImage;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// One image of a batch: dataset item and view (0 = plain; ≥ 1 = an augmented view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub item: usize,
    pub view: usize,
}

/// How triplets or batches are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// Backbone outputs at the cut level for every (item, view), computed once with the frozen part.
pub struct FeatureCache {
    pub views: usize,
    /// `[C, H, W]` of one trunk entry.
    pub shape: [usize; 3],
    pub trunk: Vec<f32>,
    pub small4: Vec<f32>,
    pub small8: Vec<f32>,
    small_sizes: [usize; 2],
    /// Row of each dataset item in the cache (usize::MAX: not cached).
    row: Vec<usize>,
}

impl FeatureCache {
    /// Bytes a cache of `items × views` entries would take.
    pub fn bytes_needed(
        net: &EmbedNet,
        level: usize,
        size: u32,
        items: usize,
        views: usize,
    ) -> usize {
        let dev = crate::embed::device();
        let x = Tensor::<4>::zeros([1, 3, size as usize, size as usize], &dev);
        let out = net.valid().prefix(x, level);
        let mut per = out.trunk.shape().num_elements();
        per += out.small4.map_or(0, |t| t.shape().num_elements());
        per += out.small8.map_or(0, |t| t.shape().num_elements());
        per * 4 * items * views
    }

    /// Computes the cache for `items` of `ds` (view 0 plain, views ≥ 1 augmented with `seed`).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        net: &EmbedNet,
        ds: &Dataset,
        items: &[usize],
        level: usize,
        views: usize,
        size: u32,
        seed: u64,
        batch: usize,
        label: &str,
    ) -> Result<Self> {
        let model = net.valid();
        let dev = crate::embed::device();
        let mut row = vec![usize::MAX; ds.items.len()];
        for (r, &i) in items.iter().enumerate() {
            row[i] = r;
        }
        let mut cache = FeatureCache {
            views,
            shape: [0; 3],
            trunk: Vec::new(),
            small4: Vec::new(),
            small8: Vec::new(),
            small_sizes: [0; 2],
            row,
        };
        // Entry order: item-major, view-minor.
        let slots: Vec<Slot> = items
            .iter()
            .flat_map(|&item| (0..views).map(move |view| Slot { item, view }))
            .collect();
        let pb = crate::embed::progress(slots.len(), label);
        let s = size as usize;
        let engine = crate::embed::cpu_engine(&model.backbone)?;
        let chunks: Vec<&[Slot]> = slots.chunks(batch.max(1)).collect();
        let load = |c: &[Slot]| load_batch(ds, c, size, &[seed, 3], false);
        let mut pending = chunks.first().map(|c| load(c));
        for (ci, chunk) in chunks.iter().enumerate() {
            let buf = pending.take().context("decoded batch")??;
            // Decode batch i+1 while the network runs on batch i.
            let (out, next) = rayon::join(
                || model.prefix_host(engine.as_ref(), buf, chunk.len(), s, level, &dev),
                || chunks.get(ci + 1).map(|c| load(c)),
            );
            pending = next;
            let [_, c, h, w] = out.trunk.dims();
            cache.shape = [c, h, w];
            cache.trunk.extend(
                out.trunk
                    .into_data()
                    .try_to_vec::<f32>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?,
            );
            if let (Some(a), Some(b)) = (out.small4, out.small8) {
                cache.small_sizes = [a.dims()[2], b.dims()[2]];
                cache.small4.extend(
                    a.into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                );
                cache.small8.extend(
                    b.into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                );
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        Ok(cache)
    }

    /// Saves the cache (atomically) for reuse by later runs with the same inputs.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let header = serde_json::json!({
            "views": self.views, "shape": self.shape, "small_sizes": self.small_sizes,
            "row": self.row.iter().map(|&r| if r == usize::MAX { -1i64 } else { r as i64 }).collect::<Vec<_>>(),
            "lens": [self.trunk.len(), self.small4.len(), self.small8.len()],
        })
        .to_string();
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        for v in [&self.trunk, &self.small4, &self.small8] {
            for x in v.iter() {
                f.write_all(&x.to_le_bytes())?;
            }
        }
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Loads a cache written by [`FeatureCache::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)?;
        let bad = || anyhow::anyhow!("{} is not a feature cache", path.display());
        if bytes.len() < 8 {
            return Err(bad());
        }
        let hl = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad())?) as usize;
        let h: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + hl).ok_or_else(bad)?)?;
        let get = |k: &str| h.get(k).cloned().ok_or_else(bad);
        let views: usize = serde_json::from_value(get("views")?)?;
        let shape: [usize; 3] = serde_json::from_value(get("shape")?)?;
        let small_sizes: [usize; 2] = serde_json::from_value(get("small_sizes")?)?;
        let row: Vec<i64> = serde_json::from_value(get("row")?)?;
        let lens: [usize; 3] = serde_json::from_value(get("lens")?)?;
        let floats = &bytes[8 + hl..];
        if floats.len() != 4 * lens.iter().sum::<usize>() {
            return Err(bad());
        }
        let mut all = floats
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let mut take = |n: usize| all.by_ref().take(n).collect::<Vec<f32>>();
        let trunk = take(lens[0]);
        let small4 = take(lens[1]);
        let small8 = take(lens[2]);
        Ok(Self {
            views,
            shape,
            trunk,
            small4,
            small8,
            small_sizes,
            row: row
                .into_iter()
                .map(|r| if r < 0 { usize::MAX } else { r as usize })
                .collect(),
        })
    }

    fn entry(&self, s: &Slot) -> usize {
        self.row[s.item] * self.views + s.view.min(self.views - 1)
    }

    /// The level input for `slots`, on `device`.
    pub fn gather(&self, slots: &[Slot], device: &Device) -> LevelInput {
        let [c, h, w] = self.shape;
        let per = c * h * w;
        let mut trunk = Vec::with_capacity(per * slots.len());
        for s in slots {
            let e = self.entry(s);
            trunk.extend_from_slice(&self.trunk[e * per..(e + 1) * per]);
        }
        let n = slots.len();
        let trunk = Tensor::from_data(TensorData::new(trunk, [n, c, h, w]), device);
        let small = |data: &[f32], side: usize| {
            let per = 3 * side * side;
            let mut v = Vec::with_capacity(per * n);
            for s in slots {
                let e = self.entry(s);
                v.extend_from_slice(&data[e * per..(e + 1) * per]);
            }
            Tensor::from_data(TensorData::new(v, [n, 3, side, side]), device)
        };
        let (small4, small8) = if self.small4.is_empty() {
            (None, None)
        } else {
            (
                Some(small(&self.small4, self.small_sizes[0])),
                Some(small(&self.small8, self.small_sizes[1])),
            )
        };
        LevelInput {
            trunk,
            small4,
            small8,
        }
    }
}
