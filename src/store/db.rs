//! The embedding database: a folder with `vectors.npy` (f32, `[n, dim]`, readable by numpy),
//! `manifest.tsv` (id, path, class, file stamp per row; paths escaped losslessly by [`escape_path`]), `removed.tsv` (removed ids), `meta.json`
//! (model identity, input size, dimension) and `state.json` (the commit record: what of the
//! append-only files is committed). `embed` streams a new DB into a temporary folder that replaces
//! the target at the end; `store::commit` changes one in place. Read through a memory map so the
//! vectors are never loaded twice. The format is in `docs/DB-FORMAT.md`.

use crate::store::manifest::{self, Stamp};
pub use crate::store::manifest::{escape_path, serialize_path, unescape_path};
use crate::store::npy::{NpyMap, NpyWriter};
use crate::store::state::{self, State};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const VECTORS: &str = "vectors.npy";
pub const MANIFEST: &str = "manifest.tsv";
pub const META: &str = "meta.json";
pub const REMOVED: &str = "removed.tsv";

/// What produced the vectors: a query must use the same.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// Model identity, e.g. `efficientnet-lite0-imagenet:57934424:pooled` or a run's id.
    pub model: String,
    /// Where the model came from (`pretrained` or a run folder), to re-create it for queries.
    pub model_source: String,
    /// Input side in pixels.
    pub size: u32,
    pub dim: usize,
    /// Live rows when opened (in `meta.json`: the rows `embed` wrote; `state.json` has the count).
    pub count: usize,
    /// Whether the vectors are L2-normalised.
    pub normalized: bool,
    /// The dataset the vectors came from.
    pub data: String,
    pub deeprank_version: String,
    /// 2 for a DB with `state.json`; absent (1) before.
    #[serde(default = "format_1")]
    pub format: u32,
}

fn format_1() -> u32 {
    1
}

/// One row of the manifest. An image without a label has empty class fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub class_id: String,
    pub class_name: String,
}

impl Entry {
    /// The class id, when the image has a label.
    pub fn class(&self) -> Option<&str> {
        (!self.class_id.is_empty()).then_some(self.class_id.as_str())
    }
}

/// Writes a new DB folder (format 2): vectors streamed to a temporary sibling folder, moved in
/// place on finish. Each row's file is hashed and stamped as it is written.
pub struct DbWriter {
    target: PathBuf,
    tmp: PathBuf,
    vectors: Option<NpyWriter>,
    manifest: BufWriter<File>,
    manifest_bytes: u64,
    text: Option<BufWriter<File>>,
    text_path: Option<PathBuf>,
}

impl DbWriter {
    /// Starts a DB at `target`. An existing DB there is replaced at the end; an existing folder that
    /// is not a DB is refused.
    pub fn create(target: &Path, dim: usize, text: Option<&Path>) -> Result<Self> {
        if target.exists() && !target.join(META).is_file() {
            let empty = target.is_dir() && std::fs::read_dir(target)?.next().is_none();
            if !empty {
                bail!(
                    "{} exists and is not a deeprank DB: choose another --out, or remove it",
                    target.display()
                );
            }
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "db".into());
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let vectors = NpyWriter::create(&tmp.join(VECTORS), dim)?;
        let manifest = BufWriter::new(File::create(tmp.join(MANIFEST))?);
        let (text, text_path) = match text {
            Some(p) => {
                let part = p.with_extension("part");
                let f = File::create(&part)
                    .with_context(|| format!("cannot create {}", part.display()))?;
                (Some(BufWriter::new(f)), Some(p.to_path_buf()))
            }
            None => (None, None),
        };
        let mut w = Self {
            target: target.to_path_buf(),
            tmp,
            vectors: Some(vectors),
            manifest,
            manifest_bytes: 0,
            text,
            text_path,
        };
        let header = format!("{}\n", manifest::HEADER_V2);
        w.manifest.write_all(header.as_bytes())?;
        w.manifest_bytes = header.len() as u64;
        Ok(w)
    }

    pub fn push(&mut self, entry: &Entry, vector: &[f32]) -> Result<()> {
        // A file that cannot be read again is stamped unknown (sync then re-reads it).
        let stamp = Stamp::of_file(&entry.path).unwrap_or_default();
        self.push_stamped(entry, vector, &stamp)
    }

