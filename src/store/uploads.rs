//! Images uploaded into a collection (`serve --writable`): kept in `DB/uploads/` as
//! `<first 12 hex digits of the SHA-256>-<cleaned file name>`, then committed as a row like any
//! added file. The same bytes twice are stored once.

use crate::data::dataset::has_image_extension;
use crate::store::changes::normalize;
use crate::store::commit::{Change, NewRow, Wait, Writer};
use crate::store::db::Entry;
use crate::store::manifest::{Stamp, hex, sha256};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const UPLOADS: &str = "uploads";

/// What storing an upload did.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub path: PathBuf,
    /// The bytes were in the DB already (under `id`); nothing was written.
    pub duplicate: bool,
    pub generation: u64,
    pub live: usize,
}

/// A file name safe to keep: letters, digits, `.`, `-`, `_` (others become `_`), at most 80
/// characters, with an image extension (from the content when the name has none).
pub fn safe_name(name: &str, bytes: &[u8]) -> String {
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        clean = "upload".into();
    }
    if !has_image_extension(Path::new(&clean)) {
        let ext = if bytes.starts_with(b"\x89PNG") {
            "png"
        } else {
            "jpg"
        };
        clean = format!("{clean}.{ext}");
    }
    clean
}

/// Stores an uploaded image and its vector (computed by the caller with the DB's model).
pub fn store_upload(dir: &Path, bytes: &[u8], name: &str, vector: Vec<f32>) -> Result<Stored> {
    let mut w = Writer::open(dir, Wait::Block)?;
    let hash = sha256(bytes);
    let db = w.db();
    if let Some(r) = db.live_rows().find(|&r| db.stamps[r].sha256 == Some(hash)) {
        return Ok(Stored {
            id: db.ids[r],
            path: db.entries[r].path.clone(),
            duplicate: true,
            generation: db.state.generation,
            live: db.len(),
        });
    }
    let path = write_upload(&dir.join(UPLOADS), &hash, name, bytes)?;
    let stamp = Stamp::of_file(&path)?;
    let ids = w.commit(&Change {
        add: vec![NewRow {
            entry: Entry {
                path: path.clone(),
                class_id: String::new(),
                class_name: String::new(),
            },
            stamp,
            vector,
        }],
        remove: Vec::new(),
    })?;
    Ok(Stored {
        id: ids[0],
        path,
        duplicate: false,
        generation: w.db().state.generation,
        live: w.db().len(),
    })
}

/// Writes an upload's bytes durably into `folder` (created if missing) as
/// `<first 12 hex digits of the SHA-256>-<cleaned name>`: a temporary file, flushed to disk,
/// renamed into place, the folder flushed. Returns the file's absolute path.
pub fn write_upload(folder: &Path, hash: &[u8; 32], name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let folder = normalize(folder);
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let path = folder.join(format!("{}-{}", &hex(hash)[..12], safe_name(name, bytes)));
    // Unique per call: uploads into a store are not serialised by a writer lock.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = folder.join(format!(".upload-{}-{seq}.tmp", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(&folder) {
        let _ = d.sync_all();
    }
    Ok(path)
}
