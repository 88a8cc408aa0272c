//! `deeprank demo`: fetch the weights, embed the bundled Tiny ImageNet sample, evaluate and query
//! it with the pretrained features; then train the ranking head briefly on the same sample and
//! show the trained model beside the pretrained one (P@k, the same query grids, the training
//! plot) in `report.md`.

use anyhow::{Context, Result};
use deeprank::data::dataset::{Dataset, Split};
use deeprank::infer::embedder::Embedder;
use deeprank::model::lite::Backbone;
use deeprank::model::weights;
use deeprank::render::grid;
use deeprank::search::eval::{EvalReport, evaluate};
use deeprank::search::query::{self, QueryResult};
use deeprank::store::build::embed_dataset;
use deeprank::store::db::Db;
use deeprank::train::config::{Recipe, TrainConfig};
use deeprank::train::report::{EpochMetrics, PLOT};
use deeprank::train::{RunOptions, train};
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
    /// Epochs of the short training run (0: pretrained features only).
    pub train_epochs: usize,
}

/// The k of the P@k table.
const KS: [usize; 4] = [1, 5, 10, 30];

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

/// One model's retrieval on the sample: its DB, its metrics, its answers to the picked queries.
struct Retrieval {
    db: Db,
    eval: EvalReport,
    results: Vec<QueryResult>,
}

fn retrieval(
    emb: &Embedder,
    train: &Dataset,
    val: &Dataset,
    picked: &[PathBuf],
    db_dir: &Path,
    opts: &DemoOptions,
) -> Result<Retrieval> {
    let rep = embed_dataset(emb, train, db_dir, None, opts.batch)?;
    eprintln!(
        "embedded {} images in {:.1}s ({:.1} img/s)",
        rep.count,
        rep.seconds,
        rep.count as f64 / rep.seconds
    );
    let db = Db::open(&rep.db)?;
    let eval = evaluate(emb, &db, val, &KS, opts.batch)?;
    let results = query::query(&db, emb, picked, opts.top)?;
    Ok(Retrieval { db, eval, results })
}

/// The short training run: deeprank's default recipe (frozen backbone, cached pooled features,
/// a 128-d head, semi-hard mining) at the demo's size, validated on the sample's held-out images.
fn train_config(data: &Path, wpath: &Path, opts: &DemoOptions) -> TrainConfig {
    let mut c = TrainConfig::recipe(Recipe::Default, data.to_path_buf());
    c.size = opts.size;
    c.val = Some(data.to_path_buf());
    c.weights = Some(wpath.to_path_buf());
    c.epochs = opts.train_epochs;
    // 10 classes x 4 images per step; two cached views (plain + one crop/flip) per image.
    c.batch = 40;
    c.views = 2;
    c.steps_per_epoch = Some(10);
    c.save_every = 0;
    c
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
        None => weights::fetch(Backbone::Lite0)?,
    };
    eprintln!("weights: {}", wpath.display());
    let train_ds = Dataset::open(&data, Split::Train)?;
    let val = Dataset::open(&data, Split::Val)?;
    eprintln!("database: {}", train_ds.summary());
    eprintln!("queries:  {}", val.summary());
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let picked = pick_queries(&val, opts.queries);

    let emb = Embedder::pretrained(Some(&wpath), opts.size, true)?;
    let pre = retrieval(&emb, &train_ds, &val, &picked, &opts.out.join("db"), opts)?;

    let trained = if opts.train_epochs > 0 {
        let t_train = std::time::Instant::now();
        let run_dir = opts.out.join("run");
        let cfg = train_config(&data, &wpath, opts);
        // The demo's run folder is its own: a new demo starts it over.
        let s = train(
            cfg,
            &RunOptions {
                run_dir: run_dir.clone(),
                resume: false,
                force: true,
            },
        )?;
        let secs = t_train.elapsed().as_secs_f64();
        let emb = Embedder::trained(&run_dir, Some(opts.size))?;
        let r = retrieval(
            &emb,
            &train_ds,
            &val,
            &picked,
            &opts.out.join("db-trained"),
            opts,
        )?;
        Some((r, s.history, run_dir, secs))
    } else {
        None
    };

    let mut report = String::new();
    writeln!(report, "# deeprank demo\n")?;
    writeln!(
        report,
        "Database: {} images of {} classes from `{}`; queries: {} held-out images; {} px.\n",
        pre.db.len(),
        train_ds.classes.len(),
        data.display(),
        pre.eval.metrics.queries,
        opts.size
    )?;
    writeln!(
        report,
        "- **pretrained**: EfficientNet-Lite0 with ImageNet weights, pooled 1280-d features, L2-normalised."
    )?;
    if let Some((_, history, _, secs)) = &trained {
        let steps: usize = history.iter().map(|h| h.steps).sum();
        writeln!(
            report,
            "- **trained**: the same backbone, frozen, with a 128-d ranking head trained on the database \
             images for {} epochs ({steps} steps of 10 classes x 4 images, semi-hard triplets, Adam) \
             in {secs:.1}s: deeprank's default recipe on cached features.",
            history.len()
        )?;
    }
    writeln!(report)?;
    metrics_table(&mut report, &pre.eval, trained.as_ref().map(|t| &t.0.eval))?;
    if let Some((t, ..)) = &trained {
        recall_note(&mut report, &pre.eval, &t.eval)?;
    }
    if let Some((_, history, run_dir, _)) = &trained {
        training_section(&mut report, history, run_dir, &opts.out)?;
    }
    let mut grids = Vec::new();
    for (i, q) in pre.results.iter().enumerate() {
        writeln!(
            report,
            "## Query {}: {} ({})\n",
            i + 1,
            q.image.display(),
            q.class_name.as_deref().unwrap_or("?"),
        )?;
        let mut shown = vec![("pretrained", q)];
        if let Some((t, ..)) = &trained {
            shown.push(("trained", &t.results[i]));
        }
        for (name, q) in shown {
            let g = opts.out.join(format!("query-{}-{name}.png", i + 1));
            grid::write(&q.grid(), &g)?;
            let same = q
                .results
                .iter()
                .filter(|r| r.same_class == Some(true))
                .count();
            writeln!(
                report,
                "**{name}**: {same} of the top {} share its class.\n\n![query {} {name}]({})\n",
                q.results.len(),
                i + 1,
                g.file_name().unwrap_or_default().to_string_lossy(),
            )?;
            grids.push(g);
        }
    }
    writeln!(report, "Total time: {:.1}s.", t0.elapsed().as_secs_f64())?;
    let rpath = opts.out.join("report.md");
    std::fs::write(&rpath, &report)?;
    let line = |name: &str, e: &EvalReport| {
        println!(
            "{name:<10} P@1 {:.3}  P@10 {:.3}  P@30 {:.3}  MAP@R {:.3} over {} queries",
            e.metrics.precision_at_k[&1],
            e.metrics.precision_at_k[&10],
            e.metrics.precision_at_k[&30],
            e.metrics.map_at_r,
            e.metrics.queries
        )
    };
    line("pretrained", &pre.eval);
    if let Some((t, ..)) = &trained {
        line("trained", &t.eval);
    }
    for g in &grids {
        println!("grid:   {}", g.display());
    }
    println!("db:     {}", pre.db.dir.display());
    if let Some((t, _, run_dir, _)) = &trained {
        println!("db:     {}", t.db.dir.display());
        println!("run:    {}", run_dir.display());
    }
    println!("report: {}", rpath.display());
    Ok(rpath)
}

