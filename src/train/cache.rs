//! The feature cache: the frozen part's outputs at the cut level for every (item, view), computed
//! once per run (or reused from an earlier run with the same inputs) so steps start at the cut.

use crate::cpu::engine::cpu_engine;
use crate::data::dataset::Dataset;
use crate::infer::trained::prefix_host;
use crate::model::device::{device, to_vec};
use crate::model::net::{Arch, EmbedNet, LevelInput};
use crate::model::weights;
use crate::progress::progress;
use crate::train::config::TrainConfig;
use crate::train::memory::{check_cache, gib};
use crate::train::plan::{Slot, load_batch};
use crate::train::validate::Validation;
use anyhow::{Context, Result, bail};
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
                || prefix_host(&model, engine.as_ref(), &buf, chunk.len(), s, level, &dev),
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

    /// Saves the cache (atomically) for reuse by later runs with the same inputs: header length,
    /// JSON header, the values (f32 LE), and a [`Checksum`] of header and values.
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
        let mut sum = Checksum::of_header(header.as_bytes());
        for v in [&self.trunk, &self.small4, &self.small8] {
            for x in v.iter() {
                sum.add(x.to_bits());
                f.write_all(&x.to_le_bytes())?;
            }
        }
        f.write_all(&sum.0.to_le_bytes())?;
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Loads a cache written by [`FeatureCache::save`]; a file that is not one, or whose checksum
    /// does not match (truncated, altered), is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = || anyhow::anyhow!("{} is not a feature cache (or is damaged)", path.display());
        if bytes.len() < 16 {
            return Err(bad());
        }
        let (bytes, stored) = bytes.split_at(bytes.len() - 8);
        let stored = u64::from_le_bytes(stored.try_into().map_err(|_| bad())?);
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
        let mut sum = Checksum::of_header(&bytes[8..8 + hl]);
        let mut all = floats.chunks_exact(4).map(|c| {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            sum.add(x.to_bits());
            x
        });
        let mut take = |n: usize| all.by_ref().take(n).collect::<Vec<f32>>();
        let trunk = take(lens[0]);
        let small4 = take(lens[1]);
        let small8 = take(lens[2]);
        drop(all);
        if sum.0 != stored {
            bail!(
                "{} is damaged (its checksum does not match)",
                path.display()
            );
        }
        let rows = row.iter().filter(|&&r| r >= 0).count();
        let entries = rows * views;
        let per = shape.iter().product::<usize>();
        let small = 3 * small_sizes.iter().map(|s| s * s).sum::<usize>();
        if views == 0
            || lens[0] != entries * per
            || lens[1] + lens[2] != if lens[1] == 0 { 0 } else { entries * small }
            || row.iter().any(|&r| r >= rows as i64)
        {
            return Err(bad());
        }
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
        let (small4, small8) = self.gather_small(slots, device);
        LevelInput {
            trunk,
            small4,
            small8,
        }
    }

    /// The trunk entries of `slots` channels-last (`[n][h][w][c]`, what [`crate::cpu::pass`]
    /// reads), and their side `h`.
    pub fn gather_nhwc(&self, slots: &[Slot]) -> (Vec<f32>, usize) {
        let [c, h, w] = self.shape;
        let (per, px) = (c * h * w, h * w);
        let mut out = vec![0f32; per * slots.len()];
        for (o, s) in out.chunks_exact_mut(per).zip(slots) {
            let e = self.entry(s);
            let chw = &self.trunk[e * per..(e + 1) * per];
            for (ch, plane) in chw.chunks_exact(px).enumerate() {
                for (p, &v) in plane.iter().enumerate() {
                    o[p * c + ch] = v;
                }
            }
        }
        (out, h)
    }

    /// The multiscale network's down-sampled inputs of `slots` (None for Lite0's cache).
    pub fn gather_small(
        &self,
        slots: &[Slot],
        device: &Device,
    ) -> (Option<Tensor<4>>, Option<Tensor<4>>) {
        let n = slots.len();
        let small = |data: &[f32], side: usize| {
            let per = 3 * side * side;
            let mut v = Vec::with_capacity(per * n);
            for s in slots {
                let e = self.entry(s);
                v.extend_from_slice(&data[e * per..(e + 1) * per]);
            }
            Tensor::from_data(TensorData::new(v, [n, 3, side, side]), device)
        };
        if self.small4.is_empty() {
            (None, None)
        } else {
            (
                Some(small(&self.small4, self.small_sizes[0])),
                Some(small(&self.small8, self.small_sizes[1])),
            )
        }
    }
}

