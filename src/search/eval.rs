//! Retrieval quality: precision@k, recall@k and MAP@R of a query set against a DB, and the ImageNet
//! top-1 check of the pretrained classifier.

use crate::data::batch::decode_batch;
use crate::data::dataset::Dataset;
use crate::data::skipped::Skipped;
use crate::infer::embedder::Embedder;
use crate::infer::stream::embed_stream;
use crate::model::lite::NUM_CLASSES;
use crate::progress::progress;
use crate::search::ann::db::{self as ann_db, DbIndex, Plan, Request};
use crate::search::index::{Hit, search};
use crate::store::db::Db;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Metrics over all evaluated queries.
///
/// - `precision_at_k[k]`: mean share of the top k results whose class is the query's.
/// - `recall_at_k[k]`: share of queries with at least one same-class result in the top k
///   (the metric-learning "Recall@k" of Musgrave et al. 2020).
/// - `map_at_r`: mean average precision at R, R = the number of DB images of the query's class
///   (Musgrave et al. 2020, "A Metric Learning Reality Check").
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub queries: usize,
    pub precision_at_k: BTreeMap<usize, f64>,
    pub recall_at_k: BTreeMap<usize, f64>,
    pub map_at_r: f64,
}

/// Computes metrics from ranked results. `relevant[q][i]` tells whether DB row i shares query q's
/// class; `r[q]` is the number of relevant DB rows (excluding the query itself).
pub fn metrics_from_hits(
    hits: &[Vec<Hit>],
    is_relevant: impl Fn(usize, usize) -> bool,
    r: &[usize],
    ks: &[usize],
) -> Metrics {
    let n = hits.len().max(1) as f64;
    let mut p = BTreeMap::new();
    let mut rec = BTreeMap::new();
    for &k in ks {
        let mut ps = 0.0;
        let mut rs = 0.0;
        for (q, h) in hits.iter().enumerate() {
            let rel = h.iter().take(k).filter(|x| is_relevant(q, x.index)).count();
            ps += rel as f64 / k as f64;
            rs += if rel > 0 { 1.0 } else { 0.0 };
        }
        p.insert(k, ps / n);
        rec.insert(k, rs / n);
    }
    let mut map = 0.0;
    for (q, h) in hits.iter().enumerate() {
        let rq = r[q];
        if rq == 0 {
            continue;
        }
        let mut found = 0usize;
        let mut ap = 0.0;
        for (i, x) in h.iter().take(rq).enumerate() {
            if is_relevant(q, x.index) {
                found += 1;
                ap += found as f64 / (i + 1) as f64;
            }
        }
        map += ap / rq as f64;
    }
    Metrics {
        queries: hits.len(),
        precision_at_k: p,
        recall_at_k: rec,
        map_at_r: map / n,
    }
}

/// Full evaluation report.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    #[serde(flatten)]
    pub metrics: Metrics,
    pub db_size: usize,
    pub model: String,
    pub size: u32,
    /// Query images whose class has no image in the DB (not scored).
    pub queries_without_class_in_db: usize,
    pub skipped_images: usize,
    pub seconds: f64,
}

/// Parses `1,10,30`.
pub fn parse_ks(s: &str) -> Result<Vec<usize>> {
    let ks: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--k {s:?}: expected positive integers like 1,10,30"))?;
    if ks.is_empty() || ks.contains(&0) {
        bail!("--k {s:?}: expected positive integers like 1,10,30");
    }
    Ok(ks)
}

/// Scores query vectors (with class ids and paths) against database vectors. Queries whose class
/// is not in the database are left out (their number is returned); a query that is itself in the
/// database (same path) does not count itself. Rows `removed` says are left out of everything.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_vectors(
    db_vecs: &[f32],
    dim: usize,
    removed: &(dyn Fn(usize) -> bool + Sync),
    db_class: &[String],
    db_paths: &[PathBuf],
    qvecs: &[f32],
    qclass: &[String],
    qpaths: &[PathBuf],
    ks: &[usize],
) -> (Metrics, usize) {
    let exact = |qv: &[f32], k: usize, selfs: &[Option<usize>]| {
        search(db_vecs, dim, qv, k, &|q, i| {
            selfs[q] == Some(i) || removed(i)
        })
    };
    score(
        dim, removed, db_class, db_paths, qvecs, qclass, qpaths, ks, &exact,
    )
}

