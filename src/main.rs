//! The `deeprank` command line: parses arguments and calls the library.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use deeprank::dataset::{Dataset, Split};
use deeprank::db::Db;
use deeprank::embed::{Embedder, ModelSpec, embed_dataset};
use deeprank::{demo, eval, grid, query, sampler, train, weights};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "deeprank",
    version,
    about = "Image similarity search with a triplet deep-ranking network"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Compute device: cpu, vulkan (build with --features gpu) or cuda (--features cuda).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the whole pipeline on the bundled sample: weights, embed, eval, queries, grids, report.
    Demo {
        /// Dataset to use instead of the bundled sample (Tiny ImageNet root or class folders with train/ and val/).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Number of query images to show.
        #[arg(long, default_value_t = 4)]
        queries: usize,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Weights file instead of the fetched ImageNet weights.
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Writes triplets (query,positive,negative) as the seed's sampler.py does.
    Sample {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "triplets.txt")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        n_pos: usize,
        #[arg(long, default_value_t = 1)]
        n_neg: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Manages the ImageNet weights of EfficientNet-Lite0.
    Weights {
        #[command(subcommand)]
        cmd: WeightsCmd,
    },
    /// Embeds every image of a dataset into a DB folder (vectors.npy, manifest.tsv, meta.json).
    Embed {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `pretrained` (ImageNet EfficientNet-Lite0, pooled 1280-d features).
        #[arg(long, default_value = "pretrained")]
        model: String,
        /// Input side in pixels, a multiple of 32 (default: 128, or a run's training size).
        #[arg(long)]
        size: Option<u32>,
        /// Also write the seed's text form: one image per line, path then the values.
        #[arg(long)]
        text: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Keep raw features instead of L2-normalising them.
        #[arg(long)]
        no_normalize: bool,
        /// Which split of a dataset root to embed.
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Finds the images of a DB closest to query images.
    Query {
        #[arg(long)]
        db: PathBuf,
        #[arg(long = "image", required = true, num_args = 1..)]
        images: Vec<PathBuf>,
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Prints JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Draws the query and its results to this PNG (OUT-1.png, OUT-2.png, ... for several queries).
        #[arg(long)]
        grid: Option<PathBuf>,
        /// Model to embed the queries with (must be the DB's; default: the DB's).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Precision@k, recall@k and MAP@R of a query set against a DB.
    Eval {
        #[arg(long)]
        db: PathBuf,
        /// Query images: a Tiny ImageNet root (its val/), a val folder, or class folders.
        #[arg(long)]
        queries: PathBuf,
        #[arg(long, default_value = "1,10,30")]
        k: String,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Serves visual search over HTTP: a web page at / and a JSON API.
    Serve {
        #[arg(long)]
        db: PathBuf,
        /// Model for uploads (must be the DB's; default: the DB's).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Largest upload in MB.
        #[arg(long, default_value_t = 10.0)]
        max_upload_mb: f64,
        /// Largest image in megapixels (by its header, checked before decoding).
        #[arg(long, default_value_t = 40.0)]
        max_megapixels: f64,
        /// Uploads waiting for the embedder at most; more get 503 + Retry-After.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Uploads embedded together at most.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Milliseconds the embedder waits to fill a batch.
        #[arg(long, default_value_t = 3)]
        batch_wait_ms: u64,
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Fine-tunes the triplet network with the ranking loss (the seed's main.py).
    Train(Box<TrainArgs>),
    /// Times exact search over random vectors (bench/search.sh compares it with FAISS).
    #[command(hide = true)]
    BenchSearch {
        #[arg(long, default_value = "/tmp/deeprank-bench/search")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 1)]
        queries: usize,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Times decode + resize + normalise of a dataset's images (bench/decode.sh compares it with PIL).
    #[command(hide = true)]
    BenchDecode {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Times the training step (bench/train_step.sh compares it with PyTorch): the seed recipe's
    /// network and optimiser (full fine-tuning, BatchNorm in training mode) on a fixed batch of the
    /// first 3 × TRIPLETS images of a dataset.
    #[command(hide = true)]
    BenchTrain {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 16)]
        triplets: usize,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// ImageNet top-1 of the pretrained classifier on a labelled set, restricted to its classes.
    Classify {
        /// Images with ImageNet wnids as classes (e.g. a Tiny ImageNet root: its val/ is used).
        #[arg(long)]
        data: PathBuf,
        /// The 1,000 ImageNet wnids in logit order.
        #[arg(long)]
        imagenet_wnids: PathBuf,
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, value_enum, default_value = "val")]
        split: SplitArg,
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Training images (Tiny ImageNet root or class folders).
    #[arg(long)]
    data: PathBuf,
    /// Run folder: config.json, checkpoint.bin, model.bpk, metrics.csv, plot.png.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continues the run in RUN_DIR (or in --out) from its last checkpoint.
    #[arg(long, num_args = 0..=1, value_name = "RUN_DIR")]
    resume: Option<Option<PathBuf>>,
    /// Resume despite a changed config, or start over in a folder that holds a run.
    #[arg(long)]
    force: bool,
    /// Validation queries (DB = the training images): P@1/P@30/MAP@R per epoch.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Preset the flags below override.
    #[arg(long, value_enum, default_value = "default")]
    recipe: train::Recipe,
    /// Triplet file from `deeprank sample` (implies --sampling file).
    #[arg(long)]
    triplets: Option<PathBuf>,
    #[arg(long, value_enum)]
    arch: Option<train::net::Arch>,
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
    sampling: Option<train::data::Sampling>,
    #[arg(long, value_enum)]
    optimizer: Option<train::OptimizerKind>,
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
    /// Freeze the stem and the first K MBConv blocks (0–16), or 17 for the whole backbone.
    #[arg(long)]
    freeze_blocks: Option<usize>,
    #[arg(long, value_enum)]
    bn: Option<train::BnMode>,
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
    fn config(&self) -> train::TrainConfig {
        let mut c = train::TrainConfig::recipe(self.recipe, self.data.clone());
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            arch,
            dim,
            normalize,
            gap,
            sampling,
            optimizer,
            lr,
            backbone_lr,
            momentum,
            weight_decay,
            batch,
            per_class,
            epochs,
            size,
            freeze_blocks,
            bn,
            cache,
            views,
            plateau_factor,
            plateau_patience,
            seed,
            save_every
        );
        if self.recipe == train::Recipe::Seed && self.backbone_lr.is_none() {
            c.backbone_lr = c.lr;
        }
        if self.triplets.is_some() {
            c.triplets = self.triplets.clone();
            if self.sampling.is_none() {
                c.sampling = train::data::Sampling::File;
            }
        }
        if self.freeze_blocks == Some(0) && self.cache.is_none() {
            c.cache = false;
        }
        c.steps_per_epoch = self.steps_per_epoch.or(c.steps_per_epoch);
        c.val = self.val.clone();
        c.weights = self.weights.clone();
        c
    }
}

#[derive(Subcommand)]
enum WeightsCmd {
    /// Downloads the weights with pip (if not cached), checks the sha256, prints the path.
    Fetch,
    /// Prints where the weights are (or would be) cached.
    Path,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SplitArg {
    Train,
    Val,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Split {
        match s {
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Val,
        }
    }
}

fn report_ignored(ds: &Dataset) {
    if !ds.ignored.is_empty() {
        eprintln!(
            "note: {} files without an image extension were ignored (first: {})",
            ds.ignored.len(),
            ds.ignored[0].display()
        );
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(t) = cli.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot set up the thread pool")?;
    }
    deeprank::embed::set_device(&cli.device)?;
    match cli.cmd {
        Cmd::Train(args) => {
            let cfg = args.config();
            let run_dir = match (&args.resume, &args.out) {
                (Some(Some(r)), _) => r.clone(),
                (_, Some(o)) => o.clone(),
                _ => bail!("give the run folder: --out RUN_DIR (or --resume RUN_DIR)"),
            };
            let opts = train::RunOptions {
                run_dir,
                resume: args.resume.is_some(),
                force: args.force,
            };
            let s = train::train(cfg, &opts)?;
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
        }
        Cmd::Serve {
            db,
            model,
            addr,
            max_upload_mb,
            max_megapixels,
            queue,
            max_batch,
            batch_wait_ms,
            weights,
        } => {
            if !(max_upload_mb > 0.0 && max_megapixels > 0.0) || max_batch == 0 {
                bail!("--max-upload-mb, --max-megapixels and --max-batch must be positive");
            }
            let db = Db::open(&db)?;
            let emb = query::embedder_for_db(&db, model.as_deref(), weights.as_deref())?;
            let opts = deeprank::serve::ServeOptions {
                addr,
                max_upload: (max_upload_mb * 1048576.0) as usize,
                max_pixels: (max_megapixels * 1e6) as u64,
                queue,
                max_batch,
                batch_wait: std::time::Duration::from_millis(batch_wait_ms),
                ..Default::default()
            };
            deeprank::serve::serve(db, emb, opts)?;
        }
        Cmd::BenchSearch {
            dir,
            n,
            dim,
            queries,
            k,
            runs,
        } => {
            let (s, dbp, qp) = deeprank::benchkit::time_search(&dir, n, dim, queries, k, runs)?;
            println!(
                "RESULT deeprank_search n={n} dim={dim} queries={queries} k={k} seconds={s:.5} db={} q={}",
                dbp.display(),
                qp.display()
            );
        }
        Cmd::BenchDecode { data, size, runs } => {
            let ds = Dataset::open(&data, Split::Val)?;
            let paths: Vec<PathBuf> = ds.items.iter().map(|i| i.path.clone()).collect();
            let s = deeprank::benchkit::time_decode(&paths, size, runs)?;
            println!(
                "RESULT deeprank_decode images={} size={size} seconds={s:.4} img_per_s={:.0}",
                paths.len(),
                paths.len() as f64 / s
            );
        }
        Cmd::BenchTrain {
            data,
            size,
            triplets,
            dim,
            warmup,
            steps,
        } => {
            let (sec, loss) =
                deeprank::benchkit::time_train(&data, size, triplets, dim, warmup, steps)?;
            println!(
                "RESULT deeprank_train size={size} triplets={triplets} seconds_per_step={sec:.4} img_per_s={:.1} loss={loss:.4}",
                (3 * triplets) as f64 / sec
            );
        }
        Cmd::Demo {
            data,
            out,
            size,
            queries,
            top,
            batch,
            weights,
        } => {
            demo::run(&demo::DemoOptions {
                data,
                out,
                size,
                queries,
                top,
                batch,
                weights,
            })?;
        }
        Cmd::Sample {
            data,
            out,
            n_pos,
            n_neg,
            seed,
        } => {
            let t0 = std::time::Instant::now();
            let ds = Dataset::open(&data, Split::Train)?;
            report_ignored(&ds);
            let s = sampler::sample(&ds, n_pos, n_neg, seed)?;
            for &c in &s.small_classes {
                eprintln!(
                    "warning: class {} has fewer than two images: left out of sampling",
                    ds.classes[c].id
                );
            }
            sampler::write_triplets(&ds, &s.triplets, &out)?;
            println!(
                "wrote {} triplets ({} images, {} classes) to {} in {:.2}s",
                s.triplets.len(),
                ds.items.len(),
                ds.classes.len() - s.small_classes.len(),
                out.display(),
                t0.elapsed().as_secs_f64()
            );
        }
        Cmd::Weights {
            cmd: WeightsCmd::Fetch,
        } => {
            println!("{}", weights::fetch()?.display());
        }
        Cmd::Weights {
            cmd: WeightsCmd::Path,
        } => {
            println!("{}", weights::default_path().display());
        }
        Cmd::Embed {
            data,
            out,
            model,
            size,
            text,
            batch,
            no_normalize,
            split,
            weights,
        } => {
            let spec = ModelSpec::parse(&model)?;
            let ds = Dataset::open(&data, split.into())?;
            report_ignored(&ds);
            eprintln!("{}", ds.summary());
            let emb = Embedder::from_spec(&spec, weights.as_deref(), size, !no_normalize)?;
            let rep = embed_dataset(&emb, &ds, &out, text.as_deref(), batch)?;
            if !rep.skipped.is_empty() {
                eprintln!(
                    "skipped {} unreadable images (listed above)",
                    rep.skipped.len()
                );
            }
            println!(
                "embedded {} images ({} dims) in {:.1}s ({:.1} img/s) into {}",
                rep.count,
                emb.dim,
                rep.seconds,
                rep.count as f64 / rep.seconds,
                rep.db.display()
            );
        }
        Cmd::Query {
            db,
            images,
            top,
            json,
            grid: grid_out,
            model,
            weights,
        } => {
            let db = Db::open(&db)?;
            let emb = query::embedder_for_db(&db, model.as_deref(), weights.as_deref())?;
            let results = query::query(&db, &emb, &images, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                for q in &results {
                    println!(
                        "query {} (class {})",
                        q.image.display(),
                        q.class_id.as_deref().unwrap_or("?")
                    );
                    println!("{:>4}  {:>8}  {:<12} path", "rank", "distance", "class");
                    for r in &q.results {
                        let mark = match r.same_class {
                            Some(true) => "+",
                            Some(false) => "-",
                            None => " ",
                        };
                        println!(
                            "{:>4}  {:>8.4}  {mark}{:<11} {}  ({})",
                            r.rank,
                            r.distance,
                            r.class_id,
                            r.path.display(),
                            r.class_name
                        );
                    }
                }
            }
            if let Some(g) = grid_out {
                for (i, q) in results.iter().enumerate() {
                    let path = if results.len() == 1 {
                        g.clone()
                    } else {
                        let stem = g.file_stem().unwrap_or_default().to_string_lossy();
                        g.with_file_name(format!("{stem}-{}.png", i + 1))
                    };
                    grid::write(q, &path)?;
                    eprintln!("grid: {}", path.display());
                }
            }
        }
        Cmd::Eval {
            db,
            queries,
            k,
            json,
            batch,
            model,
            weights,
        } => {
            let ks = eval::parse_ks(&k)?;
            let db = Db::open(&db)?;
            let ds = Dataset::open(&queries, Split::Val)?;
            eprintln!("queries: {}", ds.summary());
            let emb = query::embedder_for_db(&db, model.as_deref(), weights.as_deref())?;
            let rep = eval::evaluate(&emb, &db, &ds, &ks, batch)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!(
                    "{} queries against {} DB images ({}, {} px)",
                    rep.metrics.queries, rep.db_size, rep.model, rep.size
                );
                for (k, v) in &rep.metrics.precision_at_k {
                    println!(
                        "P@{k:<3} {v:.4}   Recall@{k:<3} {:.4}",
                        rep.metrics.recall_at_k[k]
                    );
                }
                println!("MAP@R  {:.4}", rep.metrics.map_at_r);
                if rep.queries_without_class_in_db > 0 {
                    eprintln!(
                        "{} queries have no class in the DB and were not scored",
                        rep.queries_without_class_in_db
                    );
                }
                if rep.skipped_images > 0 {
                    eprintln!(
                        "{} query images could not be read (listed above)",
                        rep.skipped_images
                    );
                }
            }
        }
        Cmd::Classify {
            data,
            imagenet_wnids,
            size,
            batch,
            split,
            weights,
        } => {
            let ds = Dataset::open(&data, split.into())?;
            let emb = Embedder::pretrained(weights.as_deref(), size, false)?;
            let r = eval::imagenet_top1(&emb, &ds, &imagenet_wnids, batch)?;
            println!(
                "ImageNet top-1 restricted to {} classes at {} px: {:.4} ({} of {} images)",
                ds.classes.len(),
                r.size,
                r.top1,
                r.correct,
                r.images
            );
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
