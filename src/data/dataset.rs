//! Datasets: Tiny ImageNet layout and plain class-folder trees, scanned into a deterministic list of
//! labelled image paths.
//!
//! Layouts, detected from what the folder holds:
//! - Tiny ImageNet root: `wnids.txt` + `train/<wnid>/images/*` (+ `val/`), class names from `words.txt`.
//! - Tiny ImageNet val folder: `val_annotations.txt` + `images/`.
//! - Class folders: `root/<class>/*.{jpg,jpeg,png}` (or `root/<class>/images/*`); a root holding
//!   `train/` and `val/` class-folder trees is opened on the split asked for.

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
    /// Files that were seen but are not images by their extension (reported, not used).
    pub ignored: Vec<PathBuf>,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// True when the path has an image extension we decode (jpg, jpeg, png; any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
        .unwrap_or(false)
}

impl Dataset {
    /// Opens `dir` on `split`, detecting the layout.
    pub fn open(dir: &Path, split: Split) -> Result<Dataset> {
        if !dir.exists() {
            bail!(
                "data folder {} does not exist: pass a Tiny ImageNet root (wnids.txt, train/) or a folder of class folders",
                dir.display()
            );
        }
        if !dir.is_dir() {
            bail!("{} is not a folder: pass a dataset folder", dir.display());
        }
        let ds = if dir.join("wnids.txt").is_file() && dir.join("train").is_dir() {
            match split {
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
            }
        } else if dir.join("val_annotations.txt").is_file() {
            open_tiny_val(dir)?
        } else {
            let sub = match split {
                Split::Train => dir.join("train"),
                Split::Val => dir.join("val"),
            };
            if sub.is_dir() && has_only_split_folders(dir)? {
                return Dataset::open(&sub, split);
            }
            open_class_folders(dir)?
        };
        if ds.items.is_empty() {
            bail!(
                "no images (.jpg, .jpeg, .png) found under {}: check the path and layout",
                dir.display()
            );
        }
        Ok(ds)
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

fn has_only_split_folders(dir: &Path) -> Result<bool> {
    for e in read_dir_sorted(dir)? {
        if e.is_dir() {
            let n = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !matches!(n, "train" | "val" | "test") {
                return Ok(false);
            }
        }
    }
    Ok(true)
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
fn read_words(dir: &Path) -> HashMap<String, String> {
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

fn make_classes(ids: Vec<String>, words: &HashMap<String, String>) -> Vec<Class> {
    ids.into_iter()
        .map(|id| Class {
            name: words.get(&id).cloned().unwrap_or_else(|| id.clone()),
            id,
        })
        .collect()
}

/// Lists the images of one class folder (or its `images/` subfolder), sorted.
fn class_images(dir: &Path, ignored: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
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
            ignored.push(p);
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

fn open_class_folders(root: &Path) -> Result<Dataset> {
    let words = read_words(root);
    let mut ids = Vec::new();
    let mut items = Vec::new();
    let mut ignored = Vec::new();
    for d in read_dir_sorted(root)? {
        if !d.is_dir() {
            if has_image_extension(&d) {
                ignored.push(d);
            }
            continue;
        }
        let Some(name) = d.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            ignored.push(d);
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let imgs = class_images(&d, &mut ignored)?;
        if imgs.is_empty() {
            continue;
        }
        let ci = ids.len();
        ids.push(name);
        items.extend(imgs.into_iter().map(|p| Item { path: p, class: ci }));
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        layout: Layout::ClassFolders,
        classes: make_classes(ids, &words),
        items,
        ignored,
    })
}
