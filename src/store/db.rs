//! The embedding database: a folder with `vectors.npy` (f32, `[n, dim]`, readable by numpy),
//! `manifest.tsv` (path, class id, class name per row; paths escaped losslessly by [`escape_path`])
//! and `meta.json` (model identity, input size, dimension). Written by streaming into a temporary
//! folder that replaces the target at the end; read through a memory map so the vectors are never
//! loaded twice.

use crate::store::npy::{NpyMap, NpyWriter};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub const VECTORS: &str = "vectors.npy";
pub const MANIFEST: &str = "manifest.tsv";
pub const META: &str = "meta.json";

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
    pub count: usize,
    /// Whether the vectors are L2-normalised.
    pub normalized: bool,
    /// The dataset the vectors came from.
    pub data: String,
    pub deeprank_version: String,
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

/// Writes a DB folder: vectors streamed to a temporary sibling folder, moved in place on finish.
pub struct DbWriter {
    target: PathBuf,
    tmp: PathBuf,
    vectors: Option<NpyWriter>,
    manifest: BufWriter<File>,
    text: Option<BufWriter<File>>,
    text_path: Option<PathBuf>,
}

fn clean_field(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// Writes a path as one manifest field, losslessly: `\` becomes `\\`, tab, newline and carriage
/// return become `\t`, `\n`, `\r`, and each byte of a file name that is not UTF-8 becomes `\xHH`.
/// Plain UTF-8 paths without those characters are written as they are. [`unescape_path`] reverses it.
pub fn escape_path(path: &Path) -> String {
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    #[cfg(not(unix))]
    let lossy = path.to_string_lossy();
    #[cfg(not(unix))]
    let bytes = lossy.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// Serialises a path as text: as it is when it is UTF-8, else in the manifest's escaped form
/// (JSON cannot hold the raw bytes).
pub fn serialize_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    match path.to_str() {
        Some(t) => s.serialize_str(t),
        None => s.serialize_str(&escape_path(path)),
    }
}

/// Reads a manifest path field written by [`escape_path`]. A backslash that starts no escape is
/// kept as it is (manifests written before escaping hold such paths verbatim).
pub fn unescape_path(field: &str) -> PathBuf {
    let s = field.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            let hex = |j: usize| s.get(j).and_then(|&c| (c as char).to_digit(16));
            let (byte, len) = match s.get(i + 1) {
                Some(b'\\') => (b'\\', 2),
                Some(b't') => (b'\t', 2),
                Some(b'n') => (b'\n', 2),
                Some(b'r') => (b'\r', 2),
                Some(b'x') => match (hex(i + 2), hex(i + 3)) {
                    (Some(h), Some(l)) => ((h * 16 + l) as u8, 4),
                    _ => (b'\\', 1),
                },
                _ => (b'\\', 1),
            };
            out.push(byte);
            i += len;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    #[cfg(unix)]
    {
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(&out).into_owned())
    }
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
            text,
            text_path,
        };
        writeln!(w.manifest, "path\tclass_id\tclass_name")?;
        Ok(w)
    }

    pub fn push(&mut self, entry: &Entry, vector: &[f32]) -> Result<()> {
        self.vectors
            .as_mut()
            .context("DB already finished")?
            .push(vector)?;
        writeln!(
            self.manifest,
            "{}\t{}\t{}",
            escape_path(&entry.path),
            clean_field(&entry.class_id),
            clean_field(&entry.class_name)
        )?;
        if let Some(t) = &mut self.text {
            write!(t, "{}", entry.path.display())?;
            for v in vector {
                write!(t, " {v}")?;
            }
            writeln!(t)?;
        }
        Ok(())
    }

    /// Writes the metadata and moves the DB into place.
    pub fn finish(mut self, mut meta: Meta) -> Result<PathBuf> {
        let count = self
            .vectors
            .take()
            .context("DB already finished")?
            .finish()?;
        meta.count = count;
        self.manifest.flush()?;
        std::fs::write(self.tmp.join(META), serde_json::to_string_pretty(&meta)?)?;
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

/// An opened DB.
pub struct Db {
    pub dir: PathBuf,
    pub meta: Meta,
    pub entries: Vec<Entry>,
    pub vectors: NpyMap,
}

impl Db {
    pub fn open(dir: &Path) -> Result<Db> {
        if !dir.join(META).is_file() {
            bail!(
                "{} is not a deeprank DB (no {META}): create one with `deeprank embed --data DIR --out {}`",
                dir.display(),
                dir.display()
            );
        }
        let meta_path = dir.join(META);
        let meta: Meta = std::fs::read_to_string(&meta_path)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(serde_json::from_str(&text)?))
            .with_context(|| format!("{} is damaged: re-run embed", meta_path.display()))?;
        let f = File::open(dir.join(MANIFEST))
            .with_context(|| format!("cannot open {}", dir.join(MANIFEST).display()))?;
        // `count` is only a hint (a damaged meta.json must not reserve memory).
        let mut entries = Vec::with_capacity(meta.count.min(1 << 16));
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| {
                format!(
                    "{} line {} is damaged (not UTF-8 text): re-run embed",
                    dir.join(MANIFEST).display(),
                    i + 1
                )
            })?;
            if i == 0 {
                continue;
            }
            let mut p = line.split('\t');
            let (Some(path), Some(id), Some(name)) = (p.next(), p.next(), p.next()) else {
                bail!("{} line {} is damaged", dir.join(MANIFEST).display(), i + 1);
            };
            entries.push(Entry {
                path: unescape_path(path),
                class_id: id.to_string(),
                class_name: name.to_string(),
            });
        }
        let vectors = NpyMap::open(&dir.join(VECTORS))?;
        if vectors.rows != entries.len() || vectors.dim != meta.dim {
            bail!(
                "{} is inconsistent: {} vectors of dim {}, {} manifest rows, meta dim {}; re-run embed",
                dir.display(),
                vectors.rows,
                vectors.dim,
                entries.len(),
                meta.dim
            );
        }
        Ok(Db {
            dir: dir.to_path_buf(),
            meta,
            entries,
            vectors,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any image of the DB has a label (a DB of an unlabelled folder has none).
    pub fn is_labelled(&self) -> bool {
        self.entries.iter().any(|e| e.class().is_some())
    }

    /// Number of distinct classes (0 for an unlabelled DB).
    pub fn class_count(&self) -> usize {
        let set: std::collections::HashSet<&str> =
            self.entries.iter().filter_map(Entry::class).collect();
        set.len()
    }
}
