//! The commands that change a DB in place (`add`, `remove`, `sync`, `compact`) and `check`: each
//! calls `deeprank::store` and prints what it did.

use anyhow::{Result, bail};
use deeprank::search::ann::db as ann_db;
use deeprank::search::query;
use deeprank::store::changes::{self, Options, Report};
use deeprank::store::check::check as check_db;
use deeprank::store::db::Db;
use deeprank::store::db::escape_path;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct AddArgs {
    #[arg(long)]
    db: PathBuf,
    /// Image files and folders (searched recursively for .jpg/.jpeg/.png).
    #[arg(required = true, num_args = 1..)]
    pub(super) paths: Vec<PathBuf>,
    #[command(flatten)]
    pub(super) embed: EmbedFlags,
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    #[arg(long)]
    db: PathBuf,
    /// Ids (as query/serve show them), file paths, or folders (every row under it).
    #[arg(required = true, num_args = 1..)]
    pub(super) targets: Vec<String>,
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(clap::Args)]
pub struct SyncArgs {
    #[arg(long)]
    db: PathBuf,
    /// The folder tree the DB's rows under it must match.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    embed: EmbedFlags,
}

#[derive(clap::Args)]
pub struct DbArgs {
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct EmbedFlags {
    #[arg(long, default_value_t = 64)]
    pub(super) batch: usize,
    /// Rows per commit (a crash loses at most the chunk being embedded).
    #[arg(long, default_value_t = 1000)]
    pub(super) commit_every: usize,
    /// Model to embed with (must be the DB's; default: the DB's).
    #[arg(long)]
    pub(super) model: Option<String>,
    #[arg(long)]
    pub(super) weights: Option<PathBuf>,
    /// Prints the report as JSON.
    #[arg(long)]
    json: bool,
}

impl EmbedFlags {
    fn options(&self) -> Result<Options> {
        if self.batch == 0 || self.commit_every == 0 {
            bail!("--batch and --commit-every must be at least 1");
        }
        Ok(Options {
            batch: self.batch,
            commit_every: self.commit_every,
        })
    }
}

/// A path for JSON: as it is when UTF-8, else in the manifest's escaped form.
fn text(p: &Path) -> String {
    p.to_str()
        .map(str::to_string)
        .unwrap_or_else(|| escape_path(p))
}

fn print(rep: &Report, json: bool, verb: &str) -> Result<()> {
    if json {
        let rows = |v: &[(u64, PathBuf)]| {
            v.iter()
                .map(|(id, p)| serde_json::json!({"id": id, "path": text(p)}))
                .collect::<Vec<_>>()
        };
        let j = serde_json::json!({
            "added": rows(&rep.added),
            "removed": rows(&rep.removed),
            "changed": rep.changed,
            "unchanged": rep.unchanged,
            "duplicates": rep.duplicates.iter().map(|d| serde_json::json!({"path": text(&d.path), "of": d.of})).collect::<Vec<_>>(),
            "skipped": rep.skipped.iter().map(|s| serde_json::json!({"path": text(&s.path), "reason": s.reason})).collect::<Vec<_>>(),
            "ignored": rep.ignored.len(),
            "compacted": rep.compacted,
            "repaired_bytes": rep.repair.cut_bytes,
            "upgraded": rep.repair.upgraded,
            "generation": rep.generation,
            "count": rep.live,
            "seconds": rep.seconds,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    if rep.repair.upgraded {
        eprintln!("upgraded the DB to format 2 (ids, file stamps, commit record)");
    }
    if rep.repair.cut_bytes > 0 || rep.repair.renames > 0 {
        eprintln!(
            "repaired an interrupted change: cut {} uncommitted bytes, finished {} renames",
            rep.repair.cut_bytes, rep.repair.renames
        );
    }
    for d in rep.duplicates.iter().take(5) {
        eprintln!(
            "duplicate: {} has the same bytes as id {}",
            d.path.display(),
            d.of
        );
    }
    if !rep.ignored.is_empty() {
        eprintln!(
            "left out: {}",
            deeprank::data::walk::summarise(&rep.ignored)
        );
    }
    if !rep.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable images (listed above)",
            rep.skipped.len()
        );
    }
    let rate = if rep.seconds > 0.0 {
        rep.added.len() as f64 / rep.seconds
    } else {
        0.0
    };
    println!(
        "{verb}: {} added, {} removed, {} changed, {} unchanged, {} duplicates skipped, {} unreadable; \
         {} images in the DB{} after {:.2}s ({rate:.1} added/s)",
        rep.added.len(),
        rep.removed.len(),
        rep.changed,
        rep.unchanged,
        rep.duplicates.len(),
        rep.skipped.len(),
        rep.live,
        // A PostgreSQL store has no generations.
        if rep.generation > 0 {
            format!(" (generation {})", rep.generation)
        } else {
            String::new()
        },
        rep.seconds
    );
    if let Some(n) = rep.compacted {
        println!("compacted: {n} removed rows dropped");
    }
    Ok(())
}

/// `deeprank add`.
pub fn add(a: AddArgs) -> Result<()> {
    if let Some(url) = super::pg::url(&a.db) {
        let url = url.to_string();
        return super::pg::add(a, &url);
    }
    let opts = a.embed.options()?;
    let (model, weights) = (a.embed.model.clone(), a.embed.weights.clone());
    let had = super::index::before_change(&a.db);
    let rep = changes::add(&a.db, &a.paths, &opts, &mut |db| {
        query::embedder_for_db(db, model.as_deref(), weights.as_deref())
    })?;
    print(&rep, a.embed.json, "add")?;
    super::index::after_change(&a.db, had);
    Ok(())
}

/// `deeprank remove`.
pub fn remove(a: RemoveArgs) -> Result<()> {
    if let Some(url) = super::pg::url(&a.db) {
        let url = url.to_string();
        return super::pg::remove(a, &url);
    }
    let had = super::index::before_change(&a.db);
    let rep = changes::remove(&a.db, &a.targets)?;
    print(&rep, a.json, "remove")?;
    super::index::after_change(&a.db, had);
    Ok(())
}

/// `deeprank sync`.
pub fn sync(a: SyncArgs) -> Result<()> {
    let opts = a.embed.options()?;
    if let Some(url) = super::pg::url(&a.db) {
        let rep = super::pg::sync(url, &a.data, &opts, &a.embed.model, &a.embed.weights)?;
        return print(&rep, a.embed.json, "sync");
    }
    let (model, weights) = (a.embed.model.clone(), a.embed.weights.clone());
    let had = super::index::before_change(&a.db);
    let rep = changes::sync(&a.db, &a.data, &opts, &mut |db| {
        query::embedder_for_db(db, model.as_deref(), weights.as_deref())
    })?;
    print(&rep, a.embed.json, "sync")?;
    super::index::after_change(&a.db, had);
    Ok(())
}

/// `deeprank compact`.
pub fn compact(a: DbArgs) -> Result<()> {
    super::pg::refuse(&a.db, "compact")?;
    let had = super::index::before_change(&a.db);
    let rep = changes::compact(&a.db)?;
    print(&rep, a.json, "compact")?;
    super::index::after_change(&a.db, had);
    Ok(())
}

/// `deeprank check`: exits with an error when the DB is damaged.
pub fn check(a: DbArgs) -> Result<()> {
    super::pg::refuse(&a.db, "check")?;
    let mut rep = check_db(&a.db)?;
    // The index graph itself (the store checks only that its file is there).
    if let Err(e) = Db::open(&a.db).and_then(|db| ann_db::open(&db)) {
        rep.problems.push(format!("{e:#}"));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{}: format {}, generation {}, {} rows, {} live",
            a.db.display(),
            rep.format,
            rep.generation,
            rep.rows,
            rep.live
        );
        for n in &rep.notes {
            println!("note: {n}");
        }
        for p in &rep.problems {
            println!("problem: {p}");
        }
    }
    if !rep.problems.is_empty() {
        bail!(
            "{} is damaged ({} problems)",
            a.db.display(),
            rep.problems.len()
        );
    }
    Ok(())
}
