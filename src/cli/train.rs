//! `deeprank train`: its flags, the recipe they override, and what it prints.

use anyhow::{Result, bail};
use deeprank::model::net::Arch;
use deeprank::train::config::{BnMode, OptimizerKind, Recipe, TrainConfig};
use deeprank::train::plan::Sampling;
use deeprank::train::{RunOptions, train};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training images (Tiny ImageNet root or class folders); on --resume, the run's unless given.
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Run folder: config.json, checkpoint.bin, model.bpk, metrics.csv, plot.png.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continues the run in RUN_DIR (or in --out) from its last checkpoint, with the run's own
    /// settings (its config.json); only the flags given on this command line change them.
    #[arg(long, num_args = 0..=1, value_name = "RUN_DIR")]
    resume: Option<Option<PathBuf>>,
    /// Resume despite a changed config, or start over in a folder that holds a run.
    #[arg(long)]
    force: bool,
    /// Validation queries (DB = the training images): P@1/P@30/MAP@R per epoch.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Preset the flags below override [default: default; on --resume, the run's settings].
    #[arg(long, value_enum)]
    recipe: Option<RecipeArg>,
    /// Triplet file from `deeprank sample` (implies --sampling file).
    #[arg(long)]
    triplets: Option<PathBuf>,
    /// The pretrained network (default: the recipe's, lite2 for the default recipe and lite0 for
    /// the seed's; on --resume, the run's).
    #[arg(long, value_enum)]
    backbone: Option<super::BackboneArg>,
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    /// Embedding dimension.
    #[arg(long)]
    dim: Option<usize>,
    /// L2-normalise the embeddings (--normalize true|false).
    #[arg(long)]
    normalize: Option<bool>,
    /// The ranking loss's gap g (> 0).
    #[arg(long)]
    gap: Option<f32>,
    #[arg(long, value_enum)]
    sampling: Option<SamplingArg>,
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    /// Learning rate of the head.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the trainable backbone blocks.
    #[arg(long)]
    backbone_lr: Option<f64>,
    #[arg(long)]
    momentum: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Triplets per step (file, random) or images per step (batch-hard, semi-hard).
    #[arg(long)]
    batch: Option<usize>,
    /// Images per class in a mining batch.
    #[arg(long)]
    per_class: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    steps_per_epoch: Option<usize>,
    #[arg(long)]
    size: Option<u32>,
    /// Freeze the stem and the first K MBConv blocks (0–B), or B + 1 for the whole backbone
    /// (B = 16 for lite0, 21 for lite1/lite2) [default recipe: the whole backbone].
    #[arg(long)]
    freeze_blocks: Option<usize>,
    #[arg(long, value_enum)]
    bn: Option<BnArg>,
    /// Cache the frozen part's outputs (--cache true|false).
    #[arg(long)]
    cache: Option<bool>,
    /// Cached views per image (1 plain + augmented ones).
    #[arg(long)]
    views: Option<usize>,
    #[arg(long)]
    plateau_factor: Option<f64>,
    #[arg(long)]
    plateau_patience: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N steps as well as at epoch ends (0: epoch ends only).
    #[arg(long)]
    save_every: Option<usize>,
    #[arg(long)]
    weights: Option<PathBuf>,
}

impl TrainArgs {
    /// The run's settings: the recipe's preset (or, on a resume, the run's own settings, `run`)
    /// with the flags given on the command line applied.
    pub fn config(&self, run: Option<&TrainConfig>) -> Result<TrainConfig> {
        let Some(data) = self.data.clone().or_else(|| run.map(|r| r.data.clone())) else {
            bail!("give the training images: --data DIR");
        };
        let mut c = match (run, self.recipe) {
            (Some(r), None) => r.clone(),
            (r, recipe) => {
                let recipe: Recipe = recipe.unwrap_or(RecipeArg::Default).into();
                let backbone = match (self.backbone, r) {
                    (Some(b), _) => b.into(),
                    (None, Some(r)) => r.backbone,
                    (None, None) => recipe.backbone(),
                };
                let mut c = TrainConfig::recipe_for(recipe, data.clone(), backbone);
                // Where the run reads from and its weights stay the run's.
                if let Some(r) = r {
                    c.val = r.val.clone();
                    c.weights = r.weights.clone();
                }
                c
            }
        };
        c.data = data;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        macro_rules! set_enum {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v.into(); } )* };
        }
        set_enum!(backbone, arch, sampling, optimizer, bn);
        set!(
            dim,
            normalize,
            gap,
            lr,
            backbone_lr,
            momentum,
            weight_decay,
            batch,
            per_class,
            epochs,
            size,
            freeze_blocks,
            cache,
            views,
            plateau_factor,
            plateau_patience,
            seed,
            save_every
        );
        if self.recipe == Some(RecipeArg::Seed) && self.backbone_lr.is_none() {
            c.backbone_lr = c.lr;
        }
        if self.triplets.is_some() {
            c.triplets = self.triplets.clone();
            if self.sampling.is_none() {
                c.sampling = Sampling::File;
            }
        }
        if self.freeze_blocks == Some(0) && self.cache.is_none() {
            c.cache = false;
        }
        c.steps_per_epoch = self.steps_per_epoch.or(c.steps_per_epoch);
        if self.val.is_some() {
            c.val = self.val.clone();
        }
        if self.weights.is_some() {
            c.weights = self.weights.clone();
        }
        Ok(c)
    }
}

