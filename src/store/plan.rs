//! What a `sync` must change, planned from the rows under the synced folder and the files there
//! (for a DB folder and a PostgreSQL store alike): vanished files' rows removed, new files added,
//! changed ones (size or time differ, then the hash; or the hash alone where no size and time are
//! stored) re-embedded under a new id, content stored already reported as a duplicate.

use crate::data::skipped::Skipped;
use crate::store::changes::{Duplicate, normalize};
use crate::store::manifest::{Stamp, stat};
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// One file to embed, and the row it replaces.
#[derive(Clone, Debug)]
pub struct Item {
    pub path: PathBuf,
    pub stamp: Stamp,
    pub replaces: Option<u64>,
}

/// A sync's changes.
#[derive(Debug, Default)]
pub struct SyncPlan {
    /// Rows whose files are gone: id and stored path.
    pub vanished: Vec<(u64, PathBuf)>,
    /// Files to embed (new or changed).
    pub items: Vec<Item>,
    /// Every row to remove: the vanished ones, and changed files' old rows whose new content is
    /// stored under another row (sorted, once each). Changed files still to embed carry their old
    /// row in [`Item::replaces`].
    pub remove: Vec<u64>,
    pub duplicates: Vec<Duplicate>,
    pub unchanged: usize,
    pub changed: usize,
    /// Files that could not be read.
    pub skipped: Vec<Skipped>,
}

/// The id of the row holding each of some hashes (those stored anywhere, not only under the root).
pub type HashOwners<'a> = &'a mut dyn FnMut(&[[u8; 32]]) -> Result<HashMap<[u8; 32], u64>>;

/// Hashes files in parallel; unreadable ones are returned as skipped.
pub fn stamp_all(paths: Vec<PathBuf>) -> (Vec<(PathBuf, Stamp)>, Vec<Skipped>) {
    let res: Vec<_> = paths
        .into_par_iter()
        .map(|p| match Stamp::of_file(&p) {
            Ok(s) => Ok((p, s)),
            Err(e) => Err(Skipped {
                path: p,
                reason: format!("{e:#}"),
            }),
        })
        .collect();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for r in res {
        match r {
            Ok(x) => ok.push(x),
            Err(s) => bad.push(s),
        }
    }
    (ok, bad)
}

/// Plans a sync of `root` (absolute) whose image files are `files` (absolute, normalised).
/// `rows`: every row by its normalised path (id, stamp) — rows outside `root` are ignored.
/// `owners` answers which row holds a content hash. A duplicate of a file this sync adds has
/// `of == u64::MAX` (its id is known once it is stored).
pub fn plan_sync(
    root: &Path,
    files: Vec<PathBuf>,
    rows: &HashMap<PathBuf, (u64, Stamp)>,
    owners: HashOwners,
) -> Result<SyncPlan> {
    let mut plan = SyncPlan::default();
    let on_disk: HashSet<&PathBuf> = files.iter().collect();
    for (p, &(id, _)) in rows {
        if p.starts_with(root) && !on_disk.contains(p) {
            plan.vanished.push((id, p.clone()));
        }
    }
    plan.vanished.sort();
    // Files whose size and time match their row are unchanged without reading them.
    let mut to_hash = Vec::new();
    let mut known = HashMap::new();
    for p in files {
        match rows.get(&p) {
            Some(&(id, s)) => {
                let same = s.size.is_some()
                    && stat(&p)
                        .is_ok_and(|(size, t)| s.size == Some(size) && s.mtime_ns == Some(t));
                if same && s.sha256.is_some() {
                    plan.unchanged += 1;
                } else {
                    known.insert(p.clone(), (id, s.sha256));
                    to_hash.push(p);
                }
            }
            None => to_hash.push(p),
        }
    }
    let (stamped, unreadable) = stamp_all(to_hash);
    plan.skipped = unreadable;
    // Rows this sync removes no longer hold their content: it may be added again (a moved file).
    let mut gone: HashSet<u64> = plan.vanished.iter().map(|x| x.0).collect();
    for (p, s) in &stamped {
        if let Some(&(id, old)) = known.get(p)
            && old != s.sha256
        {
            gone.insert(id);
        }
    }
    let hashes: Vec<[u8; 32]> = stamped.iter().filter_map(|(_, s)| s.sha256).collect();
    let mut owner: HashMap<[u8; 32], u64> = owners(&hashes)?
        .into_iter()
        .filter(|(_, id)| !gone.contains(id))
        .collect();
    let mut stale = Vec::new();
    for (path, stamp) in stamped {
        let hash = stamp.sha256.context("hash")?;
        let old = known.get(&path).copied();
        if let Some((_, h)) = old
            && h == Some(hash)
        {
            plan.unchanged += 1;
            continue;
        }
        let replaces = old.map(|(id, _)| id);
        if replaces.is_some() {
            plan.changed += 1;
        }
        if let Some(&of) = owner.get(&hash) {
            plan.duplicates.push(Duplicate { path, of });
            // A changed file whose new bytes are elsewhere in the collection: its old row still goes.
            stale.extend(replaces);
            continue;
        }
        owner.insert(hash, u64::MAX);
        plan.items.push(Item {
            path,
            stamp,
            replaces,
        });
    }
    plan.remove = plan.vanished.iter().map(|x| x.0).chain(stale).collect();
    plan.remove.sort_unstable();
    plan.remove.dedup();
    Ok(plan)
}

/// The images under `root` (`data::walk`'s rules), absolute; the files left out go to `ignored`.
pub fn files_under(root: &Path, ignored: &mut Vec<Skipped>) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        anyhow::bail!("--data {} is not a folder", root.display());
    }
    let listing = crate::data::walk::walk(root, &|_| false)?;
    ignored.extend(listing.left_out);
    Ok(listing.images.iter().map(|p| normalize(p)).collect())
}
