//! Any folder of images as a collection: every supported image under a root, recursively (see
//! [`crate::data::walk`] for the rules), with a class per image when labels are known.
//!
//! Labels ([`Labels`]): `auto` picks the Tiny ImageNet layout when the folder is one, class
//! folders when every image sits in a sub-folder (`root/<class>/**`, or `root/train|val/<class>`),
//! and otherwise none; `none`, `folders`, `tiny-imagenet` force one; a `path<TAB>class` file
//! labels the images it lists (paths relative to the root). Embedding, querying, serving and
//! finding duplicates work on unlabelled collections; training and evaluation need a
//! [`Dataset`], which [`Collection::into_dataset`] refuses to make without labels.

use crate::data::dataset::{self, Class, Dataset, Item, Layout, Split};
use crate::data::skipped::Skipped;
use crate::data::walk::{self, Listing, supported_list};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

/// Where the classes of a collection come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labels {
    /// Tiny ImageNet when it is one, class folders when every image sits in a sub-folder, else none.
    Auto,
    /// No classes.
    None,
    /// The first folder below the root is the class; images directly in the root are left out.
    Folders,
    /// The Tiny ImageNet layout (an error when the folder is not one).
    TinyImagenet,
    /// `path<TAB>class[<TAB>name]` rows, paths relative to the root.
    File(PathBuf),
}

impl Labels {
    /// `auto`, `none`, `folders`, `tiny-imagenet`, or the path of a label file.
    pub fn parse(s: &str) -> Labels {
        match s {
            "auto" => Labels::Auto,
            "none" => Labels::None,
            "folders" => Labels::Folders,
            "tiny-imagenet" => Labels::TinyImagenet,
            f => Labels::File(PathBuf::from(f)),
        }
    }
}

/// One image of a collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Photo {
    pub path: PathBuf,
    /// Index into [`Collection::classes`], when the image has a label.
    pub class: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Collection {
    pub root: PathBuf,
    pub layout: Layout,
    pub classes: Vec<Class>,
    pub items: Vec<Photo>,
    /// Files seen but left out, each with the reason.
    pub left_out: Vec<Skipped>,
    /// Why the images have no labels (when they have none), for the error of commands that need them.
    pub unlabelled_because: Option<String>,
}

/// Files the dataset layouts read themselves: never reported as left out.
fn is_metadata(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("wnids.txt" | "words.txt" | "val_annotations.txt")
    )
}

impl From<Dataset> for Collection {
    fn from(ds: Dataset) -> Collection {
        Collection {
            root: ds.root,
            layout: ds.layout,
            classes: ds.classes,
            items: ds
                .items
                .into_iter()
                .map(|i| Photo {
                    path: i.path,
                    class: Some(i.class),
                })
                .collect(),
            left_out: ds.ignored,
            unlabelled_because: None,
        }
    }
}