/// P@k, Recall@k and MAP@R: one column per model.
fn metrics_table(out: &mut String, pre: &EvalReport, trained: Option<&EvalReport>) -> Result<()> {
    let cols: Vec<&EvalReport> = std::iter::once(pre).chain(trained).collect();
    let head = if trained.is_some() {
        "| metric | pretrained | trained |\n|---|---|---|"
    } else {
        "| metric | pretrained |\n|---|---|"
    };
    writeln!(out, "{head}")?;
    let row = |out: &mut String, name: String, f: &dyn Fn(&EvalReport) -> f64| -> Result<()> {
        let vals: Vec<String> = cols.iter().map(|e| format!("{:.3}", f(e))).collect();
        writeln!(out, "| {name} | {} |", vals.join(" | "))?;
        Ok(())
    };
    for k in KS {
        row(out, format!("P@{k}"), &|e| e.metrics.precision_at_k[&k])?;
    }
    for k in KS {
        row(out, format!("Recall@{k}"), &|e| e.metrics.recall_at_k[&k])?;
    }
    row(out, "MAP@R".into(), &|e| e.metrics.map_at_r)?;
    writeln!(out)?;
    Ok(())
}

/// Says so when the trained model's Recall@k falls below the pretrained one's: a query that the
/// trained head puts in another class's tight cluster finds no image of its own class at all.
fn recall_note(out: &mut String, pre: &EvalReport, trained: &EvalReport) -> Result<()> {
    let worse: Vec<String> = KS
        .iter()
        .filter(|k| trained.metrics.recall_at_k[k] < pre.metrics.recall_at_k[k])
        .map(|k| format!("@{k}"))
        .collect();
    if worse.is_empty() {
        return Ok(());
    }
    let kmax = KS[KS.len() - 1];
    let missed = |e: &EvalReport| {
        ((1.0 - e.metrics.recall_at_k[&kmax]) * e.metrics.queries as f64).round() as usize
    };
    writeln!(
        out,
        "Recall{} is lower after training: the trained head packs each class into a tight cluster, \
         so a query it places in another class's cluster finds no image of its own class even in \
         the top {kmax} ({} queries trained, {} pretrained), while precision rises for the others.\n",
        worse.join(", Recall"),
        missed(trained),
        missed(pre)
    )?;
    Ok(())
}

/// The training plot and its numbers per epoch.
fn training_section(
    out: &mut String,
    history: &[EpochMetrics],
    run_dir: &Path,
    demo_dir: &Path,
) -> Result<()> {
    let plot = run_dir.join(PLOT);
    let rel = plot.strip_prefix(demo_dir).unwrap_or(&plot);
    writeln!(
        out,
        "## Training\n\nLoss and validation P@30 per epoch (the held-out queries against the \
         database, as above):\n\n![training plot]({})\n",
        rel.display()
    )?;
    writeln!(
        out,
        "| epoch | loss | val P@30 | val MAP@R |\n|---|---|---|---|"
    )?;
    let o = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.3}"));
    for h in history {
        writeln!(
            out,
            "| {} | {:.4} | {} | {} |",
            h.epoch,
            h.mean_loss,
            o(h.p_at_30),
            o(h.map_at_r)
        )?;
    }
    writeln!(out)?;
    Ok(())
}
