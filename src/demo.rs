//! `deeprank demo`: fetch the weights, embed the bundled Tiny ImageNet sample, evaluate, query a few
//! images and write result grids and a short report.

use crate::data::dataset::{Dataset, Split};
use crate::infer::embedder::Embedder;
use crate::model::weights;
use crate::render::grid;
use crate::search::eval::evaluate;
use crate::search::query;
use crate::store::build::embed_dataset;
use crate::store::db::Db;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The sample bundled with the repository (`data/sample`), looked up from the working directory
/// first, then from the source tree the binary was built from.
pub fn bundled_sample() -> Result<PathBuf> {
    let local = PathBuf::from("data/sample");
    if local.join("wnids.txt").is_file() {
        return Ok(local);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample");
    if built.join("wnids.txt").is_file() {
        return Ok(built);
    }
    anyhow::bail!(
        "the bundled sample (data/sample) was not found: run the demo from the repository root, or pass --data DIR"
    )
}

pub struct DemoOptions {
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    pub size: u32,
    pub queries: usize,
    pub top: usize,
    pub batch: usize,
    pub weights: Option<PathBuf>,
}

/// One query per class, the first val image of each, up to `n`.
fn pick_queries(val: &Dataset, n: usize) -> Vec<PathBuf> {
    let mut picked = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for it in &val.items {
        if picked.len() >= n {
            break;
        }
        if seen.insert(it.class) {
            picked.push(it.path.clone());
        }
    }
    picked
}

/// Runs the demo; returns the path of the report.
pub fn run(opts: &DemoOptions) -> Result<PathBuf> {
    let t0 = std::time::Instant::now();
    let data = match &opts.data {
        Some(d) => d.clone(),
        None => bundled_sample()?,
    };
    let wpath = match &opts.weights {
        Some(w) => w.clone(),
        None => weights::fetch()?,
    };
    eprintln!("weights: {}", wpath.display());
    let train = Dataset::open(&data, Split::Train)?;
    let val = Dataset::open(&data, Split::Val)?;
    eprintln!("database: {}", train.summary());
    eprintln!("queries:  {}", val.summary());
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let emb = Embedder::pretrained(Some(&wpath), opts.size, true)?;
    let rep = embed_dataset(&emb, &train, &opts.out.join("db"), None, opts.batch)?;
    eprintln!(
        "embedded {} images in {:.1}s ({:.1} img/s)",
        rep.count,
        rep.seconds,
        rep.count as f64 / rep.seconds
    );
    let db = Db::open(&rep.db)?;
    let ks = [1, 5, 10];
    let ev = evaluate(&emb, &db, &val, &ks, opts.batch)?;

    let picked = pick_queries(&val, opts.queries);
    let results = query::query(&db, &emb, &picked, opts.top)?;
    let mut report = String::new();
    writeln!(report, "# deeprank demo\n")?;
    writeln!(
        report,
        "Model: EfficientNet-Lite0, ImageNet weights, pooled 1280-d features, L2-normalised, {} px.",
        opts.size
    )?;
    writeln!(
        report,
        "Database: {} images of {} classes from `{}`; queries: {} held-out images.\n",
        db.len(),
        train.classes.len(),
        data.display(),
        ev.metrics.queries
    )?;
    writeln!(report, "| metric | value |\n|---|---|")?;
    for (k, v) in &ev.metrics.precision_at_k {
        writeln!(report, "| P@{k} | {v:.3} |")?;
    }
    for (k, v) in &ev.metrics.recall_at_k {
        writeln!(report, "| Recall@{k} | {v:.3} |")?;
    }
    writeln!(report, "| MAP@R | {:.3} |\n", ev.metrics.map_at_r)?;
    let mut grids = Vec::new();
    for (i, q) in results.iter().enumerate() {
        let g = opts.out.join(format!("query-{}.png", i + 1));
        grid::write(&q.grid(), &g)?;
        let same = q
            .results
            .iter()
            .filter(|r| r.same_class == Some(true))
            .count();
        writeln!(
            report,
            "## Query {}: {} ({})\n\n![query {}]({})\n\n{} of the top {} share its class.\n",
            i + 1,
            q.image.display(),
            q.class_name.as_deref().unwrap_or("?"),
            i + 1,
            g.file_name().unwrap_or_default().to_string_lossy(),
            same,
            q.results.len()
        )?;
        grids.push(g);
    }
    writeln!(report, "Total time: {:.1}s.", t0.elapsed().as_secs_f64())?;
    let rpath = opts.out.join("report.md");
    std::fs::write(&rpath, &report)?;
    println!(
        "P@1 {:.3}  P@10 {:.3}  MAP@R {:.3} over {} queries",
        ev.metrics.precision_at_k[&1],
        ev.metrics.precision_at_k[&10],
        ev.metrics.map_at_r,
        ev.metrics.queries
    );
    for g in &grids {
        println!("grid:   {}", g.display());
    }
    println!("db:     {}", db.dir.display());
    println!("report: {}", rpath.display());
    Ok(rpath)
}
