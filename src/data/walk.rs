//! Every image under a folder, recursively, in a deterministic order, and every file left out with
//! the reason.
//!
//! Rules: entries are visited in sorted order, depth first (so the list is sorted by path
//! components); names starting with `.` (hidden files and folders) are skipped silently; the image
//! extension check ignores case ([`crate::data::dataset::IMAGE_EXTENSIONS`] is the one list of
//! supported extensions); symbolic links are followed, to files and to folders, and a folder
//! reached a second time (a symlink loop, or two links to one folder) is walked once and reported
//! the second time, so a loop never hangs and no image is listed twice through links.

use crate::data::dataset::{IMAGE_EXTENSIONS, has_image_extension};
use crate::data::skipped::Skipped;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Image formats by extension that are recognised but not decoded (said so when left out).
const UNSUPPORTED_IMAGE_EXTENSIONS: [&str; 19] = [
    "heic", "heif", "avif", "jxl", "svg", "psd", "ico", "raw", "dng", "cr2", "cr3", "nef", "arw",
    "orf", "rw2", "raf", "jp2", "pnm", "tga",
];

/// What a walk found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Supported images, sorted by path.
    pub images: Vec<PathBuf>,
    /// Files and folders left out, each with the reason.
    pub left_out: Vec<Skipped>,
}

/// Why a file that is not a supported image was left out: an image format that is not decoded,
/// or no image extension at all.
pub fn reason_not_image(path: &Path) -> String {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.is_empty()
        && UNSUPPORTED_IMAGE_EXTENSIONS
            .iter()
            .any(|x| ext.eq_ignore_ascii_case(x))
    {
        format!(
            "unsupported image format .{} (supported: {})",
            ext.to_ascii_lowercase(),
            supported_list()
        )
    } else if ext.is_empty() {
        "not an image extension (no extension)".to_string()
    } else {
        format!("not an image extension (.{ext})")
    }
}

/// The supported extensions as `.jpg, .jpeg, .png, ...`.
pub fn supported_list() -> String {
    IMAGE_EXTENSIONS
        .iter()
        .map(|e| format!(".{e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy().starts_with('.'))
        .unwrap_or(false)
}

/// Lists every supported image under `root` (see the module docs for the rules). Files for which
/// `quiet` is true (those the caller reads itself, e.g. `words.txt`) are left out unreported.
pub fn walk(root: &Path, quiet: &dyn Fn(&Path) -> bool) -> Result<Listing> {
    let mut out = Listing::default();
    let mut seen = HashSet::new();
    let canon =
        fs::canonicalize(root).with_context(|| format!("cannot read folder {}", root.display()))?;
    seen.insert(canon);
    let entries =
        read_sorted(root).with_context(|| format!("cannot read folder {}", root.display()))?;
    walk_into(entries, &mut seen, quiet, &mut out);
    Ok(out)
}

fn read_sorted(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        v.push(e?.path());
    }
    v.sort();
    Ok(v)
}

fn walk_into(
    entries: Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    quiet: &dyn Fn(&Path) -> bool,
    out: &mut Listing,
) {
    for p in entries {
        if is_hidden(&p) || quiet(&p) {
            continue;
        }
        let left = |reason: String| Skipped {
            path: p.clone(),
            reason,
        };
        // fs::metadata follows symbolic links; a dangling one fails here.
        let meta = match fs::metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                let dangling = fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink());
                out.left_out.push(left(if dangling {
                    "unreadable: a symbolic link to nothing".to_string()
                } else {
                    format!("unreadable: {e}")
                }));
                continue;
            }
        };
        if meta.is_dir() {
            let canon = match fs::canonicalize(&p) {
                Ok(c) => c,
                Err(e) => {
                    out.left_out.push(left(format!("unreadable folder: {e}")));
                    continue;
                }
            };
            if !seen.insert(canon.clone()) {
                out.left_out.push(left(format!(
                    "folder already walked as {} (symbolic link loop or second link)",
                    canon.display()
                )));
                continue;
            }
            match read_sorted(&p) {
                Ok(sub) => walk_into(sub, seen, quiet, out),
                Err(e) => out.left_out.push(left(format!("unreadable folder: {e}"))),
            }
        } else if !meta.is_file() {
            out.left_out
                .push(left("not a regular file (device, pipe or socket)".into()));
        } else if has_image_extension(&p) {
            out.images.push(p);
        } else {
            out.left_out.push(left(reason_not_image(&p)));
        }
    }
}

/// A count of left-out files per reason kind, most frequent first, e.g.
/// `3 not an image extension (first: a/notes.txt); 1 unreadable (first: b.jpg)`.
pub fn summarise(left_out: &[Skipped]) -> String {
    let mut kinds: Vec<(String, usize, &Path)> = Vec::new();
    for s in left_out {
        // The kind is the reason up to its first detail: "not an image extension", "unsupported
        // image format .heic", "unreadable", ...
        let kind = s
            .reason
            .split([':', '('])
            .next()
            .unwrap_or(&s.reason)
            .trim()
            .to_string();
        match kinds.iter_mut().find(|k| k.0 == kind) {
            Some(k) => k.1 += 1,
            None => kinds.push((kind, 1, &s.path)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds
        .iter()
        .map(|(k, n, p)| format!("{n} {k} (first: {})", p.display()))
        .collect::<Vec<_>>()
        .join("; ")
}
