//! A living collection: `add` files or folders, `remove` by id or path, `sync` with a folder tree,
//! `compact`. Each embeds with the DB's own model (made only when something needs embedding),
//! commits through [`Writer`] in chunks of `commit_every` rows (each chunk all or nothing), keeps
//! one live row per content hash (the same bytes are stored once) and per path, and compacts when
//! removed rows pass [`AUTO_COMPACT_SHARE`] of the rows.

use crate::data::skipped::Skipped;
use crate::infer::embedder::Embedder;
use crate::infer::stream::embed_stream;
use crate::store::commit::{Change, NewRow, Repair, Wait, Writer};
use crate::store::db::{Db, Entry};
use crate::store::manifest::Stamp;
use crate::store::plan::{Item, files_under, plan_sync, stamp_all};
use anyhow::{Context, Result, bail};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Removed rows past this share of all rows trigger a compaction after a change.
pub const AUTO_COMPACT_SHARE: f64 = 0.25;

/// How add and sync embed and commit.
#[derive(Clone, Debug)]
pub struct Options {
    pub batch: usize,
    /// Rows per commit: a crash loses at most the chunk being embedded.
    pub commit_every: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch: 64,
            commit_every: 1000,
        }
    }
}

/// A file that was not stored because its bytes are already in the DB.
#[derive(Debug, Clone)]
pub struct Duplicate {
    pub path: PathBuf,
    /// The live row with the same content.
    pub of: u64,
}

/// What an add or a sync did.
#[derive(Debug, Default)]
pub struct Report {
    /// New rows: id and path.
    pub added: Vec<(u64, PathBuf)>,
    /// Rows removed: their files vanished (sync) or were named (remove).
    pub removed: Vec<(u64, PathBuf)>,
    /// Files whose content changed: their old row removed, the new content added under a new id.
    pub changed: usize,
    /// Files already in the DB as they are.
    pub unchanged: usize,
    pub duplicates: Vec<Duplicate>,
    /// Files that could not be read or decoded.
    pub skipped: Vec<Skipped>,
    /// Files in the folders that are not supported images, and why.
    pub ignored: Vec<Skipped>,
    /// Rows dropped by a compaction this command ran.
    pub compacted: Option<usize>,
    pub repair: Repair,
    pub generation: u64,
    pub live: usize,
    pub seconds: f64,
}

/// Makes the DB's embedder when one is needed.
pub type MakeEmbedder<'a> = &'a mut dyn FnMut(&Db) -> Result<Embedder>;