/// Top-`k` rows for each query (rows of the first argument), each query's row of the third
/// argument left out.
type SearchFn<'a> = &'a dyn Fn(&[f32], usize, &[Option<usize>]) -> Vec<Vec<Hit>>;

/// [`evaluate_vectors`] with the search given (the exact scan, or a DB's index).
#[allow(clippy::too_many_arguments)]
fn score(
    dim: usize,
    removed: &(dyn Fn(usize) -> bool + Sync),
    db_class: &[String],
    db_paths: &[PathBuf],
    qvecs: &[f32],
    qclass: &[String],
    qpaths: &[PathBuf],
    ks: &[usize],
    search: SearchFn,
) -> (Metrics, usize) {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let db_labels: Vec<usize> = db_class
        .iter()
        .map(|c| {
            let n = ids.len();
            *ids.entry(c.as_str()).or_insert(n)
        })
        .collect();
    let mut counts = vec![0usize; ids.len()];
    for (i, &l) in db_labels.iter().enumerate() {
        if !removed(i) {
            counts[l] += 1;
        }
    }
    let path_index: HashMap<&Path, usize> = db_paths
        .iter()
        .enumerate()
        .filter(|&(i, _)| !removed(i))
        .map(|(i, p)| (p.as_path(), i))
        .collect();
    let mut keep = Vec::new();
    let mut labels = Vec::new();
    let mut selfs = Vec::new();
    for (q, c) in qclass.iter().enumerate() {
        if let Some(&l) = ids.get(c.as_str()).filter(|&&l| counts[l] > 0) {
            keep.push(q);
            labels.push(l);
            selfs.push(path_index.get(qpaths[q].as_path()).copied());
        }
    }
    let missing = qclass.len() - keep.len();
    let r: Vec<usize> = labels
        .iter()
        .zip(&selfs)
        .map(|(&l, s)| counts[l] - usize::from(s.is_some()))
        .collect();
    let kmax = ks
        .iter()
        .copied()
        .chain(r.iter().copied())
        .max()
        .unwrap_or(1)
        .min(
            db_labels
                .iter()
                .enumerate()
                .filter(|&(i, _)| !removed(i))
                .count(),
        );
    let mut qv = Vec::with_capacity(keep.len() * dim);
    for &q in &keep {
        qv.extend_from_slice(&qvecs[q * dim..(q + 1) * dim]);
    }
    let hits = search(&qv, kmax, &selfs);
    let m = metrics_from_hits(&hits, |q, i| db_labels[i] == labels[q], &r, ks);
    (m, missing)
}

/// Embedded query images (those that decoded), with their classes and paths.
pub struct QuerySet {
    pub vectors: Vec<f32>,
    pub classes: Vec<String>,
    pub paths: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
}

/// Embeds a query dataset.
pub fn embed_queries(emb: &Embedder, ds: &Dataset, batch: usize) -> Result<QuerySet> {
    let paths: Vec<PathBuf> = ds.items.iter().map(|i| i.path.clone()).collect();
    let mut vectors = Vec::with_capacity(paths.len() * emb.dim);
    let mut classes = Vec::new();
    let mut kept = Vec::new();
    let skipped = embed_stream(emb, &paths, batch, "queries", |i, v| {
        vectors.extend_from_slice(v);
        classes.push(ds.classes[ds.items[i].class].id.clone());
        kept.push(paths[i].clone());
        Ok(())
    })?;
    Ok(QuerySet {
        vectors,
        classes,
        paths: kept,
        skipped,
    })
}

/// `deeprank eval` by the exact scan: embeds the query set with the DB's model and scores it.
pub fn evaluate(
    emb: &Embedder,
    db: &Db,
    queries: &Dataset,
    ks: &[usize],
    batch: usize,
) -> Result<EvalReport> {
    let exact = Request {
        mode: ann_db::Mode::Exact,
        ..Request::default()
    };
    Ok(evaluate_with(emb, db, queries, ks, batch, None, &exact)?.0)
}

