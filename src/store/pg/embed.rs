//! Images into a PostgreSQL collection and a collection back into a DB folder: `embed --db URL`
//! (optionally one worker's part of the tree), `add`, and the snapshot `eval` and `duplicates`
//! read. Files are hashed first and only content not stored yet is embedded, so re-running an
//! interrupted embed (or a crashed worker) finishes the job without duplicates.

use super::{PgStore, RowRef, StoreMeta, id_from_hash};
use crate::data::skipped::Skipped;
use crate::infer::embedder::Embedder;
use crate::infer::stream::embed_stream;
use crate::store::build::meta_for;
use crate::store::db::{Db, DbWriter, Entry, Meta, escape_path, unescape_path};
use crate::store::manifest::{Stamp, sha256};
use crate::store::uploads::write_upload;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Default rows per transaction (and files hashed, looked up and embedded together).
pub const CHUNK: usize = 2000;

/// Worker `index` of `count` (0-based): the part of the files it embeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub index: u32,
    pub count: u32,
}

impl Worker {
    /// `i/N` with 1 ≤ i ≤ N, as `--worker` takes it.
    pub fn parse(s: &str) -> Result<Worker> {
        let bad = || anyhow::anyhow!("--worker {s:?}: expected i/N with 1 <= i <= N, e.g. 2/8");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (i, n): (u32, u32) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || i == 0 || i > n {
            return Err(bad());
        }
        Ok(Worker {
            index: i - 1,
            count: n,
        })
    }

    /// Whether the file at `rel` (relative to the embedded root) is this worker's: a stable hash
    /// of the relative path (SHA-256, first 8 bytes), so every machine splits alike.
    pub fn owns(&self, rel: &Path) -> bool {
        let h = sha256(escape_path(rel).as_bytes());
        let v = u64::from_be_bytes(h[..8].try_into().unwrap_or([0; 8]));
        v % self.count as u64 == self.index as u64
    }
}

/// The store identity of vectors made by `emb` (the DB folder's `meta.json` kept as `info`).
pub fn store_meta(emb: &Embedder, data: &Path) -> Result<StoreMeta> {
    let meta = meta_for(emb, data, 0);
    Ok(StoreMeta {
        model: meta.model.clone(),
        size: meta.size,
        dim: meta.dim,
        normalized: meta.normalized,
        info: serde_json::to_value(&meta)?,
    })
}

/// The DB-folder identity of a store (to re-create its model for queries).
pub fn db_meta(store: &PgStore) -> Result<Meta> {
    let m = store.meta();
    let mut meta: Meta = serde_json::from_value(m.info.clone()).with_context(|| {
        format!(
            "store {}: its meta row's info is not a deeprank meta (was it written by deeprank?)",
            store.url().url
        )
    })?;
    meta.model = m.model.clone();
    meta.size = m.size;
    meta.dim = m.dim;
    meta.normalized = m.normalized;
    Ok(meta)
}

/// What an embed or add into a store did.
#[derive(Debug, Default)]
pub struct PgReport {
    /// Rows written now.
    pub added: u64,
    /// Files whose content was stored already (an earlier run, another worker, another path).
    pub stored: usize,
    /// Files of this run with the same bytes as an earlier file of it (stored once).
    pub duplicates: usize,
    /// Files other workers embed.
    pub other_workers: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
}