    /// Appends a row whose file stamp is known already (e.g. rows read from another store).
    pub fn push_stamped(&mut self, entry: &Entry, vector: &[f32], stamp: &Stamp) -> Result<()> {
        let vectors = self.vectors.as_mut().context("DB already finished")?;
        let id = vectors.rows() as u64;
        vectors.push(vector)?;
        let mut line = Vec::new();
        manifest::write_v2(&mut line, id, entry, stamp)?;
        self.manifest.write_all(&line)?;
        self.manifest_bytes += line.len() as u64;
        if let Some(t) = &mut self.text {
            write!(t, "{}", entry.path.display())?;
            for v in vector {
                write!(t, " {v}")?;
            }
            writeln!(t)?;
        }
        Ok(())
    }

    /// Writes the metadata and the first commit record, and moves the DB into place.
    pub fn finish(mut self, mut meta: Meta) -> Result<PathBuf> {
        let count = self
            .vectors
            .take()
            .context("DB already finished")?
            .finish()?;
        meta.count = count;
        meta.format = 2;
        self.manifest.flush()?;
        self.manifest.get_ref().sync_all()?;
        File::create(self.tmp.join(REMOVED))?.sync_all()?;
        std::fs::write(self.tmp.join(META), serde_json::to_string_pretty(&meta)?)?;
        File::open(self.tmp.join(META))?.sync_all()?;
        state::commit(
            &self.tmp,
            &State {
                format: 2,
                generation: 1,
                rows: count as u64,
                live: count as u64,
                manifest_bytes: self.manifest_bytes,
                removed_bytes: 0,
                next_id: count as u64,
                index: None,
                pending: vec![],
            },
        )?;
        if let (Some(mut t), Some(p)) = (self.text.take(), self.text_path.take()) {
            t.flush()?;
            drop(t);
            std::fs::rename(p.with_extension("part"), &p)?;
        }
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target)
                .with_context(|| format!("cannot replace {}", self.target.display()))?;
        }
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("cannot move the DB to {}", self.target.display()))?;
        Ok(self.target.clone())
    }
}

impl Drop for DbWriter {
    fn drop(&mut self) {
        // Unfinished (error or interrupt): leave no half-written DB or text file behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        if let Some(p) = &self.text_path {
            let _ = std::fs::remove_file(p.with_extension("part"));
        }
    }
}

/// The ANN index file a commit names (`state.index`), memory-mapped when the DB was opened, between
/// the two reads of `state.json` that make an open consistent: the map is always of the index of the
/// commit this view is of. `search::ann` reads the graph from it; an index file that cannot be
/// opened is kept as its error, so searches that do not need the index (`--exact`) still work.
pub struct IndexMap {
    pub path: PathBuf,
    /// The index covers rows `0..rows`; later rows are searched exactly.
    pub rows: usize,
    pub map: std::result::Result<std::sync::Arc<memmap2::Mmap>, String>,
    /// The delta file over it (`state.index.delta`), mapped the same way.
    pub delta: Option<(
        PathBuf,
        std::result::Result<std::sync::Arc<memmap2::Mmap>, String>,
    )>,
}

/// Maps `dir/file` (a name in the DB folder, as `state.json` records it).
fn map_index_file(
    dir: &Path,
    file: &str,
) -> (
    PathBuf,
    std::result::Result<std::sync::Arc<memmap2::Mmap>, String>,
) {
    let path = dir.join(file);
    let map = if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
        Err(format!(
            "{} names the index file {file:?}, which is not a file name in the DB folder",
            dir.join(state::STATE).display()
        ))
    } else {
        File::open(&path)
            .and_then(|f| {
                // SAFETY: index files (graphs and deltas) are written whole under a new name,
                // committed, and never changed in place (an update writes another file).
                unsafe { memmap2::Mmap::map(&f) }
            })
            .map(std::sync::Arc::new)
            .map_err(|e| format!("cannot open the ANN index {}: {e}", path.display()))
    };
    (path, map)
}

impl IndexMap {
    /// Maps the files of the commit's index `ix` in the DB folder `dir`.
    pub fn open(dir: &Path, ix: &state::IndexRef) -> IndexMap {
        let (path, map) = map_index_file(dir, &ix.file);
        IndexMap {
            path,
            rows: ix.rows as usize,
            map,
            delta: ix.delta.as_deref().map(|d| map_index_file(dir, d)),
        }
    }