/// `deeprank eval`: embeds the query set with the DB's model and scores it against the rows `req`
/// allows (R counts only those), through `index` when there is one and `req.mode` asks for it.
pub fn evaluate_with(
    emb: &Embedder,
    db: &Db,
    queries: &Dataset,
    ks: &[usize],
    batch: usize,
    index: Option<&DbIndex>,
    req: &Request,
) -> Result<(EvalReport, Plan)> {
    crate::search::query::check_compatible(db, emb)?;
    if !db.is_labelled() {
        bail!(
            "DB {} has no labels (it was embedded from a folder without classes), and eval needs them:              embed a labelled folder (class sub-folders, Tiny ImageNet, or --labels FILE.tsv)",
            db.dir.display()
        );
    }
    let t0 = std::time::Instant::now();
    let qs = embed_queries(emb, queries, batch)?;
    let db_class: Vec<String> = db.entries.iter().map(|e| e.class_id.clone()).collect();
    let db_paths: Vec<PathBuf> = db.entries.iter().map(|e| e.path.clone()).collect();
    let plan = std::cell::Cell::new(Plan::Exact);
    let by_db = |qv: &[f32], k: usize, selfs: &[Option<usize>]| {
        let r = Request {
            exclude: Some(selfs),
            ..*req
        };
        let (hits, p) = ann_db::search(db, index, qv, k, &r);
        plan.set(p);
        hits
    };
    let (metrics, missing) = score(
        db.meta.dim,
        &|i| req.mask.map_or(db.is_removed(i), |m| !m[i]),
        &db_class,
        &db_paths,
        &qs.vectors,
        &qs.classes,
        &qs.paths,
        ks,
        &by_db,
    );
    if metrics.queries == 0 {
        bail!(
            "none of the query classes of {} occur in the DB {}: are they from the same dataset?",
            queries.root.display(),
            db.dir.display()
        );
    }
    let report = EvalReport {
        metrics,
        db_size: db.len(),
        model: db.meta.model.clone(),
        size: db.meta.size,
        queries_without_class_in_db: missing,
        skipped_images: qs.skipped.len(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((report, plan.get()))
}

/// Result of the ImageNet classification check.
#[derive(Debug, Serialize)]
pub struct Top1 {
    pub size: u32,
    pub images: usize,
    pub correct: usize,
    pub top1: f64,
}

/// ImageNet top-1 of the pretrained classifier restricted to the dataset's classes (e.g. the 200
/// Tiny ImageNet wnids), `imagenet_wnids` giving the logit order.
pub fn imagenet_top1(
    emb: &Embedder,
    ds: &Dataset,
    imagenet_wnids: &Path,
    batch: usize,
) -> Result<Top1> {
    let text = std::fs::read_to_string(imagenet_wnids)
        .with_context(|| format!("cannot read {}", imagenet_wnids.display()))?;
    let all: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if all.len() != NUM_CLASSES {
        bail!(
            "{} has {} ids, expected {NUM_CLASSES}",
            imagenet_wnids.display(),
            all.len()
        );
    }
    let cols: Vec<usize> = ds
        .classes
        .iter()
        .map(|c| {
            all.iter()
                .position(|w| *w == c.id)
                .with_context(|| format!("class {} is not an ImageNet-1k wnid", c.id))
        })
        .collect::<Result<_>>()?;
    let mut correct = 0;
    let mut images = 0;
    let pb = progress(ds.items.len(), "classify");
    for chunk in ds.items.chunks(batch.max(1)) {
        let paths: Vec<PathBuf> = chunk.iter().map(|i| i.path.clone()).collect();
        let (buf, ok, _) = decode_batch(&paths, emb.size);
        let n = ok.iter().filter(|&&o| o).count();
        let logits = emb.logits_batch(buf, n)?;
        let mut rows = logits.chunks_exact(NUM_CLASSES);
        for (item, o) in chunk.iter().zip(ok) {
            if !o {
                continue;
            }
            let row = rows.next().context("missing logits")?;
            let best = cols
                .iter()
                .enumerate()
                .max_by(|a, b| row[*a.1].total_cmp(&row[*b.1]))
                .map(|(i, _)| i)
                .context("no classes")?;
            images += 1;
            correct += usize::from(best == item.class);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(Top1 {
        size: emb.size,
        images,
        correct,
        top1: correct as f64 / images.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(ix: &[usize]) -> Vec<Hit> {
        ix.iter()
            .map(|&index| Hit {
                index,
                distance: 0.0,
            })
            .collect()
    }

    #[test]
    fn metrics_by_hand() {
        // DB labels: rows 0,1,2 class A; rows 3,4 class B. One query of class A.
        let labels = [0, 0, 0, 1, 1];
        let hits = vec![h(&[0, 3, 1, 4, 2])];
        let m = metrics_from_hits(&hits, |_, i| labels[i] == 0, &[3], &[1, 2, 5]);
        assert!((m.precision_at_k[&1] - 1.0).abs() < 1e-12);
        assert!((m.precision_at_k[&2] - 0.5).abs() < 1e-12);
        assert!((m.precision_at_k[&5] - 0.6).abs() < 1e-12);
        assert!((m.recall_at_k[&1] - 1.0).abs() < 1e-12);
        // MAP@R with R = 3: ranks 1 and 3 relevant within the first 3: (1/1 + 2/3) / 3.
        assert!((m.map_at_r - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn recall_counts_queries_with_any_hit() {
        let labels = [0, 1];
        let hits = vec![h(&[1, 0]), h(&[0, 1])];
        let m = metrics_from_hits(&hits, |_, i| labels[i] == 0, &[1, 1], &[1, 2]);
        assert!((m.recall_at_k[&1] - 0.5).abs() < 1e-12);
        assert!((m.recall_at_k[&2] - 1.0).abs() < 1e-12);
        assert!((m.map_at_r - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_query_in_the_db_does_not_count_itself() {
        // 1-d DB: a0 at 0, b0 at 1, a1 at 5. Queries: a0 itself (same path) and a fresh a-image at 0.
        let db = [0.0f32, 1.0, 5.0];
        let class = ["a", "b", "a"].map(String::from);
        let paths = ["a0.jpg", "b0.jpg", "a1.jpg"].map(PathBuf::from);
        let q = [0.0f32, 0.0];
        let qclass = ["a", "a"].map(String::from);
        let qpaths = ["a0.jpg", "elsewhere/a0.jpg"].map(PathBuf::from);
        let (m, missing) = evaluate_vectors(
            &db,
            1,
            &|_| false,
            &class,
            &paths,
            &q,
            &qclass,
            &qpaths,
            &[1, 2],
        );
        assert_eq!((m.queries, missing), (2, 0));
        // The DB image: itself left out, so b0 then a1 (P@1 0, P@2 1/2); R = 1 (a1 only), and
        // a1 is not in the first R = 1 results: AP 0. The other query: a0, b0 (P@1 1, P@2 1/2);
        // R = 2 (a0, a1): AP = (1/1) / 2.
        assert!((m.precision_at_k[&1] - 0.5).abs() < 1e-12, "{m:?}");
        assert!((m.precision_at_k[&2] - 0.5).abs() < 1e-12, "{m:?}");
        assert!((m.recall_at_k[&1] - 0.5).abs() < 1e-12, "{m:?}");
        assert!((m.map_at_r - 0.25).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn removed_rows_are_left_out() {
        // a0 at 0 is removed: a query at 0 of class a finds b0 first, then a1; R = 1 (a1).
        let db = [0.0f32, 1.0, 5.0];
        let class = ["a", "b", "a"].map(String::from);
        let paths = ["a0.jpg", "b0.jpg", "a1.jpg"].map(PathBuf::from);
        let (q, qc, qp) = ([0.0f32], ["a".to_string()], [PathBuf::from("q.jpg")]);
        let (m, _) = evaluate_vectors(&db, 1, &|i| i == 0, &class, &paths, &q, &qc, &qp, &[1, 2]);
        assert_eq!(m.precision_at_k[&1], 0.0, "{m:?}");
        assert!((m.precision_at_k[&2] - 0.5).abs() < 1e-12, "{m:?}");
        let (m, _) = evaluate_vectors(&db, 1, &|_| false, &class, &paths, &q, &qc, &qp, &[1]);
        assert_eq!(m.precision_at_k[&1], 1.0, "{m:?}");
    }

    #[test]
    fn parse_ks_rejects_bad_input() {
        assert_eq!(parse_ks("1, 10,30").unwrap(), vec![1, 10, 30]);
        assert!(parse_ks("0").is_err());
        assert!(parse_ks("a").is_err());
    }
}
