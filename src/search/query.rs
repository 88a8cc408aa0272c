//! The seed's test stage: embed query images, rank the DB by Euclidean distance, return the top N.

use crate::infer::embedder::{Embedder, ModelSpec};
use crate::render::grid::{Grid, GridRow, Mark};
use crate::search::ann::db::{self as ann_db, DbIndex, Plan, Request};
use crate::store::db::Db;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Refuses a DB made by another model, input size or normalisation.
pub fn check_compatible(db: &Db, emb: &Embedder) -> Result<()> {
    let m = &db.meta;
    if m.model != emb.identity
        || m.size != emb.size
        || m.normalized != emb.normalize
        || m.dim != emb.dim
    {
        bail!(
            "DB {} was made with model {} at {} px (normalized: {}), but the query model is {} at {} px \
             (normalized: {}): query with the DB's model, or re-run `deeprank embed` with this one",
            db.dir.display(),
            m.model,
            m.size,
            m.normalized,
            emb.identity,
            emb.size,
            emb.normalize
        );
    }
    Ok(())
}

/// Builds the embedder that made `db` (or the one `model` names, which must match it).
pub fn embedder_for_db(db: &Db, model: Option<&str>, weights: Option<&Path>) -> Result<Embedder> {
    let spec = ModelSpec::parse(model.unwrap_or(&db.meta.model_source)).with_context(|| {
        format!(
            "cannot re-create the model of DB {} ({}): pass --model",
            db.dir.display(),
            db.meta.model_source
        )
    })?;
    let emb = Embedder::from_spec(&spec, weights, Some(db.meta.size), db.meta.normalized)?;
    check_compatible(db, &emb)?;
    Ok(emb)
}

#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub rank: usize,
    /// The row's stable id (kept across adds, removes and compactions).
    pub id: u64,
    pub distance: f32,
    #[serde(serialize_with = "crate::store::db::serialize_path")]
    pub path: PathBuf,
    pub class_id: String,
    pub class_name: String,
    /// Whether the result has the query's class (when the query's class is known).
    pub same_class: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryResult {
    #[serde(serialize_with = "crate::store::db::serialize_path")]
    pub image: PathBuf,
    /// The query's class, when it can be told from its location (class folder or Tiny ImageNet val).
    pub class_id: Option<String>,
    pub class_name: Option<String>,
    pub results: Vec<ResultRow>,
}

impl QueryResult {
    /// The result picture's rows: the query captioned with its class (name, else id, else
    /// unknown), each result with its class name and whether it shares the query's class.
    pub fn grid(&self) -> Grid {
        Grid {
            query: self.image.clone(),
            caption: self
                .class_name
                .clone()
                .or_else(|| self.class_id.clone())
                .unwrap_or_else(|| "class unknown".into()),
            rows: self
                .results
                .iter()
                .map(|r| GridRow {
                    path: r.path.clone(),
                    rank: r.rank,
                    distance: r.distance,
                    // A result without a class is captioned with its file name.
                    caption: if r.class_name.is_empty() {
                        r.path
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default()
                    } else {
                        r.class_name.clone()
                    },
                    mark: match r.same_class {
                        Some(true) => Mark::Same,
                        Some(false) => Mark::Different,
                        None => Mark::Unknown,
                    },
                })
                .collect(),
            headings: None,
        }
    }
}

/// Tells a query image's class from where it lies: `<class>/x.jpg`, `<class>/images/x.jpg`, or a
/// Tiny ImageNet val folder's `val_annotations.txt`. Only classes the DB knows count.
pub fn guess_class(path: &Path, known: &HashSet<&str>) -> Option<String> {
    let parent = path.parent()?;
    let pname = parent.file_name()?.to_str()?;
    if known.contains(pname) {
        return Some(pname.to_string());
    }
    if pname == "images" {
        let gp = parent.parent()?;
        if let Some(g) = gp.file_name().and_then(|n| n.to_str())
            && known.contains(g)
        {
            return Some(g.to_string());
        }
        let ann = std::fs::read_to_string(gp.join("val_annotations.txt")).ok()?;
        let fname = path.file_name()?.to_str()?;
        for line in ann.lines() {
            let mut f = line.split('\t');
            if f.next() == Some(fname) {
                let c = f.next()?;
                return known.contains(c).then(|| c.to_string());
            }
        }
    }
    None
}

