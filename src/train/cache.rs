//! The feature cache: the frozen part's outputs at the cut level for every (item, view), computed
//! once per run (or reused from an earlier run with the same inputs) so steps start at the cut.

use crate::cpu::engine::cpu_engine;
use crate::data::dataset::Dataset;
use crate::infer::trained::prefix_host;
use crate::model::device::{device, to_vec};
use crate::model::net::{EmbedNet, LevelInput};
use crate::model::weights;
use crate::progress::progress;
use crate::train::config::TrainConfig;
use crate::train::memory::{check_cache, gib};
use crate::train::plan::{Slot, load_batch};
use crate::train::validate::Validation;
use anyhow::{Context, Result};
use burn::prelude::*;
use std::path::Path;
use std::time::Instant;

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
        let dev = device();
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
        let dev = device();
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
        let pb = progress(slots.len(), label);
        let s = size as usize;
        let engine = cpu_engine(&model.backbone)?;
        let chunks: Vec<&[Slot]> = slots.chunks(batch.max(1)).collect();
        let load = |c: &[Slot]| load_batch(ds, c, size, &[seed, 3], false);
        let mut pending = chunks.first().map(|c| load(c));
        for (ci, chunk) in chunks.iter().enumerate() {
            let buf = pending.take().context("decoded batch")??;
            // Decode batch i+1 while the network runs on batch i.
            let (out, next) = rayon::join(
                || prefix_host(&model, engine.as_ref(), buf, chunk.len(), s, level, &dev),
                || chunks.get(ci + 1).map(|c| load(c)),
            );
            pending = next;
            let [_, c, h, w] = out.trunk.dims();
            cache.shape = [c, h, w];
            cache.trunk.extend(to_vec(out.trunk)?);
            if let (Some(a), Some(b)) = (out.small4, out.small8) {
                cache.small_sizes = [a.dims()[2], b.dims()[2]];
                cache.small4.extend(to_vec(a)?);
                cache.small8.extend(to_vec(b)?);
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

/// Identifies a feature cache: same images, weights, cut level, size, views and seed.
fn cache_key(
    cfg: &TrainConfig,
    ds: &Dataset,
    items: &[usize],
    val: Option<&Validation>,
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let wpath = weights::resolve(cfg.weights.as_deref())?;
    h.update(weights::sha256_file(&wpath)?.as_bytes());
    h.update(
        format!(
            "{}|{}|{}|{}|{:?}|",
            cfg.level(),
            cfg.size,
            cfg.views,
            cfg.seed,
            cfg.arch
        )
        .as_bytes(),
    );
    for &i in items {
        let p = &ds.items[i].path;
        let m = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        h.update(format!("{}:{m}\n", p.canonicalize().unwrap_or(p.clone()).display()).as_bytes());
    }
    if let Some(v) = val {
        for &i in &v.items {
            h.update(format!("v{}\n", v.ds.items[i].path.display()).as_bytes());
        }
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The feature caches of a run with `--cache` (None without): the training items', and with
/// validation the val items' (stored in `val.cache`). Reused from an earlier run with the same
/// inputs, else computed, after checking that they fit in `avail` bytes.
pub fn prepare(
    cfg: &TrainConfig,
    model: &EmbedNet,
    ds: &Dataset,
    items: &[usize],
    mut val: Option<&mut Validation>,
    avail: usize,
) -> Result<Option<FeatureCache>> {
    if !cfg.cache {
        return Ok(None);
    }
    let level = cfg.level();
    let n_val = val.as_ref().map_or(0, |v| v.items.len());
    let need = FeatureCache::bytes_needed(model, level, cfg.size, items.len(), cfg.views)
        + FeatureCache::bytes_needed(model, level, cfg.size, n_val, 1);
    check_cache(need, avail)?;
    let t0 = Instant::now();
    let key = cache_key(cfg, ds, items, val.as_deref())?;
    let file = weights::home()
        .join("cache")
        .join(format!("features-{key}.bin"));
    let vfile = weights::home()
        .join("cache")
        .join(format!("features-{key}-val.bin"));
    let loaded = FeatureCache::load(&file)
        .ok()
        .and_then(|c| match val.as_deref_mut() {
            Some(v) => FeatureCache::load(&vfile).ok().map(|vc| {
                v.cache = Some(vc);
                c
            }),
            None => Some(c),
        });
    let c = match loaded {
        Some(c) => {
            eprintln!("reusing cached features from {}", file.display());
            c
        }
        None => {
            let c = build_all(cfg, model, ds, items, val.as_deref_mut())?;
            // Keep caches up to 2 GiB for later runs with the same data and cut (tuning runs).
            if need <= 2 << 30 {
                c.save(&file)?;
                if let Some(vc) = val.as_ref().and_then(|v| v.cache.as_ref()) {
                    vc.save(&vfile)?;
                }
            }
            c
        }
    };
    eprintln!(
        "level-{level} features of {} images x {} views ready in {:.0}s ({:.2} GiB)",
        items.len(),
        cfg.views,
        t0.elapsed().as_secs_f64(),
        gib(need)
    );
    Ok(Some(c))
}

/// Computes the training items' cache, and the val items' into `val.cache`.
fn build_all(
    cfg: &TrainConfig,
    model: &EmbedNet,
    ds: &Dataset,
    items: &[usize],
    val: Option<&mut Validation>,
) -> Result<FeatureCache> {
    let level = cfg.level();
    let c = FeatureCache::build(
        model,
        ds,
        items,
        level,
        cfg.views,
        cfg.size,
        cfg.seed,
        64,
        "cache train",
    )?;
    if let Some(v) = val {
        v.cache = Some(FeatureCache::build(
            model,
            &v.ds,
            &v.items,
            level,
            1,
            cfg.size,
            cfg.seed,
            64,
            "cache val",
        )?);
    }
    Ok(c)
}