/// A path as rows are matched by: absolute, without `.` components.
pub fn normalize(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The images under `dir` (`data::walk`'s rules); the files left out go to `ignored`.
fn walk(dir: &Path, images: &mut Vec<PathBuf>, ignored: &mut Vec<Skipped>) -> Result<()> {
    let listing = crate::data::walk::walk(dir, &|_| false)?;
    images.extend(listing.images);
    ignored.extend(listing.left_out);
    Ok(())
}

/// The class of a new file: its folder's name (or the one above `images/`) when the DB knows it
/// as a class id; unlabelled otherwise.
pub fn class_of(path: &Path, known: &HashMap<String, String>) -> (String, String) {
    let names = path
        .ancestors()
        .skip(1)
        .take(2)
        .filter_map(|a| a.file_name()?.to_str());
    for (i, n) in names.enumerate() {
        if let Some(name) = known.get(n) {
            return (n.to_string(), name.clone());
        }
        if i == 0 && n != "images" {
            break;
        }
    }
    (String::new(), String::new())
}

/// The DB's classes: id → name (for new files in a class folder).
fn classes(db: &Db) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    for r in db.live_rows() {
        let e = &db.entries[r];
        if !e.class_id.is_empty() && !out.contains_key(&e.class_id) {
            out.insert(e.class_id.clone(), e.class_name.clone());
        }
    }
    out
}

/// Lookups over the writer's live rows: content hash → id, path → (id, row).
struct Live {
    by_hash: HashMap<[u8; 32], u64>,
    by_path: HashMap<PathBuf, (u64, usize)>,
}

impl Live {
    /// Every live row (sync compares the whole tree).
    fn new(db: &Db) -> Live {
        let mut l = Live {
            by_hash: HashMap::new(),
            by_path: HashMap::new(),
        };
        for r in db.live_rows() {
            if let Some(h) = db.stamps[r].sha256 {
                l.by_hash.entry(h).or_insert(db.ids[r]);
            }
            l.by_path
                .insert(normalize(&db.entries[r].path), (db.ids[r], r));
        }
        l
    }

    /// Only the live rows that share a hash or a path with `files` (add: a few files into a big
    /// DB cost one pass over the rows, without a map of them all). Paths are compared only when
    /// the file names match.
    fn for_files(db: &Db, files: &[(PathBuf, Stamp)]) -> Live {
        let hashes: HashSet<[u8; 32]> = files.iter().filter_map(|f| f.1.sha256).collect();
        let paths: HashSet<&Path> = files.iter().map(|f| f.0.as_path()).collect();
        let names: HashSet<&std::ffi::OsStr> =
            files.iter().filter_map(|f| f.0.file_name()).collect();
        let mut l = Live {
            by_hash: HashMap::new(),
            by_path: HashMap::new(),
        };
        for r in db.live_rows() {
            if let Some(h) = db.stamps[r].sha256
                && hashes.contains(&h)
            {
                l.by_hash.entry(h).or_insert(db.ids[r]);
            }
            let p = &db.entries[r].path;
            if p.file_name().is_some_and(|n| names.contains(n)) {
                let n = normalize(p);
                if paths.contains(n.as_path()) {
                    l.by_path.insert(n, (db.ids[r], r));
                }
            }
        }
        l
    }
}

/// Embeds the items and commits them in chunks, with `remove` in the first commit.
fn apply(
    w: &mut Writer,
    items: Vec<Item>,
    mut remove: Vec<u64>,
    opts: &Options,
    make: MakeEmbedder,
    rep: &mut Report,
) -> Result<()> {
    let classes = classes(w.db());
    let emb = if items.is_empty() {
        None
    } else {
        Some(make(w.db())?)
    };
    for chunk in items.chunks(opts.commit_every.max(1)) {
        let emb = emb.as_ref().context("embedder")?;
        let paths: Vec<PathBuf> = chunk.iter().map(|i| i.path.clone()).collect();
        let mut change = Change {
            add: Vec::new(),
            remove: std::mem::take(&mut remove),
        };
        change
            .remove
            .extend(chunk.iter().filter_map(|i| i.replaces));
        let skipped = embed_stream(emb, &paths, opts.batch, "add", |i, v| {
            let (class_id, class_name) = class_of(&chunk[i].path, &classes);
            change.add.push(NewRow {
                entry: Entry {
                    path: chunk[i].path.clone(),
                    class_id,
                    class_name,
                },
                stamp: chunk[i].stamp,
                vector: v.to_vec(),
            });
            Ok(())
        })?;
        rep.skipped.extend(skipped);
        let ids = w.commit(&change)?;
        rep.added.extend(
            ids.into_iter()
                .zip(change.add.into_iter().map(|r| r.entry.path)),
        );
    }
    if !remove.is_empty() {
        w.commit(&Change {
            add: Vec::new(),
            remove,
        })?;
    }
    Ok(())
}

/// Compacts when removed rows pass the share; then fills the report's totals.
fn finish(w: &mut Writer, rep: &mut Report, t0: Instant) -> Result<()> {
    let db = w.db();
    let dead = db.rows() - db.len();
    if dead > 0 && dead as f64 > AUTO_COMPACT_SHARE * db.rows() as f64 {
        rep.compacted = Some(w.compact()?);
    }
    rep.repair = w.repair.clone();
    rep.generation = w.db().state.generation;
    rep.live = w.db().len();
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(())
}

/// `deeprank add`: files and folders (recursively) embedded and appended.
pub fn add(dir: &Path, inputs: &[PathBuf], opts: &Options, make: MakeEmbedder) -> Result<Report> {
    let t0 = Instant::now();
    let mut rep = Report::default();
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut files, &mut rep.ignored)?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!(
                "{} does not exist (or is not a file or folder): nothing was added",
                p.display()
            );
        }
    }
    let files: Vec<PathBuf> = files.iter().map(|p| normalize(p)).collect();
    let mut w = Writer::open(dir, Wait::Block)?;
    let (stamped, unreadable) = stamp_all(files);
    rep.skipped = unreadable;
    let mut live = Live::for_files(w.db(), &stamped);
    let mut items: Vec<Item> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for (path, stamp) in stamped {
        let hash = stamp.sha256.context("hash")?;
        if !seen.insert(path.clone()) {
            continue;
        }
        if let Some(&of) = live.by_hash.get(&hash) {
            match live.by_path.get(&path) {
                Some(&(id, _)) if id == of => rep.unchanged += 1,
                _ => rep.duplicates.push(Duplicate { path, of }),
            }
            continue;
        }
        let replaces = live.by_path.get(&path).map(|&(id, _)| id);
        if replaces.is_some() {
            rep.changed += 1;
        }
        // Later files with these bytes are duplicates of this one (its id is not known yet).
        live.by_hash.insert(hash, u64::MAX);
        items.push(Item {
            path,
            stamp,
            replaces,
        });
    }
    apply(&mut w, items, Vec::new(), opts, make, &mut rep)?;
    fix_duplicate_ids(&mut rep, w.db());
    finish(&mut w, &mut rep, t0)?;
    Ok(rep)
}

