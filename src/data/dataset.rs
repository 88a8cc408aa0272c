//! Datasets: Tiny ImageNet layout and plain class-folder trees, scanned into a deterministic list of
//! labelled image paths. (Any folder tree, labelled or not, is a [`crate::data::collection`]; a
//! `Dataset` is one whose every image has a class, what training and evaluation need.)
//!
//! Layouts, detected from what the folder holds:
//! - Tiny ImageNet root: `wnids.txt` + `train/<wnid>/images/*` (+ `val/`), class names from `words.txt`.
//! - Tiny ImageNet val folder: `val_annotations.txt` + `images/`.
//! - Class folders: `root/<class>/**/*.{jpg,jpeg,png,webp,gif,bmp,tif,tiff}` (any depth below the class folder, e.g.
//!   `root/<class>/images/*`); a root holding `train/` and `val/` class-folder trees is opened on
//!   the split asked for.
//! - A label file: `path<TAB>class` rows (see [`crate::data::collection::Labels`]).

use crate::data::collection::{Collection, Labels};
use crate::data::skipped::Skipped;
use crate::data::walk::reason_not_image;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Which part of a dataset root to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training images (the database).
    Train,
    /// The held-out images (the queries).
    Val,
}

/// How the folder was laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    TinyImagenetTrain,
    TinyImagenetVal,
    ClassFolders,
    /// Classes from a `path<TAB>class` file.
    LabelFile,
    /// No labels (only ever a [`crate::data::collection::Collection`], never a `Dataset`).
    Unlabelled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    /// Stable identifier (the wnid, or the folder name).
    pub id: String,
    /// Human-readable name (from `words.txt` when present, else the id).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    /// Index into [`Dataset::classes`].
    pub class: usize,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub classes: Vec<Class>,
    pub items: Vec<Item>,
    /// Files that were seen but left out (not an image extension, unreadable, no label, ...), each
    /// with the reason (reported, not used).
    pub ignored: Vec<Skipped>,
}

/// The image extensions we decode (matched in any case): the one list every part of the crate uses.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// True when the path has an image extension we decode (jpg, jpeg, png, webp, gif, bmp, tif,
/// tiff; any case). The decoder itself goes by the content, not by this name.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
        .unwrap_or(false)
}

impl Dataset {
    /// Opens `dir` on `split`, detecting the layout; an error when its images have no labels.
    pub fn open(dir: &Path, split: Split) -> Result<Dataset> {
        Dataset::open_labelled(dir, split, &Labels::Auto)
    }

    /// Opens `dir` on `split` with the labels `labels` says; an error (saying how to give labels)
    /// when none of its images has one. Images without a label are left out, with the reason.
    pub fn open_labelled(dir: &Path, split: Split, labels: &Labels) -> Result<Dataset> {
        Collection::open(dir, split, labels)?.into_dataset()
    }

    /// Number of images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for it in &self.items {
            counts[it.class] += 1;
        }
        counts
    }

    /// A one-line description for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} images in {} classes ({:?}) from {}",
            self.items.len(),
            self.classes.len(),
            self.layout,
            self.root.display()
        )
    }
}

/// The Tiny ImageNet layouts: a root (`wnids.txt` + `train/`) opened on `split`, or a val folder
/// (`val_annotations.txt`); `None` when `dir` is neither.
pub(crate) fn open_tiny(dir: &Path, split: Split) -> Result<Option<Dataset>> {
    if dir.join("wnids.txt").is_file() && dir.join("train").is_dir() {
        Ok(Some(match split {
            Split::Train => open_tiny_train(dir)?,
            Split::Val => {
                let val = dir.join("val");
                if !val.join("val_annotations.txt").is_file() {
                    bail!(
                        "{} has no val/val_annotations.txt: pass the query folder itself",
                        dir.display()
                    );
                }
                open_tiny_val(&val)?
            }
        }))
    } else if dir.join("val_annotations.txt").is_file() {
        Ok(Some(open_tiny_val(dir)?))
    } else {
        Ok(None)
    }
}

