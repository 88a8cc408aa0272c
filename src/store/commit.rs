//! Changing a DB in place, safely: one writer at a time (`DB/.lock`), every change appended past
//! the committed lengths and made real by replacing `state.json` (see [`crate::store::state`]).
//! Opening a writer repairs what a crash left: uncommitted tails are cut, pending renames are
//! redone, and a DB from before format 2 is upgraded. Compaction rewrites the live rows into new
//! files that replace the old ones through pending renames. Readers need no lock.

use crate::store::crash;
use crate::store::db::{Db, Entry, MANIFEST, META, Meta, REMOVED, VECTORS};
use crate::store::manifest::{self, Stamp};
use crate::store::npy::{NPY_HEADER, NpyMap, NpyWriter, npy_header};
use crate::store::state::{self, STATE_TMP, State};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOCK: &str = ".lock";

/// ANN index files are `ann-GENERATION.hnsw` (a whole graph) and `ann-GENERATION.hnsd` (a delta
/// over one), GENERATION the one of the commit that names it.
const INDEX_PREFIX: &str = "ann-";
pub const INDEX_SUFFIX: &str = ".hnsw";
pub const DELTA_SUFFIX: &str = ".hnsd";

/// Whether `name` is an ANN index file name (a graph or a delta).
pub fn is_index_file(name: &str) -> bool {
    name.starts_with(INDEX_PREFIX) && (name.ends_with(INDEX_SUFFIX) || name.ends_with(DELTA_SUFFIX))
}

/// Deletes index files that the committed state does not name (left by a crash before or after a
/// commit that replaced the index, or by a compaction). Returns how many.
fn remove_stale_indexes(dir: &Path, keep: &[&str]) -> Result<usize> {
    let mut n = 0;
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in rd {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_index_file(name) && !keep.contains(&name) {
            remove_if_exists(&dir.join(name))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Files a compaction or an upgrade writes before it commits (`NAME.new` → `NAME`).
const NEW: [(&str, &str); 4] = [
    ("vectors.npy.new", VECTORS),
    ("manifest.tsv.new", MANIFEST),
    ("removed.tsv.new", REMOVED),
    ("meta.json.new", META),
];

/// A row to add: what the manifest says of it and its vector.
pub struct NewRow {
    pub entry: Entry,
    pub stamp: Stamp,
    pub vector: Vec<f32>,
}

/// One commit: rows appended and ids removed, all or nothing.
#[derive(Default)]
pub struct Change {
    pub add: Vec<NewRow>,
    pub remove: Vec<u64>,
}

/// What opening a writer found and did.
#[derive(Debug, Default, Clone)]
pub struct Repair {
    /// Bytes of uncommitted tails cut (vectors, manifest, removed).
    pub cut_bytes: u64,
    /// Pending renames finished.
    pub renames: usize,
    /// The DB was format 1 and is now format 2.
    pub upgraded: bool,
    /// ANN index files no commit names, deleted.
    pub stale_indexes: usize,
}

/// The one writer of a DB: holds its lock and the current committed view.
pub struct Writer {
    dir: PathBuf,
    _lock: File,
    db: Db,
    pub repair: Repair,
}

/// How a writer waits for another one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Block,
    Fail,
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))
}

/// Cuts a file back to its committed length; returns the bytes cut.
fn cut(path: &Path, len: u64) -> Result<u64> {
    let f = open_rw(path)?;
    let have = f.metadata()?.len();
    if have < len {
        bail!(
            "{} has {have} bytes, fewer than its committed {len}: the DB is damaged (restore a backup or re-run embed)",
            path.display()
        );
    }
    if have > len {
        f.set_len(len)?;
        f.sync_all()?;
    }
    Ok(have - len)
}