/// Ranks the DB's live rows for each query vector by the exact scan.
pub fn rank(
    db: &Db,
    qvecs: &[f32],
    qclasses: &[Option<String>],
    top: usize,
) -> Vec<Vec<ResultRow>> {
    let exact = Request {
        mode: ann_db::Mode::Exact,
        ..Request::default()
    };
    rank_with(db, None, &exact, qvecs, qclasses, top).0
}

/// Ranks the rows `req` allows for each query vector, through `index` when there is one and
/// `req.mode` asks for it; says which path it took.
pub fn rank_with(
    db: &Db,
    index: Option<&DbIndex>,
    req: &Request,
    qvecs: &[f32],
    qclasses: &[Option<String>],
    top: usize,
) -> (Vec<Vec<ResultRow>>, Plan) {
    let (hits, plan) = ann_db::search(db, index, qvecs, top.min(db.len()), req);
    let rows = hits
        .into_iter()
        .zip(qclasses)
        .map(|(hs, qc)| {
            hs.into_iter()
                .enumerate()
                .map(|(r, h)| {
                    let e = &db.entries[h.index];
                    ResultRow {
                        rank: r + 1,
                        id: db.ids[h.index],
                        distance: h.distance,
                        path: e.path.clone(),
                        class_id: e.class_id.clone(),
                        class_name: e.class_name.clone(),
                        // Known only when both the query and the result have a class.
                        same_class: qc
                            .as_ref()
                            .and_then(|c| e.class().map(|ec| ec == c.as_str())),
                    }
                })
                .collect()
        })
        .collect();
    (rows, plan)
}

/// `deeprank query` by the exact scan: the top `top` DB images for each query image.
pub fn query(db: &Db, emb: &Embedder, images: &[PathBuf], top: usize) -> Result<Vec<QueryResult>> {
    let exact = Request {
        mode: ann_db::Mode::Exact,
        ..Request::default()
    };
    Ok(query_with(db, None, &exact, emb, images, top)?.0)
}

/// The query images' vectors, one per image, in order; `top` must be at least 1, and every image
/// must be a readable image file (an error names the first that is not). Shared by the DB folder
/// and the PostgreSQL store.
pub fn embed_queries(emb: &Embedder, images: &[PathBuf], top: usize) -> Result<Vec<Vec<f32>>> {
    if top == 0 {
        bail!("--top must be at least 1");
    }
    for p in images {
        if !p.is_file() {
            bail!(
                "query image {} does not exist or is not a file",
                p.display()
            );
        }
    }
    let (vecs, skipped) = emb.embed_files(images)?;
    if let Some(s) = skipped.first() {
        bail!("cannot use query image {}: {}", s.path.display(), s.reason);
    }
    Ok(vecs
        .into_iter()
        .map(|v| v.into_iter().flatten().collect())
        .collect())
}
/// `deeprank query`: the top `top` rows `req` allows for each query image, through `index` when
/// there is one and `req.mode` asks for it.
pub fn query_with(
    db: &Db,
    index: Option<&DbIndex>,
    req: &Request,
    emb: &Embedder,
    images: &[PathBuf],
    top: usize,
) -> Result<(Vec<QueryResult>, Plan)> {
    let flat: Vec<f32> = embed_queries(emb, images, top)?.concat();
    let known: HashSet<&str> = db
        .live_rows()
        .filter_map(|r| db.entries[r].class())
        .collect();
    let classes: Vec<Option<String>> = images.iter().map(|p| guess_class(p, &known)).collect();
    let (ranked, plan) = rank_with(db, index, req, &flat, &classes, top);
    let results = images
        .iter()
        .zip(classes)
        .zip(ranked)
        .map(|((p, c), results)| QueryResult {
            image: p.clone(),
            class_name: c.as_ref().and_then(|c| {
                db.entries
                    .iter()
                    .find(|e| &e.class_id == c)
                    .map(|e| e.class_name.clone())
            }),
            class_id: c,
            results,
        })
        .collect();
    Ok((results, plan))
}
