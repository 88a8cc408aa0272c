//! The commands on a PostgreSQL store (`--db postgres://…`): each command checks [`url`] first
//! and hands over here; `index` and `store init` too. Calls `deeprank::store::pg` and
//! `deeprank::search::pg`, prints what they did.

use super::changes::{AddArgs, RemoveArgs};
use super::{EmbedArgs, QueryArgs};
use anyhow::{Result, bail};
use deeprank::data::collection::{Collection, Labels};
use deeprank::infer::embedder::{Embedder, ModelSpec};
use deeprank::search::pg as search_pg;
use deeprank::store::build::collection_entries;
use deeprank::store::changes::{class_of, normalize};
use deeprank::store::db::Entry;
use deeprank::store::db::escape_path;
use deeprank::store::pg::embed::{PgReport, Snapshot, Worker, embed_entries, store_meta};
use deeprank::store::pg::write::RemoveTarget;
use deeprank::store::pg::{
    Filter, Iterative, PgStore, ShardOptions, init_sharded, is_store_url, redact,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The store URL a `--db`/`--out` names, when it names one.
pub fn url(p: &Path) -> Option<&str> {
    p.to_str().filter(|s| is_store_url(s))
}

/// The commands that work on a DB folder only refuse a store URL, saying so.
pub fn refuse(db: &Path, command: &str) -> Result<()> {
    if url(db).is_some() {
        bail!(
            "{command} works on a DB folder; it is not implemented for a PostgreSQL store \
             (embed, add, remove, sync, query, eval, duplicates, index and serve take --db postgres://…)"
        );
    }
    Ok(())
}

/// `--where class=ID` / `--where path=PREFIX` (repeatable, all must hold).
pub fn parse_where(w: &[String]) -> Result<Filter> {
    let mut f = Filter::default();
    for c in w {
        match c.split_once('=') {
            Some(("class", v)) => f.class = Some(v.to_string()),
            Some(("path", v)) => f.path_prefix = Some(v.to_string()),
            _ => bail!("--where {c:?}: expected class=ID or path=PREFIX"),
        }
    }
    Ok(f)
}

fn report(rep: &PgReport, store: &mut PgStore, verb: &str) -> Result<()> {
    if !rep.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable images (listed above)",
            rep.skipped.len()
        );
    }
    let rate = rep.added as f64 / rep.seconds.max(1e-9);
    println!(
        "{verb}: {} added, {} stored already, {} duplicates of this run, {} for other workers, {} unreadable; \
         {} rows in {} after {:.2}s ({rate:.1} added/s)",
        rep.added,
        rep.stored,
        rep.duplicates,
        rep.other_workers,
        rep.skipped.len(),
        store.count()?,
        store.url().url,
        rep.seconds
    );
    Ok(())
}

/// `deeprank embed --out postgres://…`: creates the collection (or checks its model) and embeds
/// what it does not hold yet (this worker's part with `--worker i/N`).
pub fn embed(a: EmbedArgs, url: &str) -> Result<()> {
    if a.text.is_some() {
        bail!("--text writes a file beside a DB folder; it is not available with a store URL");
    }
    let worker = a.worker.as_deref().map(Worker::parse).transpose()?;
    let spec = ModelSpec::parse(&a.model)?.with_backbone(a.backbone.map(Into::into))?;
    let c = Collection::open(&a.data, a.split.into(), &Labels::parse(&a.labels))?;
    eprintln!("{}", c.summary());
    let emb = Embedder::from_spec(&spec, a.weights.as_deref(), a.size, !a.no_normalize)?;
    let mut store = PgStore::create(url, &store_meta(&emb, &c.root)?)?;
    let rep = embed_entries(
        &mut store,
        &emb,
        &collection_entries(&c),
        &c.root,
        worker,
        a.batch,
        a.commit_every,
    )?;
    report(&rep, &mut store, "embed")
}

