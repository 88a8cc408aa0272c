//! Embedding: the network that maps an image to a vector, and the seed's "save embeddings" stage
//! (embed every image of a dataset into a DB), batched, with parallel decoding overlapped with the
//! network, streaming to disk.

use crate::dataset::Dataset;
use crate::db::{DbWriter, Entry, Meta};
use crate::model::{FEATURE_DIM, Lite0};
use crate::transform::{self, ImageError};
use crate::weights;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Which network produces the vectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// EfficientNet-Lite0 ImageNet weights, pooled 1280-d features.
    Pretrained,
    /// A run folder written by `deeprank train` (its `model.bpk` and `config.json`).
    Run(PathBuf),
}

impl ModelSpec {
    /// Parses `pretrained` or a run folder.
    pub fn parse(s: &str) -> Result<ModelSpec> {
        if s == "pretrained" {
            return Ok(ModelSpec::Pretrained);
        }
        let p = PathBuf::from(s);
        if p.join(crate::train::CONFIG).is_file() {
            return Ok(ModelSpec::Run(p));
        }
        bail!(
            "--model {s:?} is neither `pretrained` nor a training run folder (with {})",
            crate::train::CONFIG
        )
    }

    pub fn source(&self) -> String {
        match self {
            ModelSpec::Pretrained => "pretrained".into(),
            ModelSpec::Run(p) => p.display().to_string(),
        }
    }
}

/// An image that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// One vector per input file (`None` where it failed), and the failures.
pub type PerFile = (Vec<Option<Vec<f32>>>, Vec<Skipped>);

