//! The commands other than `train`: each calls the library and prints what it did.

use super::demo;
use super::{
    ClassifyArgs, DemoArgs, EmbedArgs, EvalArgs, QueryArgs, SampleArgs, ServeArgs, WeightsArgs,
    WeightsCmd,
};
use anyhow::{Result, bail};
use deeprank::data::collection::{Collection, Labels};
use deeprank::data::dataset::{Dataset, Split};
use deeprank::data::sampler;
use deeprank::data::skipped::Skipped;
use deeprank::data::walk;
use deeprank::infer::embedder::{Embedder, ModelSpec};
use deeprank::model::lite::Backbone;
use deeprank::model::weights;
use deeprank::render::grid;
use deeprank::search::ann::db as ann_db;
use deeprank::search::{eval, query};
use deeprank::store::build::embed_collection;
use deeprank::store::db::Db;

fn report_left_out(left_out: &[Skipped]) {
    if !left_out.is_empty() {
        eprintln!(
            "note: {} files left out: {}",
            left_out.len(),
            walk::summarise(left_out)
        );
    }
}

/// `deeprank weights fetch|path`: prints where the weights are.
pub fn weights(a: WeightsArgs) -> Result<()> {
    match a.cmd {
        WeightsCmd::Fetch => println!("{}", weights::fetch(a.backbone.into())?.display()),
        WeightsCmd::Path => println!("{}", weights::default_path(a.backbone.into()).display()),
    }
    Ok(())
}

/// `deeprank demo`.
pub fn demo(a: DemoArgs) -> Result<()> {
    demo::run(&demo::DemoOptions {
        data: a.data,
        out: a.out,
        size: a.size,
        queries: a.queries,
        top: a.top,
        batch: a.batch,
        weights: a.weights,
        train_epochs: a.train_epochs,
    })?;
    Ok(())
}

/// `deeprank sample`: writes the triplets and says how many.
pub fn sample(a: SampleArgs) -> Result<()> {
    let SampleArgs {
        data,
        labels,
        out,
        n_pos,
        n_neg,
        seed,
    } = a;
    let t0 = std::time::Instant::now();
    let ds = Dataset::open_labelled(&data, Split::Train, &Labels::parse(&labels))?;
    report_left_out(&ds.ignored);
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
    Ok(())
}

/// `deeprank embed`: embeds a dataset into a DB and reports the speed.
pub fn embed(a: EmbedArgs) -> Result<()> {
    if let Some(url) = super::pg::url(&a.out) {
        let url = url.to_string();
        return super::pg::embed(a, &url);
    }
    if a.worker.is_some() {
        bail!(
            "--worker splits a tree between machines filling one store: it needs --out postgres://…"
        );
    }
    let EmbedArgs {
        data,
        labels,
        out,
        model,
        size,
        text,
        batch,
        no_normalize,
        split,
        weights,
        worker: _,
        commit_every: _,
        backbone,
    } = a;
    let spec = ModelSpec::parse(&model)?.with_backbone(backbone.map(Into::into))?;
    let c = Collection::open(&data, split.into(), &Labels::parse(&labels))?;
    report_left_out(&c.left_out);
    eprintln!("{}", c.summary());
    if !c.is_labelled() {
        eprintln!(
            "note: no labels ({}): query, serve and duplicates work; eval and train need classes",
            c.unlabelled_because.as_deref().unwrap_or("--labels none")
        );
    }
    let emb = Embedder::from_spec(&spec, weights.as_deref(), size, !no_normalize)?;
    let rep = embed_collection(&emb, &c, &out, text.as_deref(), batch)?;
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
    Ok(())
}

/// `deeprank query`: the results as a table or JSON, and the grids.
pub fn query(a: QueryArgs) -> Result<()> {
    let (results, labelled) = match super::pg::url(&a.db) {
        Some(url) => {
            let r = super::pg::query(&a, url)?;
            (r, true)
        }
        None => {
            if a.allow_partial {
                bail!("--allow-partial is for a sharded PostgreSQL store (--db postgres://…)");
            }
            let db = Db::open(&a.db)?;
            let emb = query::embedder_for_db(&db, a.model.as_deref(), a.weights.as_deref())?;
            let (mode, index) = a.search.open(&db)?;
            let wheres = super::index::wheres(&a.wheres)?;
            let mask = (!wheres.is_empty()).then(|| ann_db::mask(&db, &wheres));
            let req = ann_db::Request {
                mode,
                mask: mask.as_deref(),
                exclude: None,
            };
            let (results, plan) =
                query::query_with(&db, index.as_ref(), &req, &emb, &a.images, a.top)?;
            super::index::say_plan(plan);
            (results, db.is_labelled())
        }
    };
    let QueryArgs {
        json,
        grid: grid_out,
        ..
    } = a;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for q in &results {
            match &q.class_id {
                Some(c) => println!("query {} (class {c})", q.image.display()),
                None if labelled => println!("query {} (class ?)", q.image.display()),
                None => println!("query {} (the DB has no labels)", q.image.display()),
            }
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
            grid::write(&q.grid(), &path)?;
            eprintln!("grid: {}", path.display());
        }
    }
    Ok(())
}