impl Collection {
    /// Opens every image under `dir`, labelled as `labels` says (`split` picks the part of a
    /// Tiny ImageNet or `train/`+`val/` root).
    pub fn open(dir: &Path, split: Split, labels: &Labels) -> Result<Collection> {
        if !dir.exists() {
            bail!(
                "data folder {} does not exist: pass a folder of images (any tree), a Tiny ImageNet root or class folders",
                dir.display()
            );
        }
        if !dir.is_dir() {
            bail!("{} is not a folder: pass a folder of images", dir.display());
        }
        if matches!(labels, Labels::Auto | Labels::TinyImagenet) {
            if let Some(ds) = dataset::open_tiny(dir, split)? {
                return non_empty(Collection::from(ds));
            }
            if *labels == Labels::TinyImagenet {
                bail!(
                    "{} is not a Tiny ImageNet folder (wnids.txt + train/, or val_annotations.txt + images/): \
                     pass --labels auto, folders, none or a label file",
                    dir.display()
                );
            }
        }
        if matches!(labels, Labels::Auto | Labels::Folders)
            && let Some(sub) = dataset::split_folder(dir, split)?
        {
            return Collection::open(&sub, split, labels);
        }
        let label_file = match labels {
            Labels::File(f) => Some(f.canonicalize().with_context(|| {
                format!(
                    "cannot read the label file {}: --labels takes auto, none, folders, \
                         tiny-imagenet or the path of a file of `path<TAB>class` rows",
                    f.display()
                )
            })?),
            _ => None,
        };
        let quiet = |p: &Path| {
            is_metadata(p)
                || label_file
                    .as_ref()
                    .is_some_and(|f| p.canonicalize().is_ok_and(|c| &c == f))
        };
        let listing = walk::walk(dir, &quiet)?;
        let c = match labels {
            Labels::Auto => {
                let loose = listing.images.iter().find(|p| p.parent() == Some(dir));
                match loose {
                    None if !listing.images.is_empty() => class_folders(dir, listing),
                    _ => {
                        let why = match loose {
                            Some(p) => format!(
                                "images sit directly in it (first: {}), so its folders are not classes",
                                p.display()
                            ),
                            None => "no class folders".into(),
                        };
                        unlabelled(dir, listing, why)
                    }
                }
            }
            Labels::Folders => class_folders(dir, listing),
            Labels::None | Labels::TinyImagenet => unlabelled(dir, listing, "--labels none".into()),
            Labels::File(f) => label_file_classes(dir, listing, f)?,
        };
        non_empty(c)
    }

    /// Whether any image has a class.
    pub fn is_labelled(&self) -> bool {
        self.items.iter().any(|i| i.class.is_some())
    }

    /// The labelled images as a [`Dataset`] (those without a label are left out, with the
    /// reason); an error saying how to give labels when there are none.
    pub fn into_dataset(self) -> Result<Dataset> {
        if !self.is_labelled() {
            bail!(
                "{} has {} images but no labels ({}), and this command needs classes: put each class's \
                 images in its own sub-folder ({}/<class>/...), or pass --labels FILE.tsv with \
                 `path<TAB>class` rows (paths relative to the folder)",
                self.root.display(),
                self.items.len(),
                self.unlabelled_because.as_deref().unwrap_or("none found"),
                self.root.display()
            );
        }
        let mut ignored = self.left_out;
        let mut items = Vec::with_capacity(self.items.len());
        for p in self.items {
            match p.class {
                Some(class) => items.push(Item {
                    path: p.path,
                    class,
                }),
                None => ignored.push(Skipped {
                    path: p.path,
                    reason: "no label in the label file".into(),
                }),
            }
        }
        Ok(Dataset {
            root: self.root,
            layout: self.layout,
            classes: self.classes,
            items,
            ignored,
        })
    }

    /// A one-line description for logs.
    pub fn summary(&self) -> String {
        let labelled = self.items.iter().filter(|i| i.class.is_some()).count();
        let labels = if self.layout == Layout::Unlabelled {
            "no labels".to_string()
        } else if labelled == self.items.len() {
            format!("{} classes", self.classes.len())
        } else {
            format!(
                "{} classes, {} images without a label",
                self.classes.len(),
                self.items.len() - labelled
            )
        };
        format!(
            "{} images, {labels} ({:?}) from {}",
            self.items.len(),
            self.layout,
            self.root.display()
        )
    }
}

fn non_empty(c: Collection) -> Result<Collection> {
    if c.items.is_empty() {
        let why = if c.left_out.is_empty() {
            String::new()
        } else {
            format!("; left out: {}", walk::summarise(&c.left_out))
        };
        bail!(
            "no images ({}) found under {}: check the path{why}",
            supported_list(),
            c.root.display()
        );
    }
    Ok(c)
}

fn unlabelled(root: &Path, listing: Listing, why: String) -> Collection {
    Collection {
        root: root.to_path_buf(),
        layout: Layout::Unlabelled,
        classes: Vec::new(),
        items: listing
            .images
            .into_iter()
            .map(|path| Photo { path, class: None })
            .collect(),
        left_out: listing.left_out,
        unlabelled_because: Some(why),
    }
}

