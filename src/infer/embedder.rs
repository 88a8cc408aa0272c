//! The embedder: the network that maps an image to a vector (the pretrained backbone's pooled
//! features, or a trained run's embedding network), over deeprank's CPU engine or burn's device.

use crate::cpu::engine::{Begun as EngineBegun, Engine, cpu_engine};
use crate::data::batch::decode_batch;
use crate::data::skipped::Skipped;
use crate::data::transform::{check_pretrained_size, check_size};
use crate::infer::fused::FusedLite;
use crate::infer::trained::embed_host;
use crate::model::device::{device, to_vec};
use crate::model::identity::RunIdentity;
use crate::model::lite::{Backbone, FEATURE_DIM, Lite};
use crate::model::net::EmbedNet;
use crate::model::run::{CONFIG, MODEL, load_run};
use crate::model::weights;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use std::path::{Path, PathBuf};

/// Which network produces the vectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// A backbone's ImageNet weights, pooled 1280-d features.
    Pretrained(Backbone),
    /// A run folder written by `deeprank train` (its `model.bpk` and `config.json`).
    Run(PathBuf),
}

impl ModelSpec {
    /// Parses `pretrained` (Lite0), `pretrained-lite1`, `pretrained-lite2` or a run folder.
    pub fn parse(s: &str) -> Result<ModelSpec> {
        if let Some(b) = Backbone::ALL
            .into_iter()
            .find(|&b| ModelSpec::Pretrained(b).source() == s)
        {
            return Ok(ModelSpec::Pretrained(b));
        }
        let p = PathBuf::from(s);
        if p.join(CONFIG).is_file() {
            return Ok(ModelSpec::Run(p));
        }
        bail!(
            "--model {s:?} is neither `pretrained` (or `pretrained-lite1`, `pretrained-lite2`) nor \
             a training run folder (with {})",
            CONFIG
        )
    }

    /// How DBs record the spec (`model_source`): `pretrained` for Lite0 as before,
    /// `pretrained-lite1`/`pretrained-lite2`, or the run folder.
    pub fn source(&self) -> String {
        match self {
            ModelSpec::Pretrained(Backbone::Lite0) => "pretrained".into(),
            ModelSpec::Pretrained(b) => format!("pretrained-{}", b.name()),
            ModelSpec::Run(p) => p.display().to_string(),
        }
    }

    /// The spec with `--backbone` applied: a pretrained spec takes that backbone; a run keeps its
    /// own, which must be the one asked for.
    pub fn with_backbone(self, backbone: Option<Backbone>) -> Result<ModelSpec> {
        let Some(b) = backbone else {
            return Ok(self);
        };
        match self {
            ModelSpec::Pretrained(_) => Ok(ModelSpec::Pretrained(b)),
            ModelSpec::Run(dir) => {
                let path = dir.join(CONFIG);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let id: RunIdentity = serde_json::from_str(&text)
                    .with_context(|| format!("{} is damaged", path.display()))?;
                if id.backbone != b {
                    bail!(
                        "the run {} was trained on {} but --backbone {} was given: drop --backbone \
                         or pass --backbone {}",
                        dir.display(),
                        id.backbone.name(),
                        b.name(),
                        id.backbone.name()
                    );
                }
                Ok(ModelSpec::Run(dir))
            }
        }
    }
}

/// One vector per input file (`None` where it failed), and the failures.
pub type PerFile = (Vec<Option<Vec<f32>>>, Vec<Skipped>);

/// The fast inference copy of the pretrained network: deeprank's CPU engine, or on another
/// device burn's network with BatchNorm folded.
enum Fast {
    Engine(Box<Engine>),
    Fused(Box<FusedLite>),
}

impl Fast {
    fn new(m: &Lite) -> Result<Self> {
        Ok(match cpu_engine(m)? {
            Some(e) => Fast::Engine(Box::new(e)),
            None => Fast::Fused(Box::new(FusedLite::new(m)?)),
        })
    }
}

/// A batch begun by [`Embedder::embed_begin`].
pub enum Begun<'a> {
    /// The pretrained network's front blocks on deeprank's engine.
    Engine(&'a Engine, EngineBegun),
    /// The whole batch (or its error).
    Done(Result<Vec<f32>>),
}