/// `deeprank add --db postgres://…`: files and folders, embedded with the store's model.
pub fn add(a: AddArgs, url: &str) -> Result<()> {
    let mut store = PgStore::open(url, None)?;
    let emb = search_pg::embedder_for_store(
        &store,
        a.embed.model.as_deref(),
        a.embed.weights.as_deref(),
    )?;
    // A file in a folder named as one of the store's classes gets that class (as a DB folder's add).
    let known: HashMap<String, String> = store.classes()?.into_iter().collect();
    let mut entries = Vec::new();
    for p in &a.paths {
        let files = if p.is_dir() {
            deeprank::data::walk::walk(p, &|_| false)?.images
        } else if p.is_file() {
            vec![p.clone()]
        } else {
            bail!(
                "{} does not exist (or is not a file or folder): nothing was added",
                p.display()
            );
        };
        entries.extend(files.into_iter().map(|f| {
            let (class_id, class_name) = class_of(&f, &known);
            Entry {
                path: normalize(&f),
                class_id,
                class_name,
            }
        }));
    }
    let rep = embed_entries(
        &mut store,
        &emb,
        &entries,
        Path::new(""),
        None,
        a.embed.batch,
        a.embed.commit_every,
    )?;
    report(&rep, &mut store, "add")
}

/// `deeprank sync --db postgres://… --data ROOT`: the store's rows under ROOT made to match it.
pub fn sync(
    url: &str,
    data: &Path,
    opts: &deeprank::store::changes::Options,
    model: &Option<String>,
    weights: &Option<PathBuf>,
) -> Result<deeprank::store::changes::Report> {
    let mut store = PgStore::open(url, None)?;
    deeprank::store::pg::sync::sync(&mut store, data, opts, &mut |st| {
        search_pg::embedder_for_store(st, model.as_deref(), weights.as_deref())
    })
}

/// `deeprank remove --db postgres://…`: by id, file path or folder; every target must match.
pub fn remove(a: RemoveArgs, url: &str) -> Result<()> {
    let mut store = PgStore::open(url, None)?;
    // A path matches as given and made absolute (stored paths are as `embed --data` or `add` saw them).
    let targets: Vec<RemoveTarget> = a
        .targets
        .iter()
        .map(|t| {
            let mut r = RemoveTarget {
                given: t.clone(),
                ids: t.parse::<i64>().into_iter().collect(),
                ..RemoveTarget::default()
            };
            for p in [PathBuf::from(t), normalize(Path::new(t))] {
                let s = escape_path(&p);
                r.prefixes.push(format!("{}/", s.trim_end_matches('/')));
                r.paths.push(s);
            }
            r
        })
        .collect();
    let gone = store.remove(&targets)?;
    if a.json {
        let rows: Vec<_> = gone
            .iter()
            .map(|(id, p)| serde_json::json!({"id": id, "path": p}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"removed": rows}))?
        );
    } else {
        for (id, p) in &gone {
            eprintln!("removed {id} {p}");
        }
        println!(
            "remove: {} removed; {} rows in {}",
            gone.len(),
            store.count()?,
            store.url().url
        );
    }
    Ok(())
}

/// `deeprank query --db postgres://…`.
pub fn query(a: &QueryArgs, url: &str) -> Result<Vec<deeprank::search::query::QueryResult>> {
    let mut store = PgStore::open(url, None)?;
    let emb = search_pg::embedder_for_store(&store, a.model.as_deref(), a.weights.as_deref())?;
    let mode = search_mode(&store, &a.search, url)?;
    let filter = parse_where(&a.wheres)?;
    let (results, missing) = search_pg::query(
        &mut store,
        &emb,
        &a.images,
        a.top,
        mode,
        &filter,
        a.allow_partial,
    )?;
    for s in &missing {
        eprintln!(
            "warning: partial results: shard {} ({}) could not be reached and was left out",
            s.partition,
            redact(&s.url)
        );
    }
    Ok(results)
}

/// `deeprank serve --db postgres://…`.
pub fn serve(
    url: &str,
    model: Option<&str>,
    weights: Option<&Path>,
    opts: deeprank::serve::ServeOptions,
    search: &super::index::SearchFlags,
    allow_partial: bool,
    uploads: Option<PathBuf>,
) -> Result<()> {
    let store = PgStore::open(url, None)?;
    let emb = search_pg::embedder_for_store(&store, model, weights)?;
    let mode = search_mode(&store, search, url)?;
    let store_opts = deeprank::serve::StoreServeOptions {
        mode,
        allow_partial,
        uploads,
    };
    deeprank::serve::serve_store(store, emb, opts, store_opts)
}