/// The first folder below `root` is the class (images at any depth below it); images directly in
/// `root` are left out. Classes in sorted order, names from `words.txt` when there is one.
fn class_folders(root: &Path, listing: Listing) -> Collection {
    let mut ids: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut items = Vec::with_capacity(listing.images.len());
    let mut left_out = listing.left_out;
    for path in listing.images {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let mut comps = rel.components();
        let first = comps.next();
        if comps.next().is_none() {
            left_out.push(Skipped {
                path,
                reason: "not in a class folder (--labels folders)".into(),
            });
            continue;
        }
        let Some(name) = first.and_then(|c| c.as_os_str().to_str()) else {
            left_out.push(Skipped {
                path,
                reason: "its class folder's name is not valid UTF-8: rename the folder".into(),
            });
            continue;
        };
        let class = *index.entry(name.to_string()).or_insert_with(|| {
            ids.push(name.to_string());
            ids.len() - 1
        });
        items.push(Photo {
            path,
            class: Some(class),
        });
    }
    let words = dataset::read_words(root);
    Collection {
        root: root.to_path_buf(),
        layout: Layout::ClassFolders,
        classes: dataset::make_classes(ids, &words),
        items,
        left_out,
        unlabelled_because: Some("no image sits in a class folder".into()),
    }
}

/// Lexically normalised relative path: `./a//b` and `a/b` are the same row.
fn normal(rel: &Path) -> PathBuf {
    rel.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Labels from `path<TAB>class[<TAB>name]` rows (an optional `path<TAB>class` header, `#`
/// comments and blank lines allowed); images not listed stay unlabelled; rows naming no image
/// found under the root are reported.
fn label_file_classes(root: &Path, listing: Listing, file: &Path) -> Result<Collection> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the label file {}", file.display()))?;
    let mut rows: HashMap<PathBuf, (String, usize)> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') || (n == 0 && line == "path\tclass") {
            continue;
        }
        let mut f = line.split('\t');
        let (Some(path), Some(class)) = (f.next(), f.next()) else {
            bail!(
                "{} line {}: expected `path<TAB>class`, got {line:?}",
                file.display(),
                n + 1
            );
        };
        let class = class.trim();
        if path.is_empty() || class.is_empty() {
            bail!(
                "{} line {}: empty path or class in {line:?}",
                file.display(),
                n + 1
            );
        }
        if Path::new(path).is_absolute() {
            bail!(
                "{} line {}: {path} is absolute; paths are relative to {}",
                file.display(),
                n + 1,
                root.display()
            );
        }
        if let Some(name) = f.next().map(str::trim).filter(|s| !s.is_empty()) {
            names.insert(class.to_string(), name.to_string());
        }
        rows.insert(normal(Path::new(path)), (class.to_string(), n + 1));
    }
    let ids: Vec<String> = rows
        .values()
        .map(|(c, _)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut matched: BTreeSet<PathBuf> = BTreeSet::new();
    let items: Vec<Photo> = listing
        .images
        .into_iter()
        .map(|path| {
            let rel = normal(path.strip_prefix(root).unwrap_or(&path));
            let class = rows.get(&rel).map(|(c, _)| index[c.as_str()]);
            if class.is_some() {
                matched.insert(rel);
            }
            Photo { path, class }
        })
        .collect();
    let mut left_out = listing.left_out;
    let mut missing: Vec<(&PathBuf, usize)> = rows
        .iter()
        .filter(|(p, _)| !matched.contains(*p))
        .map(|(p, (_, line))| (p, *line))
        .collect();
    missing.sort_by_key(|m| m.1);
    for (p, line) in missing {
        left_out.push(Skipped {
            path: root.join(p),
            reason: format!(
                "listed in {} line {line} but not an image found under {}",
                file.display(),
                root.display()
            ),
        });
    }
    let mut words = dataset::read_words(root);
    words.extend(names);
    Ok(Collection {
        root: root.to_path_buf(),
        layout: Layout::LabelFile,
        classes: dataset::make_classes(ids, &words),
        items,
        left_out,
        unlabelled_because: Some(format!("{} labels none of them", file.display())),
    })
}