/// A 64-bit checksum of a cache file's header bytes and values. Each step is a bijection of the
/// state for a given input, so any single changed byte or value changes the result.
struct Checksum(u64);

impl Checksum {
    fn of_header(header: &[u8]) -> Self {
        let mut c = Checksum(0xcbf2_9ce4_8422_2325);
        for &b in header {
            c.add(u32::from(b));
        }
        c
    }

    #[inline]
    fn add(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
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
    let wpath = weights::resolve(cfg.weights.as_deref(), cfg.backbone)?;
    h.update(weights::sha256_file(&wpath)?.as_bytes());
    h.update(
        format!(
            "{}|{}|{}|{}|{:?}|",
            cfg.level(),
            cfg.size,
            cfg.views,
            cfg.seed,
            // The classes head reads the same pooled features as the linear one.
            if cfg.arch == Arch::Multiscale {
                Arch::Multiscale
            } else {
                Arch::Lite0
            }
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
    // A damaged cache file is said so and computed again.
    let reuse = |p: &Path| {
        if !p.is_file() {
            return None;
        }
        FeatureCache::load(p)
            .map_err(|e| eprintln!("warning: {e:#}: computing the features again"))
            .ok()
    };
    let loaded = reuse(&file).and_then(|c| match val.as_deref_mut() {
        Some(v) => reuse(&vfile).map(|vc| {
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

#[cfg(test)]
mod tests {
    use super::FeatureCache;

    fn cache(small: bool) -> FeatureCache {
        let (views, shape, items) = (2, [3, 2, 2], 3);
        let n = items * views;
        let val = |i: usize| (i as f32 * 0.37).sin();
        let small_sizes = if small { [2, 1] } else { [0, 0] };
        let k = |s: usize| if small { n * 3 * s * s } else { 0 };
        FeatureCache {
            views,
            shape,
            trunk: (0..n * 12).map(val).collect(),
            small4: (0..k(2)).map(val).collect(),
            small8: (0..k(1)).map(val).collect(),
            small_sizes,
            // Items 0, 2 and 3 of a 4-item dataset, item 1 not cached.
            row: vec![0, usize::MAX, 1, 2],
        }
    }

    #[test]
    fn save_load_round_trip_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for small in [false, true] {
            let c = cache(small);
            let p = dir.path().join(format!("c-{small}.bin"));
            c.save(&p).unwrap();
            let back = FeatureCache::load(&p).unwrap();
            assert_eq!(back.views, c.views);
            assert_eq!(back.shape, c.shape);
            assert_eq!(back.small_sizes, c.small_sizes);
            assert_eq!(back.row, c.row);
            assert_eq!(back.trunk, c.trunk);
            assert_eq!((&back.small4, &back.small8), (&c.small4, &c.small8));
            let good = std::fs::read(&p).unwrap();
            let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
            // Truncated, one value's bit flipped, one header digit changed, the checksum changed,
            // an old file without checksum: each refused, naming the file.
            let mut cases: Vec<(&str, Vec<u8>)> = vec![
                ("truncated", good[..good.len() - 5].to_vec()),
                ("old format", good[..good.len() - 8].to_vec()),
                ("empty", Vec::new()),
            ];
            for (what, at) in [
                ("value", header_end + 4 * 7 + 1),
                ("checksum", good.len() - 3),
            ] {
                let mut b = good.clone();
                b[at] ^= 0x10;
                cases.push((what, b));
            }
            let digit = good[8..header_end].iter().position(|&b| b == b'2').unwrap() + 8;
            let mut b = good.clone();
            b[digit] = b'1';
            cases.push(("header", b));
            for (what, bytes) in cases {
                std::fs::write(&p, bytes).unwrap();
                let e = FeatureCache::load(&p)
                    .err()
                    .unwrap_or_else(|| panic!("{what}: loaded"));
                assert!(
                    e.to_string().contains(&p.display().to_string()),
                    "{what}: {e}"
                );
            }
        }
    }
}