    /// Why the index cannot be read, when one of its files cannot be mapped.
    pub fn error(&self) -> Option<&str> {
        self.map
            .as_ref()
            .err()
            .or_else(|| self.delta.as_ref().and_then(|(_, m)| m.as_ref().err()))
            .map(|s| s.as_str())
    }
}

/// An opened DB: the committed rows as of one generation. Removed rows are still rows (until a
/// compaction) but are never returned: search through [`Db::is_removed`], count with [`Db::len`].
pub struct Db {
    pub dir: PathBuf,
    pub meta: Meta,
    /// Per row: the manifest entry, its stable id (strictly increasing) and its file's stamp.
    pub entries: Vec<Entry>,
    pub ids: Vec<u64>,
    pub stamps: Vec<Stamp>,
    pub vectors: NpyMap,
    removed: Vec<bool>,
    /// The commit this view is of (generation 0 for a DB written before format 2).
    pub state: State,
    /// The commit's ANN index file, mapped (none when the commit names none).
    pub index: Option<IndexMap>,
}

/// Runs `open` on the file a reader of commit `st` reads for `name`: a pending rename's source while
/// it exists, else `name` itself. The writer may finish the rename between that check and the open
/// (a compaction completing): a source gone by then is retried under `name`, which the rename gave
/// the same content.
fn with_resolved<T>(
    st: &State,
    dir: &Path,
    name: &str,
    open: impl Fn(&Path) -> Result<T>,
) -> Result<T> {
    let p = st.resolve(dir, name);
    let target = dir.join(name);
    match open(&p) {
        Err(_) if p != target && !p.exists() => open(&target),
        r => r,
    }
}

/// How often an open retries when writers keep committing while it reads.
const OPEN_ATTEMPTS: usize = 20;

impl Db {
    /// Opens the committed state; a concurrent writer's uncommitted appends are not seen.
    pub fn open(dir: &Path) -> Result<Db> {
        if !dir.join(META).is_file() {
            bail!(
                "{} is not a deeprank DB (no {META}): create one with `deeprank embed --data DIR --out {}`",
                dir.display(),
                dir.display()
            );
        }
        let mut last = None;
        for attempt in 0..OPEN_ATTEMPTS {
            let before = state::read(dir)?;
            let got = match &before {
                None => Self::open_v1(dir),
                Some(st) => Self::open_v2(dir, st.clone()),
            };
            // Valid only if no commit happened meanwhile (a compaction may have swapped files).
            let after = state::read(dir)?;
            if after == before {
                return got;
            }
            last = got.err();
            std::thread::sleep(std::time::Duration::from_millis(2 << attempt.min(6)));
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no result"))
            .context(format!(
                "{} kept changing while it was being opened",
                dir.display()
            )))
    }

