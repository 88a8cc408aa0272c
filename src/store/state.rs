//! `state.json`, the commit record of a DB folder (format 2): how many rows of `vectors.npy` and how
//! many bytes of `manifest.tsv` and `removed.tsv` are committed, the next id, renames still to do.
//! Replacing it (write `state.json.tmp`, fsync, rename, fsync the folder) is the one commit point of
//! every change; readers and writers trust it, not the files' lengths. See `docs/DB-FORMAT.md`.

use crate::store::crash;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATE: &str = "state.json";
pub const STATE_TMP: &str = "state.json.tmp";

/// An ANN index file over the first `rows` committed rows (the hook for the index; rows past it are
/// searched exactly). A commit that renumbers rows (compaction) drops it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexRef {
    pub file: String,
    pub rows: u64,
    /// A delta file over `file` (the lists later inserts changed or added), read with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
}

impl IndexRef {
    /// The files this index is read from: the base, then the delta when there is one.
    pub fn files(&self) -> Vec<&str> {
        std::iter::once(self.file.as_str())
            .chain(self.delta.as_deref())
            .collect()
    }
}

/// The committed state of a DB.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// 2 (a DB without `state.json` is format 1, read as generation 0).
    pub format: u32,
    /// Grows by one with every commit.
    pub generation: u64,
    /// Committed rows of `vectors.npy` and `manifest.tsv` (live and removed).
    pub rows: u64,
    /// Rows not removed.
    pub live: u64,
    /// Committed byte lengths of the append-only text files.
    pub manifest_bytes: u64,
    pub removed_bytes: u64,
    /// The id the next added row gets (ids are never reused).
    pub next_id: u64,
    #[serde(default)]
    pub index: Option<IndexRef>,
    /// Renames `[from, to]` (file names in the DB folder) that complete this state: done by the
    /// writer that committed it, redone by the next writer after a crash. Readers read `from`
    /// while it exists, else `to`.
    #[serde(default)]
    pub pending: Vec<(String, String)>,
}

impl State {
    /// The file a reader must open for `name` in this state (a pending rename's source while it
    /// exists).
    pub fn resolve(&self, dir: &Path, name: &str) -> PathBuf {
        for (from, to) in &self.pending {
            if to == name && dir.join(from).exists() {
                return dir.join(from);
            }
        }
        dir.join(name)
    }
}

/// Reads `state.json`; `None` for a DB written before format 2.
pub fn read(dir: &Path) -> Result<Option<State>> {
    let path = dir.join(STATE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let st: State = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is damaged (it is only ever replaced whole): restore the DB from a backup or re-run embed",
            path.display()
        )
    })?;
    if st.format != 2 {
        bail!(
            "{} has format {}; this deeprank reads format 2: use a matching deeprank",
            path.display(),
            st.format
        );
    }
    Ok(Some(st))
}

/// Flushes a folder's entries (a rename inside it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(dir: &Path, name: &str, tmp: &str, bytes: &[u8]) -> Result<()> {
    let tmp_path = dir.join(tmp);
    let mut f =
        File::create(&tmp_path).with_context(|| format!("cannot create {}", tmp_path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    crash::point("state-written");
    std::fs::rename(&tmp_path, dir.join(name))
        .with_context(|| format!("cannot replace {}", dir.join(name).display()))?;
    crash::point("state-renamed");
    sync_dir(dir)
}

/// Commits `st`: the moment `state.json` is replaced is the moment the change happens.
pub fn commit(dir: &Path, st: &State) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(st)?;
    text.push(b'\n');
    write_atomic(dir, STATE, STATE_TMP, &text)
}