/// `deeprank eval`: the metrics as a table or JSON.
pub fn eval(a: EvalArgs) -> Result<()> {
    let ks = eval::parse_ks(&a.k)?;
    let snapshot = super::pg::url(&a.db).map(super::pg::snapshot).transpose()?;
    let opened;
    let db = match &snapshot {
        Some(s) => &s.db,
        None => {
            opened = Db::open(&a.db)?;
            &opened
        }
    };
    let ds = Dataset::open_labelled(&a.queries, Split::Val, &Labels::parse(&a.labels))
        .map_err(|e| e.context("eval needs labelled query images"))?;
    eprintln!("queries: {}", ds.summary());
    let emb = query::embedder_for_db(db, a.model.as_deref(), a.weights.as_deref())?;
    let (mode, index) = a.search.open(db)?;
    let wheres = super::index::wheres(&a.wheres)?;
    let mask = (!wheres.is_empty()).then(|| ann_db::mask(db, &wheres));
    let req = ann_db::Request {
        mode,
        mask: mask.as_deref(),
        exclude: None,
    };
    let (rep, plan) = eval::evaluate_with(&emb, db, &ds, &ks, a.batch, index.as_ref(), &req)?;
    super::index::say_plan(plan);
    if a.json {
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
    Ok(())
}

/// `deeprank serve`: checks the limits, then serves until Ctrl-C on `threads` runtime threads
/// (`--threads`; default: all cores).
pub fn serve(a: ServeArgs, threads: Option<usize>) -> Result<()> {
    let ServeArgs {
        db,
        model,
        addr,
        max_upload_mb,
        max_megapixels,
        queue,
        max_batch,
        batch_wait_ms,
        weights,
        writable,
        api_key,
        reload_ms,
        search,
        uploads,
        allow_partial,
        backbone,
    } = a;
    if !(max_upload_mb > 0.0 && max_megapixels > 0.0) || max_batch == 0 {
        bail!("--max-upload-mb, --max-megapixels and --max-batch must be positive");
    }
    let model = super::model_choice(model.as_deref(), backbone)?;
    let defaults = deeprank::serve::ServeOptions::default();
    let opts = deeprank::serve::ServeOptions {
        addr,
        max_upload: (max_upload_mb * 1048576.0) as usize,
        max_pixels: (max_megapixels * 1e6) as u64,
        queue,
        max_batch,
        batch_wait: std::time::Duration::from_millis(batch_wait_ms),
        threads: threads.unwrap_or(defaults.threads),
        writable,
        api_key: api_key.or_else(|| std::env::var("DEEPRANK_API_KEY").ok()),
        reload_every: std::time::Duration::from_millis(reload_ms),
        ..defaults
    };
    if let Some(url) = super::pg::url(&db) {
        return super::pg::serve(
            url,
            model.as_deref(),
            weights.as_deref(),
            opts,
            &search,
            allow_partial,
            uploads,
        );
    }
    if allow_partial || uploads.is_some() {
        bail!(
            "--allow-partial and --uploads are for a PostgreSQL store (--db postgres://…); \
             a DB folder keeps uploads in DB/uploads/"
        );
    }
    let opts = deeprank::serve::ServeOptions {
        search: search.mode()?,
        ..opts
    };
    let db = Db::open(&db)?;
    let emb = query::embedder_for_db(&db, model.as_deref(), weights.as_deref())?;
    deeprank::serve::serve(db, emb, opts)?;
    Ok(())
}

/// `deeprank classify`: the ImageNet top-1 check.
pub fn classify(a: ClassifyArgs) -> Result<()> {
    let ClassifyArgs {
        data,
        imagenet_wnids,
        size,
        batch,
        split,
        weights,
        backbone,
    } = a;
    let backbone: Backbone = backbone.into();
    let ds = Dataset::open(&data, split.into())?;
    let size = size.unwrap_or(backbone.native_size());
    let emb = Embedder::pretrained_backbone(backbone, weights.as_deref(), size, false)?;
    let r = eval::imagenet_top1(&emb, &ds, &imagenet_wnids, batch)?;
    println!(
        "{} ImageNet top-1 restricted to {} classes at {} px: {:.4} ({} of {} images)",
        backbone.title(),
        ds.classes.len(),
        r.size,
        r.top1,
        r.correct,
        r.images
    );
    Ok(())
}