/// Fills in the ids of duplicates of files added by this command.
fn fix_duplicate_ids(rep: &mut Report, db: &Db) {
    if !rep.duplicates.iter().any(|d| d.of == u64::MAX) {
        return;
    }
    let by_hash: HashMap<[u8; 32], u64> = db
        .live_rows()
        .filter_map(|r| db.stamps[r].sha256.map(|h| (h, db.ids[r])))
        .collect();
    for d in rep.duplicates.iter_mut().filter(|d| d.of == u64::MAX) {
        if let Ok(s) = Stamp::of_file(&d.path)
            && let Some(&id) = s.sha256.and_then(|h| by_hash.get(&h))
        {
            d.of = id;
        }
    }
}

/// `deeprank remove`: rows named by id, by file path, or by a folder (every row under it). All
/// targets must match, or nothing is removed.
pub fn remove(dir: &Path, targets: &[String]) -> Result<Report> {
    let t0 = Instant::now();
    let mut rep = Report::default();
    let mut w = Writer::open(dir, Wait::Block)?;
    let db = w.db();
    let paths: Vec<(PathBuf, usize)> = db
        .live_rows()
        .map(|r| (normalize(&db.entries[r].path), r))
        .collect();
    let mut rows: Vec<usize> = Vec::new();
    for t in targets {
        if let Some(r) = t.parse::<u64>().ok().and_then(|id| db.row_of(id)) {
            rows.push(r);
            continue;
        }
        let p = normalize(Path::new(t));
        let exact: Vec<usize> = paths.iter().filter(|(q, _)| *q == p).map(|x| x.1).collect();
        let found = if exact.is_empty() {
            paths
                .iter()
                .filter(|(q, _)| q.starts_with(&p))
                .map(|x| x.1)
                .collect()
        } else {
            exact
        };
        if found.is_empty() {
            bail!(
                "{t} is neither a live id nor the path of a file or folder in {}: nothing was removed",
                dir.display()
            );
        }
        rows.extend(found);
    }
    rows.sort_unstable();
    rows.dedup();
    rep.removed = rows
        .iter()
        .map(|&r| (db.ids[r], db.entries[r].path.clone()))
        .collect();
    let ids = rep.removed.iter().map(|x| x.0).collect();
    w.commit(&Change {
        add: Vec::new(),
        remove: ids,
    })?;
    finish(&mut w, &mut rep, t0)?;
    Ok(rep)
}

/// `deeprank sync`: makes the rows under `root` match the files there: new files added, vanished
/// ones removed, changed ones (size or time differ, then the hash) re-embedded under a new id.
pub fn sync(dir: &Path, root: &Path, opts: &Options, make: MakeEmbedder) -> Result<Report> {
    let t0 = Instant::now();
    let mut rep = Report::default();
    let files = files_under(root, &mut rep.ignored)?;
    let root = normalize(root);
    let mut w = Writer::open(dir, Wait::Block)?;
    let db = w.db();
    let live = Live::new(db);
    let rows: HashMap<PathBuf, (u64, Stamp)> = live
        .by_path
        .iter()
        .map(|(p, &(id, r))| (p.clone(), (id, db.stamps[r])))
        .collect();
    let plan = plan_sync(&root, files, &rows, &mut |hs| {
        Ok(hs
            .iter()
            .filter_map(|h| live.by_hash.get(h).map(|&id| (*h, id)))
            .collect())
    })?;
    rep.unchanged = plan.unchanged;
    rep.changed = plan.changed;
    rep.duplicates = plan.duplicates;
    rep.skipped = plan.skipped;
    // The removed rows' paths as stored.
    rep.removed = plan
        .vanished
        .into_iter()
        .map(|(id, p)| match db.row_of(id) {
            Some(r) => (id, db.entries[r].path.clone()),
            None => (id, p),
        })
        .collect();
    apply(&mut w, plan.items, plan.remove, opts, make, &mut rep)?;
    fix_duplicate_ids(&mut rep, w.db());
    finish(&mut w, &mut rep, t0)?;
    Ok(rep)
}

/// `deeprank compact`: rewrites the live rows, dropping removed ones. Returns the rows dropped.
pub fn compact(dir: &Path) -> Result<Report> {
    let t0 = Instant::now();
    let mut w = Writer::open(dir, Wait::Block)?;
    let mut rep = Report {
        compacted: Some(w.compact()?),
        ..Default::default()
    };
    rep.repair = w.repair.clone();
    rep.generation = w.db().state.generation;
    rep.live = w.db().len();
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}