/// `--exact`/`--ef` for a store (`--recall` is the local index's).
fn search_mode(
    store: &PgStore,
    s: &super::index::SearchFlags,
    url: &str,
) -> Result<deeprank::store::pg::Mode> {
    if s.ef == Some(0) {
        bail!("--ef must be at least 1");
    }
    if s.recall.is_some() {
        bail!(
            "--recall needs the calibration of deeprank's own index; with a PostgreSQL store use --ef or --exact"
        );
    }
    if store.is_sharded() && s.ef.is_some() {
        bail!(
            "on a sharded store ef_search is the shards' setting, not a query's: \
             set it with `deeprank index --db {url} --ef N`"
        );
    }
    Ok(search_pg::mode_for(store, s.exact, s.ef.map(|e| e as u32)))
}

/// The rows of a store in a temporary DB folder (for `eval` and `duplicates`).
pub fn snapshot(url: &str) -> Result<Snapshot> {
    let mut store = PgStore::open(url, None)?;
    let t0 = std::time::Instant::now();
    let snap = Snapshot::take(&mut store, &std::env::temp_dir())?;
    eprintln!(
        "read {} rows of {} in {:.1}s",
        snap.db.len(),
        url,
        t0.elapsed().as_secs_f64()
    );
    Ok(snap)
}

/// `deeprank index --db postgres://…`: pgvector's HNSW index (on every shard when sharded).
pub fn index(url: &str, m: usize, ef_construction: usize, ef: Option<usize>) -> Result<()> {
    let mut store = PgStore::open(url, None)?;
    let ef = ef.map_or(search_pg::DEFAULT_EF, |e| e as u32);
    let (m, efc) = (m as u32, ef_construction as u32);
    let t0 = std::time::Instant::now();
    store.create_index(m, efc)?;
    if store.is_sharded() {
        store.set_shard_search(ef, Iterative::Relaxed)?;
    }
    store.set_info(
        search_pg::HNSW_INFO,
        serde_json::json!({"m": m, "ef_construction": efc, "ef_search": ef}),
    )?;
    println!(
        "index: HNSW (m {}, ef_construction {}) on {}{} in {:.1}s; queries use ef_search {ef} (--exact for exact)",
        m,
        efc,
        store.url().url,
        if store.is_sharded() {
            format!(" ({} shards)", store.shards().len())
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    cmd: StoreCmd,
}

#[derive(clap::Subcommand)]
pub enum StoreCmd {
    /// Creates a collection hash-partitioned over shard servers (postgres_fdw) on a coordinator.
    Init(InitArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// The coordinator: postgres://user@host:port/db?table=NAME.
    #[arg(long)]
    db: String,
    /// The shard servers, comma-separated postgres:// URLs (the same table name is used).
    #[arg(long, value_delimiter = ',', required = true)]
    shards: Vec<String>,
    /// The model the collection will hold (its identity is recorded now).
    #[arg(long, default_value = "pretrained")]
    model: String,
    /// The pretrained network (lite0 unless given; a run's must match it).
    #[arg(long, value_enum)]
    backbone: Option<super::BackboneArg>,
    #[arg(long)]
    size: Option<u32>,
    #[arg(long)]
    no_normalize: bool,
    #[arg(long)]
    weights: Option<PathBuf>,
}

/// `deeprank store init`.
pub fn store(a: StoreArgs) -> Result<()> {
    let StoreCmd::Init(a) = a.cmd;
    let spec = ModelSpec::parse(&a.model)?.with_backbone(a.backbone.map(Into::into))?;
    let emb = Embedder::from_spec(&spec, a.weights.as_deref(), a.size, !a.no_normalize)?;
    let shards: Vec<&str> = a.shards.iter().map(String::as_str).collect();
    let store = init_sharded(
        &a.db,
        &shards,
        &store_meta(&emb, Path::new(""))?,
        &ShardOptions::default(),
    )?;
    println!(
        "store init: {} over {} shards ({}); embed, add, query and index through the coordinator",
        store.url().url,
        store.shards().len(),
        store
            .shards()
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