    fn read_meta(path: &Path) -> Result<Meta> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged: re-run embed", path.display()))
    }

    /// A DB without `state.json`: every row committed, ids = row numbers, generation 0.
    fn open_v1(dir: &Path) -> Result<Db> {
        let mut meta = Self::read_meta(&dir.join(META))?;
        let mpath = dir.join(MANIFEST);
        let text =
            std::fs::read(&mpath).with_context(|| format!("cannot open {}", mpath.display()))?;
        let rows = manifest::parse(&text, &mpath, false)?;
        let vectors = NpyMap::open(&dir.join(VECTORS))?;
        if vectors.rows != rows.entries.len() || vectors.dim != meta.dim {
            bail!(
                "{} is inconsistent: {} vectors of dim {}, {} manifest rows, meta dim {}; re-run embed",
                dir.display(),
                vectors.rows,
                vectors.dim,
                rows.entries.len(),
                meta.dim
            );
        }
        let n = rows.entries.len() as u64;
        meta.count = n as usize;
        Ok(Db {
            dir: dir.to_path_buf(),
            meta,
            removed: vec![false; rows.entries.len()],
            entries: rows.entries,
            ids: rows.ids,
            stamps: rows.stamps,
            vectors,
            index: None,
            state: State {
                format: 1,
                generation: 0,
                rows: n,
                live: n,
                manifest_bytes: text.len() as u64,
                removed_bytes: 0,
                next_id: n,
                index: None,
                pending: vec![],
            },
        })
    }

    fn open_v2(dir: &Path, st: State) -> Result<Db> {
        let mut meta = with_resolved(&st, dir, META, Self::read_meta)?;
        let read_prefix = |name: &str, len: u64| -> Result<(PathBuf, Vec<u8>)> {
            let (path, f) = with_resolved(&st, dir, name, |p| {
                let f = File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
                Ok((p.to_path_buf(), f))
            })?;
            let have = f.metadata()?.len();
            if have < len {
                bail!(
                    "{} is shorter ({have} bytes) than its committed length {len}: the DB is damaged",
                    path.display()
                );
            }
            let mut buf = Vec::with_capacity(len as usize);
            f.take(len).read_to_end(&mut buf)?;
            Ok((path, buf))
        };
        let (mpath, text) = read_prefix(MANIFEST, st.manifest_bytes)?;
        let rows = manifest::parse(&text, &mpath, true)?;
        let (rpath, rtext) = read_prefix(REMOVED, st.removed_bytes)?;
        let removed_ids = manifest::parse_removed(&rtext, &rpath)?;
        let n = rows.entries.len();
        let damaged = |what: String| anyhow::anyhow!("{} is damaged: {what}", dir.display());
        if n as u64 != st.rows {
            return Err(damaged(format!(
                "{} manifest rows, the commit record says {}",
                n, st.rows
            )));
        }
        if rows.ids.windows(2).any(|w| w[0] >= w[1])
            || rows.ids.last().is_some_and(|&l| l >= st.next_id)
        {
            return Err(damaged(
                "manifest ids are not increasing below next_id".into(),
            ));
        }
        let mut removed = vec![false; n];
        for id in removed_ids {
            let row = rows
                .ids
                .binary_search(&id)
                .map_err(|_| damaged(format!("{REMOVED} names id {id}, which has no row")))?;
            removed[row] = true;
        }
        let live = removed.iter().filter(|&&r| !r).count() as u64;
        if live != st.live {
            return Err(damaged(format!(
                "{live} live rows, the commit record says {}",
                st.live
            )));
        }
        let vectors = with_resolved(&st, dir, VECTORS, |p| NpyMap::open_prefix(p, n, meta.dim))?;
        meta.count = live as usize;
        let index = st.index.as_ref().map(|ix| IndexMap::open(dir, ix));
        Ok(Db {
            index,
            dir: dir.to_path_buf(),
            meta,
            entries: rows.entries,
            ids: rows.ids,
            stamps: rows.stamps,
            vectors,
            removed,
            state: st,
        })
    }

    /// Live rows (removed ones not counted).
    pub fn len(&self) -> usize {
        self.state.live as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the files, removed ones included.
    pub fn rows(&self) -> usize {
        self.entries.len()
    }

    pub fn is_removed(&self, row: usize) -> bool {
        self.removed[row]
    }

    /// The rows not removed, in order.
    pub fn live_rows(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows()).filter(|&r| !self.removed[r])
    }

    /// The row of a live id.
    pub fn row_of(&self, id: u64) -> Option<usize> {
        self.ids
            .binary_search(&id)
            .ok()
            .filter(|&r| !self.removed[r])
    }

    /// Extends the removed flags over rows just appended to this in-memory view.
    pub(crate) fn grow_removed(&mut self, added: usize) {
        self.removed.resize(self.removed.len() + added, false);
        self.state.live += added as u64;
    }

    /// Marks a row removed in this in-memory view (the writer's, after it committed the removal).
    pub(crate) fn mark_removed(&mut self, row: usize) {
        if !self.removed[row] {
            self.removed[row] = true;
            self.state.live -= 1;
            self.meta.count = self.state.live as usize;
        }
    }

    /// Whether any image of the DB has a label (a DB of an unlabelled folder has none).
    pub fn is_labelled(&self) -> bool {
        self.entries.iter().any(|e| e.class().is_some())
    }

    /// Number of distinct classes (0 for an unlabelled DB).
    pub fn class_count(&self) -> usize {
        let set: std::collections::HashSet<&str> = self
            .live_rows()
            .filter_map(|r| self.entries[r].class())
            .collect();
        set.len()
    }
}