/// Rewrites the npy header's shape (numpy's view; deeprank trusts `state.json`).
fn write_header(path: &Path, rows: u64, dim: usize) -> Result<()> {
    let mut f = open_rw(path)?;
    f.write_all(&npy_header(rows as usize, dim))?;
    f.sync_data()?;
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

impl Writer {
    /// Takes the DB's lock (waiting for another writer, or failing with `Wait::Fail`), repairs what
    /// a crash left and upgrades a format-1 DB.
    pub fn open(dir: &Path, wait: Wait) -> Result<Writer> {
        if !dir.join(META).is_file() {
            // Db::open words the error.
            Db::open(dir)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOCK))
            .with_context(|| format!("cannot create {}", dir.join(LOCK).display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) if wait == Wait::Block => {
                eprintln!(
                    "waiting for another deeprank writer of {} to finish",
                    dir.display()
                );
                lock.lock()?;
            }
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is being changed by another deeprank command: retry when it is done",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", dir.display()));
            }
        }
        let mut repair = Repair::default();
        let db = match state::read(dir)? {
            None => {
                for (new, _) in NEW {
                    remove_if_exists(&dir.join(new))?;
                }
                remove_if_exists(&dir.join(STATE_TMP))?;
                repair.upgraded = true;
                upgrade(dir, Db::open(dir)?)?
            }
            Some(mut st) => {
                if !st.pending.is_empty() {
                    repair.renames = finish_renames(dir, &st)?;
                    st.pending.clear();
                    st.generation += 1;
                    state::commit(dir, &st)?;
                }
                let meta: Meta = serde_json::from_str(&std::fs::read_to_string(dir.join(META))?)
                    .with_context(|| format!("{} is damaged", dir.join(META).display()))?;
                let vbytes =
                    (st.rows.saturating_mul(meta.dim as u64 * 4)).saturating_add(NPY_HEADER as u64);
                repair.cut_bytes += cut(&dir.join(VECTORS), vbytes)?;
                repair.cut_bytes += cut(&dir.join(MANIFEST), st.manifest_bytes)?;
                repair.cut_bytes += cut(&dir.join(REMOVED), st.removed_bytes)?;
                write_header(&dir.join(VECTORS), st.rows, meta.dim)?;
                for (new, _) in NEW {
                    remove_if_exists(&dir.join(new))?;
                }
                remove_if_exists(&dir.join(STATE_TMP))?;
                let keep = st.index.as_ref().map(|i| i.files()).unwrap_or_default();
                repair.stale_indexes = remove_stale_indexes(dir, &keep)?;
                Db::open(dir)?
            }
        };
        Ok(Writer {
            dir: dir.to_path_buf(),
            _lock: lock,
            db,
            repair,
        })
    }

    /// The committed state, current for this writer (no one else writes while it is open).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Appends the change past the committed lengths, then commits it. Returns the new rows' ids.
    pub fn commit(&mut self, change: &Change) -> Result<Vec<u64>> {
        let dim = self.db.meta.dim;
        let st0 = self.db.state.clone();
        let mut remove_rows = Vec::with_capacity(change.remove.len());
        for &id in &change.remove {
            let row = self
                .db
                .row_of(id)
                .with_context(|| format!("no live row with id {id} in {}", self.dir.display()))?;
            if remove_rows.contains(&row) {
                bail!("id {id} is removed twice in one change");
            }
            remove_rows.push(row);
        }
        for r in &change.add {
            if r.vector.len() != dim {
                bail!(
                    "a vector has {} values, the DB's have {dim}",
                    r.vector.len()
                );
            }
        }
        crash::point("commit-start");
        let ids: Vec<u64> = (0..change.add.len() as u64)
            .map(|i| st0.next_id + i)
            .collect();
        // Vectors.
        let vpath = self.dir.join(VECTORS);
        let mut vf = open_rw(&vpath)?;
        vf.seek(SeekFrom::Start(
            NPY_HEADER as u64 + st0.rows * dim as u64 * 4,
        ))?;
        let mut vw = BufWriter::with_capacity(1 << 20, vf);
        for (i, r) in change.add.iter().enumerate() {
            let bytes: Vec<u8> = r.vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            if i == change.add.len() / 2 && crash::armed("torn-vector") {
                vw.write_all(&bytes[..bytes.len() / 2])?;
                vw.flush()?;
                crash::point("torn-vector");
            }
            vw.write_all(&bytes)?;
        }
        vw.flush()?;
        vw.get_ref().sync_data()?;
        drop(vw);
        crash::point("vectors-appended");
        // Manifest lines.
        let mut lines = Vec::new();
        for (r, &id) in change.add.iter().zip(&ids) {
            manifest::write_v2(&mut lines, id, &r.entry, &r.stamp)?;
        }
        let mut mf = open_rw(&self.dir.join(MANIFEST))?;
        mf.seek(SeekFrom::Start(st0.manifest_bytes))?;
        if crash::armed("torn-manifest") {
            mf.write_all(&lines[..lines.len() / 2])?;
            crash::point("torn-manifest");
        }
        mf.write_all(&lines)?;
        mf.sync_data()?;
        // Tombstones.
        let mut tomb = String::new();
        for id in &change.remove {
            tomb.push_str(&format!("{id}\n"));
        }
        let mut rf = open_rw(&self.dir.join(REMOVED))?;
        rf.seek(SeekFrom::Start(st0.removed_bytes))?;
        rf.write_all(tomb.as_bytes())?;
        rf.sync_data()?;
        crash::point("appended");
        let st = State {
            generation: st0.generation + 1,
            rows: st0.rows + change.add.len() as u64,
            live: st0.live + change.add.len() as u64 - change.remove.len() as u64,
            manifest_bytes: st0.manifest_bytes + lines.len() as u64,
            removed_bytes: st0.removed_bytes + tomb.len() as u64,
            next_id: st0.next_id + change.add.len() as u64,
            ..st0
        };
        state::commit(&self.dir, &st)?;
        crash::point("committed");
        write_header(&vpath, st.rows, dim)?;
        crash::point("header-written");
        // This writer's view follows its own commit.
        for (r, &id) in change.add.iter().zip(&ids) {
            self.db.entries.push(r.entry.clone());
            self.db.ids.push(id);
            self.db.stamps.push(r.stamp);
        }
        self.db.grow_removed(change.add.len());
        for row in remove_rows {
            self.db.mark_removed(row);
        }
        self.db.vectors = NpyMap::open_prefix(&vpath, st.rows as usize, dim)?;
        self.db.meta.count = st.live as usize;
        self.db.state = st;
        Ok(ids)
    }

    /// The name the next index file gets (`suffix`: [`INDEX_SUFFIX`] or [`DELTA_SUFFIX`]): unique,
    /// since generations only grow (a file of that name left by a crash is not committed, and is
    /// overwritten).
    pub fn new_index_name(&self, suffix: &str) -> String {
        format!("{INDEX_PREFIX}{}{suffix}", self.db.state.generation + 1)
    }

    /// Writes a new index file `name` (from [`Writer::new_index_name`]) whole: `write` fills it,
    /// then it is fsynced with its folder. Nothing names it until [`Writer::commit_index`].
    pub fn write_index_file(
        &self,
        name: &str,
        write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> Result<u64> {
        let path = self.dir.join(name);
        let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        write(&mut w)
            .and_then(|_| w.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        let len = f.metadata()?.len();
        drop(f);
        state::sync_dir(&self.dir)?;
        crash::point("index-written");
        Ok(len)
    }

    /// Commits `index` (a file written by [`Writer::write_index_file`], over the first `rows`
    /// rows; or none) as the DB's ANN index, then deletes the index file it replaces.
    pub fn commit_index(&mut self, index: Option<crate::store::state::IndexRef>) -> Result<()> {
        if let Some(ix) = &index
            && ix.rows > self.db.state.rows
        {
            bail!(
                "an index over {} rows cannot be committed to {}, which has {}",
                ix.rows,
                self.dir.display(),
                self.db.state.rows
            );
        }
        let st = State {
            generation: self.db.state.generation + 1,
            index,
            ..self.db.state.clone()
        };
        state::commit(&self.dir, &st)?;
        crash::point("index-committed");
        self.db.index = st
            .index
            .as_ref()
            .map(|ix| crate::store::db::IndexMap::open(&self.dir, ix));
        let keep = st.index.as_ref().map(|i| i.files()).unwrap_or_default();
        remove_stale_indexes(&self.dir, &keep)?;
        self.db.state = st;
        Ok(())
    }

    /// Rewrites the live rows into new files (ids kept) and swaps them in. Returns the rows dropped.
    pub fn compact(&mut self) -> Result<usize> {
        let db = &self.db;
        let dropped = db.rows() - db.len();
        let dir = &self.dir;
        let mut vw = NpyWriter::create(&dir.join(NEW[0].0), db.meta.dim)?;
        let mut lines = format!("{}\n", manifest::HEADER_V2).into_bytes();
        for r in db.live_rows() {
            vw.push(db.vectors.row(r))?;
            manifest::write_v2(&mut lines, db.ids[r], &db.entries[r], &db.stamps[r])?;
        }
        vw.finish()?;
        write_synced(&dir.join(NEW[1].0), &lines)?;
        write_synced(&dir.join(NEW[2].0), b"")?;
        crash::point("compact-written");
        let st = State {
            generation: db.state.generation + 1,
            rows: db.len() as u64,
            live: db.len() as u64,
            manifest_bytes: lines.len() as u64,
            removed_bytes: 0,
            // Row numbers change: an index over the old rows no longer applies.
            index: None,
            pending: NEW[..3]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..db.state.clone()
        };
        self.commit_with_renames(st)?;
        remove_stale_indexes(&self.dir, &[])?;
        Ok(dropped)
    }

    /// Commits a state whose files wait in pending renames, does the renames, commits them done.
    fn commit_with_renames(&mut self, mut st: State) -> Result<()> {
        state::commit(&self.dir, &st)?;
        crash::point("renames-committed");
        finish_renames(&self.dir, &st)?;
        st.pending.clear();
        st.generation += 1;
        state::commit(&self.dir, &st)?;
        crash::point("renames-done");
        self.db = Db::open(&self.dir)?;
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Does the renames of a committed state (a rename whose source is gone was done already).
fn finish_renames(dir: &Path, st: &State) -> Result<usize> {
    let mut n = 0;
    for (from, to) in &st.pending {
        let src = dir.join(from);
        if src.exists() {
            std::fs::rename(&src, dir.join(to))
                .with_context(|| format!("cannot rename {} to {to}", src.display()))?;
            n += 1;
            crash::point("renamed");
        }
    }
    state::sync_dir(dir)?;
    Ok(n)
}

/// Format 1 → 2: the manifest rewritten with ids (= rows) and the files' stamps, an empty
/// `removed.tsv`, `meta.json` with `format: 2`, committed by the first `state.json`. The vectors
/// stay as they are.
fn upgrade(dir: &Path, old: Db) -> Result<Db> {
    let raw = std::fs::read(dir.join(VECTORS))?;
    if raw.len() < NPY_HEADER || old.rows() * old.meta.dim * 4 + NPY_HEADER != raw.len() {
        bail!(
            "{} has a header deeprank did not write: re-run embed to make a DB that can be changed",
            dir.join(VECTORS).display()
        );
    }
    drop(raw);
    let stamps: Vec<Stamp> = old
        .entries
        .par_iter()
        .map(|e| Stamp::of_file(&e.path).unwrap_or_default())
        .collect();
    let mut lines = format!("{}\n", manifest::HEADER_V2).into_bytes();
    for (i, (e, s)) in old.entries.iter().zip(&stamps).enumerate() {
        manifest::write_v2(&mut lines, i as u64, e, s)?;
    }
    write_synced(&dir.join(NEW[1].0), &lines)?;
    write_synced(&dir.join(NEW[2].0), b"")?;
    let mut meta = old.meta.clone();
    meta.format = 2;
    meta.count = old.rows();
    write_synced(
        &dir.join(NEW[3].0),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    crash::point("upgrade-written");
    let n = old.rows() as u64;
    let mut st = State {
        format: 2,
        generation: 1,
        rows: n,
        live: n,
        manifest_bytes: lines.len() as u64,
        removed_bytes: 0,
        next_id: n,
        index: None,
        pending: NEW[1..]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    };
    drop(old);
    state::commit(dir, &st)?;
    crash::point("renames-committed");
    finish_renames(dir, &st)?;
    st.pending.clear();
    st.generation += 1;
    state::commit(dir, &st)?;
    Db::open(dir)
}
