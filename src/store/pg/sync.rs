//! `sync --db postgres://… --data ROOT`: the store's rows under ROOT made to match the files there,
//! planned as a DB folder's sync is ([`plan_sync`]): vanished files' rows removed, new files
//! added, changed ones re-embedded (their old row removed), content stored already reported as a
//! duplicate. A store keeps no file sizes and times, so every file under ROOT is hashed.
//!
//! Order: the rows to remove go first, in one transaction; then the files to embed, in
//! transactions of `commit_every` (as `embed`). A crash in between leaves the changed files
//! missing until the next sync, which adds them; nothing is stored twice.

use super::embed::embed_entries;
use super::{PgStore, id_from_hash};
use crate::infer::embedder::Embedder;
use crate::store::changes::{Options, Report, class_of, normalize};
use crate::store::db::{Entry, unescape_path};
use crate::store::manifest::Stamp;
use crate::store::plan::{files_under, plan_sync};
use anyhow::Result;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Syncs the rows of `store` under `root` with the files there; `make` builds the store's
/// embedder (only called when something needs embedding).
pub fn sync(
    store: &mut PgStore,
    root: &Path,
    opts: &Options,
    make: &mut dyn FnMut(&PgStore) -> Result<Embedder>,
) -> Result<Report> {
    let t0 = Instant::now();
    let mut rep = Report::default();
    let files = files_under(root, &mut rep.ignored)?;
    let root = normalize(root);
    // The rows under the root (by their absolute path), streamed: no vectors read.
    let mut rows: HashMap<PathBuf, (u64, Stamp)> = HashMap::new();
    store.for_each_key(|id, path, hash| {
        let p = normalize(&unescape_path(&path));
        if p.starts_with(&root) {
            let stamp = Stamp {
                sha256: <[u8; 32]>::try_from(hash.as_slice()).ok(),
                size: None,
                mtime_ns: None,
            };
            rows.insert(p, (id as u64, stamp));
        }
        Ok(())
    })?;
    let plan = plan_sync(&root, files, &rows, &mut |hs| {
        let mut out = HashMap::new();
        for chunk in hs.chunks(10_000) {
            let refs: Vec<&[u8]> = chunk.iter().map(|h| h.as_slice()).collect();
            for h in store.stored_hashes(&refs)? {
                if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                    out.insert(h, id_from_hash(&h) as u64);
                }
            }
        }
        Ok(out)
    })?;
    rep.unchanged = plan.unchanged;
    rep.changed = plan.changed;
    rep.skipped = plan.skipped;
    rep.duplicates = plan.duplicates;
    let mut remove: Vec<i64> = plan.remove.iter().map(|&id| id as i64).collect();
    remove.extend(
        plan.items
            .iter()
            .filter_map(|i| i.replaces.map(|id| id as i64)),
    );
    store.remove_ids(&remove)?;
    rep.removed = plan.vanished;
    if !plan.items.is_empty() {
        let emb = make(store)?;
        let known: HashMap<String, String> = store.classes()?.into_iter().collect();
        let entries: Vec<Entry> = plan
            .items
            .iter()
            .map(|i| {
                let (class_id, class_name) = class_of(&i.path, &known);
                Entry {
                    path: i.path.clone(),
                    class_id,
                    class_name,
                }
            })
            .collect();
        let done = embed_entries(
            store,
            &emb,
            &entries,
            Path::new(""),
            None,
            opts.batch,
            opts.commit_every,
        )?;
        let failed: HashSet<&Path> = done.skipped.iter().map(|s| s.path.as_path()).collect();
        rep.added = plan
            .items
            .iter()
            .filter(|i| !failed.contains(i.path.as_path()))
            .filter_map(|i| Some((id_from_hash(&i.stamp.sha256?) as u64, i.path.clone())))
            .collect();
        rep.skipped.extend(done.skipped);
    }
    // Duplicates of files this sync added: the id their content got.
    for d in rep.duplicates.iter_mut().filter(|d| d.of == u64::MAX) {
        if let Ok(Some(h)) = Stamp::of_file(&d.path).map(|s| s.sha256) {
            d.of = id_from_hash(&h) as u64;
        }
    }
    rep.live = store.count()? as usize;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}