/// Runs `deeprank train` and prints its summary.
pub fn run(args: &TrainArgs) -> Result<()> {
    let run_dir = match (&args.resume, &args.out) {
        (Some(Some(r)), _) => r.clone(),
        (_, Some(o)) => o.clone(),
        _ => bail!("give the run folder: --out RUN_DIR (or --resume RUN_DIR)"),
    };
    // A resume continues with the run's own settings; flags given here change them.
    let prev = match args.resume {
        Some(_) => Some(TrainConfig::of_run(&run_dir)?),
        None => None,
    };
    let cfg = args.config(prev.as_ref())?;
    let opts = RunOptions {
        run_dir,
        resume: args.resume.is_some(),
        force: args.force,
    };
    let s = train(cfg, &opts)?;
    if let Some(last) = s.history.last() {
        println!(
            "trained {} epochs; last: loss {:.4}{}",
            s.history.len(),
            last.mean_loss,
            last.p_at_30
                .map(|p| format!(
                    ", val P@30 {p:.4}, MAP@R {:.4}",
                    last.map_at_r.unwrap_or(0.0)
                ))
                .unwrap_or_default()
        );
    }
    if s.skipped_images > 0 {
        eprintln!(
            "skipped {} unreadable images (listed above)",
            s.skipped_images
        );
    }
    println!(
        "run: {} (use it with --model {})",
        s.run_dir.display(),
        s.run_dir.display()
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecipeArg {
    /// deeprank's default (chosen by measurement; see bench/RESULTS.md).
    Default,
    /// The seed's recipe exactly: SGD + Nesterov 0.9, lr 1e-3, wd 1e-5, plateau ×0.1, batch 30
    /// triplets, g = 1.0, 4096-d head, full fine-tuning.
    Seed,
}

impl From<RecipeArg> for Recipe {
    fn from(r: RecipeArg) -> Recipe {
        match r {
            RecipeArg::Default => Recipe::Default,
            RecipeArg::Seed => Recipe::Seed,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ArchArg {
    /// The backbone (`--backbone`, EfficientNet-Lite0 by default) + a linear head (named `lite0`
    /// from when Lite0 was the only backbone; kept so existing runs and commands stay valid).
    Lite0,
    /// The paper's multiscale network: the backbone + two shallow branches on 4:1 and 8:1 copies.
    Multiscale,
    /// The backbone + a linear head on its pooled features and its ImageNet classifier's class
    /// posteriors (α·√softmax, the classifier frozen)
    Classes,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Arch {
        match a {
            ArchArg::Lite0 => Arch::Lite0,
            ArchArg::Multiscale => Arch::Multiscale,
            ArchArg::Classes => Arch::Classes,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SamplingArg {
    /// Triplets read from a file written by `deeprank sample` (the seed).
    File,
    /// The seed's rule, drawn fresh each step: q any class, p same class, n another class.
    Random,
    /// P classes × K images per batch, each anchor's hardest positive and negative.
    BatchHard,
    /// P classes × K images per batch, every positive pair with its semi-hard negative.
    SemiHard,
}

impl From<SamplingArg> for Sampling {
    fn from(s: SamplingArg) -> Sampling {
        match s {
            SamplingArg::File => Sampling::File,
            SamplingArg::Random => Sampling::Random,
            SamplingArg::BatchHard => Sampling::BatchHard,
            SamplingArg::SemiHard => Sampling::SemiHard,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Adam,
    Adamw,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> OptimizerKind {
        match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adam => OptimizerKind::Adam,
            OptimizerArg::Adamw => OptimizerKind::Adamw,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BnArg {
    Frozen,
    Train,
}

impl From<BnArg> for BnMode {
    fn from(b: BnArg) -> BnMode {
        match b {
            BnArg::Frozen => BnMode::Frozen,
            BnArg::Train => BnMode::Train,
        }
    }
}