/// The network behind an embedder.
enum Net {
    /// The ImageNet network, and its BatchNorm-folded inference copy for the pooled features.
    Pretrained(Box<Lite>, Box<Fast>),
    Trained(Box<EmbedNet>, Option<Box<Engine>>),
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

/// The smallest input side at which the pretrained pooled features are not all zero.
pub const MIN_PRETRAINED_SIZE: u32 = 64;

impl Embedder {
    /// The pretrained Lite0 (pooled features), weights from `weights` or the cache.
    pub fn pretrained(weights_file: Option<&Path>, size: u32, normalize: bool) -> Result<Self> {
        Self::pretrained_backbone(Backbone::Lite0, weights_file, size, normalize)
    }

    /// A pretrained backbone (pooled features), weights from `weights` or the cache.
    pub fn pretrained_backbone(
        backbone: Backbone,
        weights_file: Option<&Path>,
        size: u32,
        normalize: bool,
    ) -> Result<Self> {
        check_pretrained_size(size)?;
        if size < MIN_PRETRAINED_SIZE {
            // Checked with the PyTorch reference too: at 32 px the last feature map is 1x1 and
            // the pretrained head's BN + ReLU6 clip every channel to 0 on real images.
            bail!(
                "--size {size} is too small for the pretrained features: at {size} px \
                 {}'s last feature map is 1x1 and comes out all zero (PyTorch \
                 gives the same), so every image would get the same vector; use --size \
                 {MIN_PRETRAINED_SIZE} or larger",
                backbone.title()
            );
        }
        let path = weights::resolve(weights_file, backbone)?;
        let sha = weights::sha256_file(&path)?;
        let device = device();
        let model = weights::load(&path, backbone, &device)?;
        let fast = Fast::new(&model)?;
        Ok(Self {
            net: Net::Pretrained(Box::new(model), Box::new(fast)),
            device,
            size,
            normalize,
            dim: FEATURE_DIM,
            identity: format!("efficientnet-{}:{}:pooled", backbone.name(), &sha[..12]),
            source: ModelSpec::Pretrained(backbone).source(),
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
            ModelSpec::Pretrained(b) => {
                Self::pretrained_backbone(*b, weights_file, size.unwrap_or(128), normalize)
            }
            ModelSpec::Run(dir) => Self::trained(dir, size),
        }
    }

    /// A trained run's network (its embedding head; normalised as it was trained). `size`
    /// defaults to the run's training size.
    pub fn trained(run: &Path, size: Option<u32>) -> Result<Self> {
        let (cfg, net) = load_run(run)?;
        let size = size.unwrap_or(cfg.size);
        check_size(size)?;
        let sha = weights::sha256_file(&run.join(MODEL))?;
        let name = run
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "run".into());
        let normalize = net.normalize;
        let engine = cpu_engine(&net.backbone)?.map(Box::new);
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
    pub fn embed_batch(&self, batch: &[f32], n: usize) -> Result<Vec<f32>> {
        self.embed_finish(self.embed_begin(batch, n))
    }

    /// The first part of [`Embedder::embed_batch`], which [`Embedder::embed_finish`] completes:
    /// on deeprank's engine, the pretrained network's blocks before its grouped tail (a stream
    /// runs the next batch's while this one's tail finishes); elsewhere the whole batch.
    pub fn embed_begin(&self, batch: &[f32], n: usize) -> Begun<'_> {
        if n == 0 {
            return Begun::Done(Ok(Vec::new()));
        }
        let s = self.size as usize;
        match &self.net {
            Net::Pretrained(_, fast) => match fast.as_ref() {
                Fast::Engine(e) => Begun::Engine(e, e.begin_pooled(batch, n, s)),
                Fast::Fused(f) => Begun::Done(
                    to_vec(f.pooled(self.input(batch.to_vec(), n))).map(|v| self.normalized(v)),
                ),
            },
            // A trained network applies its own normalisation.
            Net::Trained(m, e) => Begun::Done(to_vec(embed_host(
                m,
                e.as_deref(),
                batch,
                n,
                s,
                &self.device,
            ))),
        }
    }

    /// The vectors of a batch begun by [`Embedder::embed_begin`]: `n × dim` values.
    pub fn embed_finish(&self, b: Begun) -> Result<Vec<f32>> {
        match b {
            Begun::Done(v) => v,
            Begun::Engine(e, b) => Ok(self.normalized(e.finish_pooled(b))),
        }
    }

    /// `out` with each row L2-normalised when this embedder normalises.
    fn normalized(&self, mut out: Vec<f32>) -> Vec<f32> {
        if self.normalize {
            for row in out.chunks_exact_mut(self.dim) {
                l2_normalize(row);
            }
        }
        out
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
        let vecs = self.embed_batch(&buf, n)?;
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

pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}