static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Selects the compute device for this process: `cpu` (burn's flex backend, always there),
/// `vulkan` (GPU through wgpu; build with `--features gpu`) or `cuda` (`--features cuda`, which
/// needs burn's LLVM bundle at build time).
pub fn set_device(name: &str) -> Result<()> {
    let dev = match name {
        "cpu" => Device::flex(),
        "vulkan" | "gpu" => gpu_device()?,
        "cuda" => cuda_device()?,
        other => bail!("unknown --device {other:?}: use cpu, vulkan or cuda"),
    };
    if DEVICE.set(dev).is_err() {
        bail!("the compute device is already set");
    }
    Ok(())
}

#[cfg(feature = "gpu")]
fn gpu_device() -> Result<Device> {
    Ok(Device::vulkan(Default::default()))
}

#[cfg(not(feature = "gpu"))]
fn gpu_device() -> Result<Device> {
    bail!("--device vulkan needs a GPU build: cargo build --release --features gpu")
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!(
        "--device cuda needs a CUDA build: cargo build --release --features cuda (downloads burn's LLVM bundle)"
    )
}

/// The device deeprank computes on (the CPU unless [`set_device`] chose another).
pub fn device() -> Device {
    DEVICE.get().cloned().unwrap_or_else(Device::flex)
}

/// Whether deeprank computes on the CPU (burn's flex backend), where its own engine runs.
pub fn on_cpu() -> bool {
    DEVICE.get().is_none_or(|d| *d == Device::flex())
}

/// deeprank's CPU engine for `backbone` when computing on the CPU (None on other devices).
pub fn cpu_engine(backbone: &Lite0) -> Result<Option<crate::engine::Engine>> {
    Ok(if on_cpu() {
        Some(crate::engine::Engine::new(backbone)?)
    } else {
        None
    })
}

/// The fast inference copy of the pretrained network: deeprank's CPU engine, or on another
/// device burn's network with BatchNorm folded.
enum Fast {
    Engine(crate::engine::Engine),
    Fused(Box<crate::fused::FusedLite0>),
}

impl Fast {
    fn new(m: &Lite0) -> Result<Self> {
        Ok(match cpu_engine(m)? {
            Some(e) => Fast::Engine(e),
            None => Fast::Fused(Box::new(crate::fused::FusedLite0::new(m)?)),
        })
    }
}

/// The network behind an embedder.
enum Net {
    /// The ImageNet network, and its BatchNorm-folded inference copy for the pooled features.
    Pretrained(Box<Lite0>, Box<Fast>),
    Trained(
        Box<crate::train::net::EmbedNet>,
        Option<crate::engine::Engine>,
    ),
}

/// A network ready to embed images of one input size.
pub struct Embedder {
    net: Net,
    device: Device,
    pub size: u32,
    pub normalize: bool,
    pub dim: usize,
    /// Identity recorded in DBs; a DB is only queried with the same identity.
    pub identity: String,
    pub source: String,
}

impl Embedder {
    /// The pretrained backbone (pooled features), weights from `weights` or the cache.
    pub fn pretrained(weights_file: Option<&Path>, size: u32, normalize: bool) -> Result<Self> {
        check_size(size)?;
        let path = weights::resolve(weights_file)?;
        let sha = weights::sha256_file(&path)?;
        let device = device();
        let model = weights::load_lite0(&path, &device)?;
        let fast = Fast::new(&model)?;
        Ok(Self {
            net: Net::Pretrained(Box::new(model), Box::new(fast)),
            device,
            size,
            normalize,
            dim: FEATURE_DIM,
            identity: format!("efficientnet-lite0:{}:pooled", &sha[..12]),
            source: ModelSpec::Pretrained.source(),
        })
    }

    /// Builds the embedder a spec names; `size` defaults to 128 px for the pretrained network and
    /// to the training size for a run.
    pub fn from_spec(
        spec: &ModelSpec,
        weights_file: Option<&Path>,
        size: Option<u32>,
        normalize: bool,
    ) -> Result<Self> {
        match spec {
            ModelSpec::Pretrained => Self::pretrained(weights_file, size.unwrap_or(128), normalize),
            ModelSpec::Run(dir) => Self::trained(dir, size),
        }
    }

    /// A trained run's network (its embedding head; normalised as it was trained). `size`
    /// defaults to the run's training size.
    pub fn trained(run: &Path, size: Option<u32>) -> Result<Self> {
        let (cfg, net) = crate::train::load_run(run)?;
        let size = size.unwrap_or(cfg.size);
        check_size(size)?;
        let sha = weights::sha256_file(&run.join(crate::train::MODEL))?;
        let name = run
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "run".into());
        let normalize = net.normalize;
        let engine = cpu_engine(&net.backbone)?;
        Ok(Self {
            net: Net::Trained(Box::new(net), engine),
            device: device(),
            size,
            normalize,
            dim: cfg.dim,
            identity: format!("run:{name}:{}", &sha[..12]),
            source: run.display().to_string(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Input tensor `[n, 3, size, size]` from a flat CHW batch buffer.
    pub fn input(&self, batch: Vec<f32>, n: usize) -> Tensor<4> {
        let s = self.size as usize;
        Tensor::from_data(TensorData::new(batch, [n, 3, s, s]), &self.device)
    }

    /// Embeds a batch of `n` normalised CHW images; returns `n × dim` values.
    pub fn embed_batch(&self, batch: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut out = match &self.net {
            Net::Pretrained(_, fast) => match fast.as_ref() {
                Fast::Engine(e) => e.pooled(&batch, n, self.size as usize),
                Fast::Fused(f) => to_vec(f.pooled(self.input(batch, n)))?,
            },
            // A trained network applies its own normalisation.
            Net::Trained(m, e) => {
                let s = self.size as usize;
                return to_vec(m.embed_host(e.as_ref(), batch, n, s, &self.device));
            }
        };
        if self.normalize {
            for row in out.chunks_exact_mut(self.dim) {
                l2_normalize(row);
            }
        }
        Ok(out)
    }

    /// ImageNet logits (`n × 1000`) of a batch of `n` normalised CHW images.
    pub fn logits_batch(&self, batch: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        let x = self.input(batch, n);
        match &self.net {
            Net::Pretrained(m, _) => to_vec(m.logits(x)),
            Net::Trained(m, _) => to_vec(m.backbone.logits(x)),
        }
    }

    /// Embeds image files; failures are returned per path instead of stopping.
    pub fn embed_files(&self, paths: &[PathBuf]) -> Result<PerFile> {
        let (buf, ok, skipped) = decode_batch(paths, self.size);
        let n = ok.iter().filter(|&&o| o).count();
        let vecs = self.embed_batch(buf, n)?;
        let mut it = vecs.chunks_exact(self.dim);
        let out = ok
            .iter()
            .map(|&o| {
                if o {
                    it.next().map(|v| v.to_vec())
                } else {
                    None
                }
            })
            .collect();
        Ok((out, skipped))
    }
}

/// A 2-d tensor's values, row-major.
pub(crate) fn to_vec(t: Tensor<2>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Input sides the network accepts (multiples of 32 keep every stride exact).
pub fn check_size(size: u32) -> Result<()> {
    if !(32..=1024).contains(&size) || !size.is_multiple_of(32) {
        bail!(
            "--size {size} is not supported: use a multiple of 32 between 32 and 1024 (e.g. 64, 128, 224)"
        );
    }
    Ok(())
}

pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

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

/// A progress bar with images/s, hidden when stderr is not a terminal.
pub fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec:.1} img/s eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Embeds `paths` in batches (decoding batch i+1 while the network runs on batch i) and hands each
/// vector to `sink(position, vector)` in order. Images that fail to decode are reported and skipped.
pub fn embed_stream(
    emb: &Embedder,
    paths: &[PathBuf],
    batch: usize,
    label: &str,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<Vec<Skipped>> {
    let batch = batch.max(1);
    let pb = progress(paths.len(), label);
    let chunks: Vec<&[PathBuf]> = paths.chunks(batch).collect();
    let mut skipped = Vec::new();
    let mut pending = chunks.first().map(|c| decode_batch(c, emb.size));
    let mut base = 0;
    for (ci, chunk) in chunks.iter().enumerate() {
        let (buf, ok, sk) = pending.take().context("decoded batch")?;
        let n = ok.iter().filter(|&&o| o).count();
        let next = chunks.get(ci + 1);
        let (vecs, next_dec) = rayon::join(
            || emb.embed_batch(buf, n),
            || next.map(|c| decode_batch(c, emb.size)),
        );
        pending = next_dec;
        let vecs = vecs?;
        for s in &sk {
            pb.suspend(|| eprintln!("skipped {}: {}", s.path.display(), s.reason));
        }
        skipped.extend(sk);
        let mut rows = vecs.chunks_exact(emb.dim);
        for (j, o) in ok.into_iter().enumerate() {
            if o {
                sink(base + j, rows.next().context("missing vector")?)?;
            }
        }
        base += chunk.len();
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(skipped)
}

/// What `embed` did.
#[derive(Debug)]
pub struct EmbedReport {
    pub db: PathBuf,
    pub count: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
}

/// Embeds every image of `ds` into a DB at `out` (and the seed's text form at `text`).
pub fn embed_dataset(
    emb: &Embedder,
    ds: &Dataset,
    out: &Path,
    text: Option<&Path>,
    batch: usize,
) -> Result<EmbedReport> {
    let t0 = std::time::Instant::now();
    let mut writer = DbWriter::create(out, emb.dim, text)?;
    let paths: Vec<PathBuf> = ds.items.iter().map(|i| i.path.clone()).collect();
    let mut count = 0;
    let skipped = embed_stream(emb, &paths, batch, "embed", |i, v| {
        let item = &ds.items[i];
        let class = &ds.classes[item.class];
        let entry = Entry {
            path: item.path.clone(),
            class_id: class.id.clone(),
            class_name: class.name.clone(),
        };
        count += 1;
        writer.push(&entry, v)
    })?;
    if count == 0 {
        bail!(
            "none of the {} images could be decoded; nothing written",
            ds.items.len()
        );
    }
    let meta = Meta {
        model: emb.identity.clone(),
        model_source: emb.source.clone(),
        size: emb.size,
        dim: emb.dim,
        count,
        normalized: emb.normalize,
        data: ds.root.display().to_string(),
        deeprank_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let db = writer.finish(meta)?;
    Ok(EmbedReport {
        db,
        count,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