/// Embeds `entries` (paths relative to `root` decide the worker split) into `store`: per chunk
/// of `commit_every` files ([`CHUNK`] by default), hash them, skip the content stored already,
/// embed the rest, write them in one transaction. A crash loses at most the chunk in hand.
pub fn embed_entries(
    store: &mut PgStore,
    emb: &Embedder,
    entries: &[Entry],
    root: &Path,
    worker: Option<Worker>,
    batch: usize,
    commit_every: usize,
) -> Result<PgReport> {
    let commit_every = commit_every.max(1);
    store.batch_rows = commit_every;
    let t0 = std::time::Instant::now();
    let mut rep = PgReport::default();
    let mine: Vec<&Entry> = entries
        .iter()
        .filter(|e| worker.is_none_or(|w| w.owns(e.path.strip_prefix(root).unwrap_or(&e.path))))
        .collect();
    rep.other_workers = entries.len() - mine.len();
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    for chunk in mine.chunks(commit_every) {
        let stamps: Vec<Result<Stamp>> =
            chunk.par_iter().map(|e| Stamp::of_file(&e.path)).collect();
        let mut hashed: Vec<(&Entry, [u8; 32])> = Vec::new();
        for (e, s) in chunk.iter().zip(stamps) {
            match s.map(|s| s.sha256) {
                Ok(Some(h)) => hashed.push((e, h)),
                Ok(None) => unreachable!("Stamp::of_file hashes"),
                Err(err) => rep.skipped.push(Skipped {
                    path: e.path.clone(),
                    reason: format!("{err:#}"),
                }),
            }
        }
        let refs: Vec<&[u8]> = hashed.iter().map(|(_, h)| h.as_slice()).collect();
        let have = store.stored_hashes(&refs)?;
        let mut todo = Vec::new();
        for (e, h) in hashed {
            if have.contains(h.as_slice()) {
                rep.stored += 1;
            } else if !seen.insert(h) {
                rep.duplicates += 1;
            } else {
                todo.push((e, h));
            }
        }
        let paths: Vec<PathBuf> = todo.iter().map(|(e, _)| e.path.clone()).collect();
        let skipped = embed_stream(emb, &paths, batch, "embed", |i, v| {
            let (e, h) = &todo[i];
            let path = escape_path(&e.path);
            rep.added += store.push(RowRef {
                id: id_from_hash(h),
                path: &path,
                class: &e.class_id,
                class_name: &e.class_name,
                content_hash: h,
                embedding: v,
            })?;
            Ok(())
        })?;
        rep.skipped.extend(skipped);
        rep.added += store.flush()?;
        crate::store::crash::point("pg-after-commit");
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// What storing an upload into a store did.
#[derive(Clone, Debug)]
pub struct PgStored {
    pub id: i64,
    pub path: PathBuf,
    /// The same bytes were stored already (under `id`); nothing was written.
    pub duplicate: bool,
}

/// An image uploaded through the server: its bytes written durably into `folder`
/// ([`write_upload`]), then its row (the vector the caller computed with the store's model)
/// committed in one transaction before this returns, so an acknowledged upload is in the store.
pub fn store_upload(
    store: &mut PgStore,
    folder: &Path,
    bytes: &[u8],
    name: &str,
    vector: &[f32],
) -> Result<PgStored> {
    let hash = sha256(bytes);
    let id = id_from_hash(&hash);
    if !store.stored_hashes(&[hash.as_slice()])?.is_empty() {
        let path = store
            .get(id)?
            .map(|r| unescape_path(&r.path))
            .unwrap_or_default();
        return Ok(PgStored {
            id,
            path,
            duplicate: true,
        });
    }
    let path = write_upload(folder, &hash, name, bytes)?;
    let escaped = escape_path(&path);
    let row = RowRef {
        id,
        path: &escaped,
        class: "",
        class_name: "",
        content_hash: &hash,
        embedding: vector,
    };
    // A concurrent upload of the same bytes may have committed first: then none is new here.
    let new = store.push(row)? + store.flush()?;
    Ok(PgStored {
        id,
        path,
        duplicate: new == 0,
    })
}

/// A store's rows copied into a DB folder (streamed: a fixed working set), removed when dropped:
/// what `eval` and `duplicates` of a store read.
pub struct Snapshot {
    pub db: Db,
    /// The store's id of each row of `db` (whose own ids are its row numbers).
    pub store_ids: Vec<i64>,
    dir: PathBuf,
}

impl Snapshot {
    /// Reads every row of `store` into a new DB folder under `parent`.
    pub fn take(store: &mut PgStore, parent: &Path) -> Result<Snapshot> {
        let meta = db_meta(store)?;
        let dir = parent.join(format!(
            ".deeprank-snapshot-{}-{}",
            store.url().table,
            std::process::id()
        ));
        let mut w = DbWriter::create(&dir, meta.dim, None)?;
        let mut store_ids = Vec::new();
        let n = store.for_each_row(|row| {
            store_ids.push(row.id);
            let mut h = [0u8; 32];
            if row.content_hash.len() == 32 {
                h.copy_from_slice(&row.content_hash);
            }
            let entry = Entry {
                path: unescape_path(&row.path),
                class_id: row.class,
                class_name: row.class_name,
            };
            let stamp = Stamp {
                sha256: (row.content_hash.len() == 32).then_some(h),
                size: None,
                mtime_ns: None,
            };
            w.push_stamped(&entry, &row.embedding, &stamp)
        })?;
        if n == 0 {
            bail!("store {} is empty", store.url().url);
        }
        let dir = w.finish(meta)?;
        let snap = Snapshot {
            db: Db::open(&dir)?,
            store_ids,
            dir,
        };
        Ok(snap)
    }

    /// The store's id of a row id of the snapshot.
    pub fn store_id(&self, local: u64) -> u64 {
        self.store_ids
            .get(local as usize)
            .map_or(local, |&id| id as u64)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_parts_are_disjoint_and_cover() {
        let n = 3;
        let ws: Vec<Worker> = (1..=n)
            .map(|i| Worker::parse(&format!("{i}/{n}")).unwrap())
            .collect();
        let mut per = vec![0; n as usize];
        for f in 0..300 {
            let p = PathBuf::from(format!("class{}/img{f}.jpg", f % 7));
            let owners: Vec<usize> = (0..ws.len()).filter(|&w| ws[w].owns(&p)).collect();
            assert_eq!(owners.len(), 1, "{} owned by {owners:?}", p.display());
            per[owners[0]] += 1;
        }
        assert!(per.iter().all(|&c| c > 60), "uneven split {per:?}");
        for bad in ["0/3", "4/3", "1/0", "x", "1/2/3", ""] {
            assert!(Worker::parse(bad).is_err(), "{bad}");
        }
    }
}