/// A root holding only `train/`, `val/` (and `test/`) folders and no images of its own: the
/// folder of `split`.
pub(crate) fn split_folder(dir: &Path, split: Split) -> Result<Option<PathBuf>> {
    let sub = match split {
        Split::Train => dir.join("train"),
        Split::Val => dir.join("val"),
    };
    if !sub.is_dir() {
        return Ok(None);
    }
    for e in read_dir_sorted(dir)? {
        if e.is_dir() {
            let n = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !matches!(n, "train" | "val" | "test") {
                return Ok(None);
            }
        } else if has_image_extension(&e) {
            return Ok(None);
        }
    }
    Ok(Some(sub))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads `words.txt` (wnid TAB names) from `dir` or its parent; first name of each line.
pub(crate) fn read_words(dir: &Path) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for cand in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = cand.join("words.txt");
        if let Ok(text) = fs::read_to_string(&p) {
            for line in text.lines() {
                if let Some((id, names)) = line.split_once('\t') {
                    let first = names.split(',').next().unwrap_or(names).trim();
                    map.insert(id.trim().to_string(), first.to_string());
                }
            }
            break;
        }
    }
    map
}

fn read_wnids(path: &Path) -> Result<Vec<String>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

pub(crate) fn make_classes(ids: Vec<String>, words: &HashMap<String, String>) -> Vec<Class> {
    ids.into_iter()
        .map(|id| Class {
            name: words.get(&id).cloned().unwrap_or_else(|| id.clone()),
            id,
        })
        .collect()
}

/// Lists the images of one class folder (or its `images/` subfolder), sorted.
fn class_images(dir: &Path, ignored: &mut Vec<Skipped>) -> Result<Vec<PathBuf>> {
    let img_dir = if dir.join("images").is_dir() {
        dir.join("images")
    } else {
        dir.to_path_buf()
    };
    let mut out = Vec::new();
    for p in read_dir_sorted(&img_dir)? {
        if p.is_dir() {
            continue;
        }
        if has_image_extension(&p) {
            out.push(p);
        } else {
            ignored.push(Skipped {
                reason: reason_not_image(&p),
                path: p,
            });
        }
    }
    Ok(out)
}

fn open_tiny_train(root: &Path) -> Result<Dataset> {
    let wnids = read_wnids(&root.join("wnids.txt"))?;
    let words = read_words(root);
    let mut items = Vec::new();
    let mut ignored = Vec::new();
    for (ci, w) in wnids.iter().enumerate() {
        let d = root.join("train").join(w);
        if !d.is_dir() {
            bail!(
                "{} lists class {w} but {} is missing: the Tiny ImageNet copy is incomplete",
                root.join("wnids.txt").display(),
                d.display()
            );
        }
        for p in class_images(&d, &mut ignored)? {
            items.push(Item { path: p, class: ci });
        }
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        layout: Layout::TinyImagenetTrain,
        classes: make_classes(wnids, &words),
        items,
        ignored,
    })
}

fn open_tiny_val(dir: &Path) -> Result<Dataset> {
    let ann = dir.join("val_annotations.txt");
    let text =
        fs::read_to_string(&ann).with_context(|| format!("cannot read {}", ann.display()))?;
    let parent_wnids = dir.parent().map(|p| p.join("wnids.txt"));
    let mut wnids: Vec<String> = match parent_wnids {
        Some(p) if p.is_file() => read_wnids(&p)?,
        _ => Vec::new(),
    };
    let mut index: HashMap<String, usize> = wnids
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i))
        .collect();
    let mut items = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split('\t');
        let (Some(file), Some(wnid)) = (f.next(), f.next()) else {
            bail!(
                "{} line {}: expected `file<TAB>wnid`, got {line:?}",
                ann.display(),
                ln + 1
            );
        };
        let ci = *index.entry(wnid.to_string()).or_insert_with(|| {
            wnids.push(wnid.to_string());
            wnids.len() - 1
        });
        items.push(Item {
            path: dir.join("images").join(file),
            class: ci,
        });
    }
    items.sort_by(|a, b| a.path.cmp(&b.path));
    let words = read_words(dir);
    Ok(Dataset {
        root: dir.to_path_buf(),
        layout: Layout::TinyImagenetVal,
        classes: make_classes(wnids, &words),
        items,
        ignored: Vec::new(),
    })
}
