//! The ANN index of a DB (`deeprank index`, `search::ann`): results equal the exact scan's at a
//! high ef; removed rows never come back; rows added after the build are found (scanned exactly,
//! then inserted); filters equal exact filtered results with and without the index; compaction
//! drops the index and the next change rebuilds it; a damaged index file is an error naming it
//! while `--exact` still answers; the CLI's flags.

mod common;

use deeprank::search::ann::Params;
use deeprank::search::ann::db::{self as ann_db, Mode, Plan, Request, Where};
use deeprank::search::ann::update;
use deeprank::store::changes;
use deeprank::store::commit::{Change, NewRow, Wait, Writer};
use deeprank::store::db::{Db, DbWriter, Entry, Meta};
use deeprank::store::manifest::Stamp;
use std::path::{Path, PathBuf};

const DIM: usize = 16;
const CLASSES: usize = 20;

/// xorshift numbers in [-0.5, 0.5).
fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Row `i` of a clustered set: cluster `i % CLASSES` (a random centre) plus noise.
fn vector(i: usize, seed: u64) -> Vec<f32> {
    let mut c = rng(1000 + (i % CLASSES) as u64);
    let mut r = rng(seed * 1_000_003 + i as u64);
    (0..DIM).map(|_| 3.0 * c() + r()).collect()
}

fn entry(dir: &Path, i: usize) -> Entry {
    let sub = if i.is_multiple_of(2) { "even" } else { "odd" };
    Entry {
        path: dir.join(sub).join(format!("img-{i}.jpg")),
        class_id: format!("c{}", i % CLASSES),
        class_name: format!("class {}", i % CLASSES),
    }
}

/// A DB of `n` clustered synthetic rows (no model): classes `c0..c19`, paths `dir/{even,odd}/img-i.jpg`.
fn synthetic(dir: &Path, n: usize) -> PathBuf {
    let db = dir.join("db");
    let mut w = DbWriter::create(&db, DIM, None).unwrap();
    for i in 0..n {
        w.push(&entry(dir, i), &vector(i, 1)).unwrap();
    }
    w.finish(Meta {
        model: "synthetic".into(),
        model_source: "synthetic".into(),
        size: 32,
        dim: DIM,
        count: n,
        normalized: false,
        data: dir.display().to_string(),
        deeprank_version: "test".into(),
        format: 2,
    })
    .unwrap();
    db
}

/// Appends rows `from..to` through the DB's writer (what `add` commits, without a model).
fn append(db: &Path, from: usize, to: usize) {
    let dir = db.parent().unwrap();
    let mut w = Writer::open(db, Wait::Fail).unwrap();
    let add = (from..to)
        .map(|i| NewRow {
            entry: entry(dir, i),
            stamp: Stamp::default(),
            vector: vector(i, 1),
        })
        .collect();
    w.commit(&Change {
        add,
        remove: vec![],
    })
    .unwrap();
}

fn queries(n: usize) -> Vec<f32> {
    (0..n).flat_map(|i| vector(i * 7 + 3, 99)).collect()
}

/// Runs `f` on a pool of one thread: a graph built by one thread is the same on every run, so the
/// exact-equality checks pass or fail the same way every time (a parallel build inserts in a
/// varying order; the CLI tests and `tests/bench.rs` run parallel builds).
fn one<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}

const SMALL: Params = Params {
    m: 8,
    ef_construction: 100,
    seed: 7,
};

/// (row, distance bits) per query.
type Ranked = Vec<Vec<(usize, u32)>>;

fn run(db: &Db, mode: Mode, mask: Option<&[bool]>, k: usize) -> (Ranked, Plan) {
    let index = match mode {
        Mode::Exact => None,
        _ => ann_db::open(db).unwrap(),
    };
    let req = Request {
        mode,
        mask,
        exclude: None,
    };
    let (hits, plan) = ann_db::search(db, index.as_ref(), &queries(25), k, &req);
    let r = hits
        .into_iter()
        .map(|h| {
            h.into_iter()
                .map(|h| (h.index, h.distance.to_bits()))
                .collect()
        })
        .collect();
    (r, plan)
}

/// At ef 400 the index's results are the exact scan's, row for row and bit for bit.
fn same_as_exact(db: &Db, mask: Option<&[bool]>, what: &str) {
    let (exact, p) = run(db, Mode::Exact, mask, 10);
    assert_eq!(p, Plan::Exact);
    let (ann, p) = run(db, Mode::Ef(400), mask, 10);
    assert!(matches!(p, Plan::Index { ef: 400, .. }), "{what}: {p:?}");
    assert_eq!(ann, exact, "{what}");
    for (q, hits) in ann.iter().enumerate() {
        for &(r, _) in hits {
            assert!(!db.is_removed(r), "{what}: query {q} got removed row {r}");
            assert!(
                mask.is_none_or(|m| m[r]),
                "{what}: row {r} fails the filter"
            );
        }
    }
}

#[test]
fn index_equals_exact_and_follows_adds_and_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let db = synthetic(tmp.path(), 1500);
    let b = one(|| update::build(&db, &SMALL)).unwrap();
    assert_eq!((b.rows, b.m, b.ef_construction), (1500, 8, 100));
    assert!(b.file.is_file() && b.bytes > 0);
    let d = Db::open(&db).unwrap();
    same_as_exact(&d, None, "fresh index");
    // --recall picks the smallest calibrated ef reaching it; unreachable means the exact scan.
    let (_, p) = run(&d, Mode::Recall(0.5), None, 10);
    let first = b.calibration.iter().find(|c| c.1 >= 0.5).unwrap().0 as usize;
    assert_eq!(p, Plan::Index { ef: first, tail: 0 });
    let (_, p) = run(&d, Mode::Recall(1.0 + 1e-9), None, 10);
    assert_eq!(p, Plan::Exact);

    // Removed rows (the nearest ones of the first queries among them) are never returned.
    let (near, _) = run(&d, Mode::Exact, None, 10);
    let mut gone: Vec<String> = near[..3]
        .iter()
        .flat_map(|h| h.iter().take(4).map(|x| d.ids[x.0].to_string()))
        .collect();
    gone.extend((0..1500).step_by(10).map(|i| i.to_string()));
    gone.sort();
    gone.dedup();
    changes::remove(&db, &gone).unwrap();
    let d = Db::open(&db).unwrap();
    assert_eq!(
        d.state.index.as_ref().unwrap().file,
        b.file.file_name().unwrap().to_str().unwrap()
    );
    same_as_exact(&d, None, "after removes");

    // Rows added after the build are searched exactly until the index takes them in.
    append(&db, 1500, 1700);
    let d = Db::open(&db).unwrap();
    let (_, p) = run(&d, Mode::Ef(400), None, 10);
    assert_eq!(p, Plan::Index { ef: 400, tail: 200 });
    same_as_exact(&d, None, "index lagging 200 rows");
    let r = one(|| update::refresh(&db, None))
        .unwrap()
        .expect("the index lagged");
    assert_eq!((r.rows, r.inserted, r.rebuilt), (1700, 200, false));
    // A delta over the graph file keeps it; a graph written whole replaces it.
    assert_eq!(b.file.exists(), r.delta, "{r:?}");
    let d = Db::open(&db).unwrap();
    let (_, p) = run(&d, Mode::Ef(400), None, 10);
    assert_eq!(p, Plan::Index { ef: 400, tail: 0 });
    same_as_exact(&d, None, "after the index took the added rows");
    assert!(
        update::refresh(&db, None).unwrap().is_none(),
        "nothing left to do"
    );
    let files = |db: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(db)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".hnsw"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(&db).len(), 1);

    // Removing past a quarter of the rows compacts, which renumbers rows and drops the index;
    // the refresh after the change rebuilds it with the same parameters.
    let had = update::params_of(&db).unwrap();
    assert_eq!((had.m, had.ef_construction), (8, 100));
    let many: Vec<String> = d
        .live_rows()
        .filter(|r| r % 3 == 1)
        .map(|r| d.ids[r].to_string())
        .collect();
    let rep = changes::remove(&db, &many).unwrap();
    assert!(rep.compacted.is_some());
    let d = Db::open(&db).unwrap();
    assert!(d.state.index.is_none() && files(&db).is_empty());
    let r = one(|| update::refresh(&db, Some(had))).unwrap().unwrap();
    assert!(r.rebuilt && r.m == 8 && r.rows == d.rows());
    same_as_exact(&Db::open(&db).unwrap(), None, "rebuilt after compaction");
}

/// The DB's index files (graphs and deltas), sorted.
fn index_files(db: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| deeprank::store::commit::is_index_file(n))
        .collect();
    v.sort();
    v
}

/// An update after an add writes a delta over the graph file, never the graph again: the graph
/// file stays byte for byte; each delta carries every change since the graph (a second update
/// replaces the first delta, which is deleted); results equal the exact scan's after each; once a
/// delta would hold half as many nodes as the graph, the graph is written whole again.
#[test]
fn updates_write_a_delta_not_the_graph_again() {
    let tmp = tempfile::tempdir().unwrap();
    let db = synthetic(tmp.path(), 2000);
    let b = one(|| update::build(&db, &SMALL)).unwrap();
    let graph_name = b.file.file_name().unwrap().to_str().unwrap().to_string();
    let graph = std::fs::read(&b.file).unwrap();
    let mut prev: Option<PathBuf> = None;
    for round in 0..2 {
        let n = 2000 + 20 * round;
        append(&db, n, n + 20);
        let r = one(|| update::refresh(&db, None)).unwrap().unwrap();
        assert!(
            r.delta && !r.rebuilt && r.inserted == 20,
            "round {round}: {r:?}"
        );
        assert!(
            r.bytes * 4 < b.bytes,
            "round {round}: a delta of {} bytes",
            r.bytes
        );
        assert_eq!(
            std::fs::read(&b.file).unwrap(),
            graph,
            "the graph was rewritten"
        );
        let ix = Db::open(&db).unwrap().state.index.unwrap();
        let delta = r.file.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            (ix.file.as_str(), ix.delta.as_deref()),
            (graph_name.as_str(), Some(delta))
        );
        assert_eq!(
            index_files(&db),
            vec![graph_name.clone(), delta.to_string()]
        );
        if let Some(p) = &prev {
            assert!(!p.exists(), "the replaced delta {} is left", p.display());
        }
        prev = Some(r.file.clone());
        same_as_exact(
            &Db::open(&db).unwrap(),
            None,
            &format!("after delta {round}"),
        );
        assert!(common::changes::consistent(&db).is_empty());
    }
    // 1000 more rows: the delta would hold half the graph's nodes or more; the graph is rewritten.
    append(&db, 2040, 3040);
    let r = one(|| update::refresh(&db, None)).unwrap().unwrap();
    assert!(!r.delta && r.rows == 3040, "{r:?}");
    let ix = Db::open(&db).unwrap().state.index.unwrap();
    assert!(ix.delta.is_none() && ix.file != graph_name, "{ix:?}");
    assert_eq!(index_files(&db), vec![ix.file.clone()]);
    same_as_exact(&Db::open(&db).unwrap(), None, "graph rewritten");
    // A damaged delta is an error naming it, and --exact still answers.
    append(&db, 3040, 3050);
    let r = one(|| update::refresh(&db, None)).unwrap().unwrap();
    assert!(r.delta, "{r:?}");
    let mut bytes = std::fs::read(&r.file).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&r.file, bytes).unwrap();
    let d = Db::open(&db).unwrap();
    let e = ann_db::open(&d).err().expect("a damaged delta");
    assert!(
        format!("{e:#}").contains(r.file.to_str().unwrap())
            && format!("{e:#}").contains("deeprank index"),
        "{e:#}"
    );
    assert_eq!(run(&d, Mode::Exact, None, 10).1, Plan::Exact);
}

#[test]
fn filters_equal_exact_filtered_results_with_and_without_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let db = synthetic(tmp.path(), 1200);
    one(|| update::build(&db, &SMALL)).unwrap();
    changes::remove(&db, &["4".into(), "24".into(), "44".into()]).unwrap();
    append(&db, 1200, 1300);
    let d = Db::open(&db).unwrap();
    let even = tmp.path().join("even");
    for (wheres, what) in [
        (
            vec![Where::Class("c4".into())],
            "one class of 20 (the gathered exact path)",
        ),
        (
            vec![Where::PathPrefix(even.clone())],
            "half the rows (the graph walk)",
        ),
        (
            vec![
                Where::PathPrefix(even.join("img-1")),
                Where::Class("c2".into()),
            ],
            "prefix and class",
        ),
    ] {
        let m = ann_db::mask(&d, &wheres);
        // The mask is the conditions over the stored rows, removed rows left out.
        for (r, &passes) in m.iter().enumerate() {
            let e = &d.entries[r];
            let want = !d.is_removed(r)
                && wheres.iter().all(|w| match w {
                    Where::Class(c) => e.class_id == *c,
                    Where::PathPrefix(p) => {
                        e.path.to_str().unwrap().starts_with(p.to_str().unwrap())
                    }
                });
            assert_eq!(passes, want, "{what}: row {r}");
        }
        assert!(m.iter().any(|&x| x), "{what}: nothing passes");
        same_as_exact(&d, Some(&m), what);
        // The exact path agrees with a brute force over the passing rows.
        let (exact, _) = run(&d, Mode::Exact, Some(&m), 10);
        let qs = queries(25);
        for (q, hits) in exact.iter().enumerate() {
            let qv = &qs[q * DIM..(q + 1) * DIM];
            let mut all: Vec<(f64, usize)> = (0..d.rows())
                .filter(|&r| m[r])
                .map(|r| {
                    let v = d.vectors.row(r);
                    let s: f64 = (0..DIM).map(|j| ((qv[j] - v[j]) as f64).powi(2)).sum();
                    (s, r)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<usize> = all.iter().take(10).map(|x| x.1).collect();
            let got: Vec<usize> = hits.iter().map(|x| x.0).collect();
            assert_eq!(got, want, "{what}: query {q}");
        }
    }
    assert!(Where::parse("class=").is_err() && Where::parse("colour=red").is_err());
    assert_eq!(
        Where::parse("path=/a/b").unwrap(),
        Where::PathPrefix("/a/b".into())
    );
}

#[test]
fn a_damaged_index_is_an_error_naming_it_and_exact_search_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let db = synthetic(tmp.path(), 300);
    let b = one(|| update::build(&db, &SMALL)).unwrap();
    let good = std::fs::read(&b.file).unwrap();
    let name = b.file.display().to_string();
    let damaged: [(&str, Vec<u8>); 4] = [
        ("truncated", good[..good.len() - 8].to_vec()),
        ("garbage", b"not an index at all, just text".to_vec()),
        ("header bit", {
            let mut g = good.clone();
            g[13] ^= 4;
            g
        }),
        ("empty", vec![]),
    ];
    for (what, bytes) in damaged {
        std::fs::write(&b.file, &bytes).unwrap();
        let d = Db::open(&db).unwrap();
        let e = format!("{:#}", ann_db::open(&d).err().expect(what));
        assert!(e.contains(&name) && e.contains("--exact"), "{what}: {e}");
        let (hits, plan) = run(&d, Mode::Exact, None, 5);
        assert_eq!(plan, Plan::Exact);
        assert_eq!(hits.len(), 25);
        // An update refuses to build on it, naming it too; the DB itself is untouched.
        let e = format!("{:#}", update::refresh(&db, None).expect_err(what));
        assert!(e.contains(&name), "{what}: {e}");
    }
    std::fs::remove_file(&b.file).unwrap();
    let d = Db::open(&db).unwrap();
    let e = format!("{:#}", ann_db::open(&d).err().expect("missing file"));
    assert!(e.contains(&name), "{e}");
    // `deeprank index` replaces it.
    one(|| update::build(&db, &SMALL)).unwrap();
    same_as_exact(&Db::open(&db).unwrap(), None, "rebuilt");
}

/// The CLI on a DB of real images: `index`, then query with the index, `--ef`, `--recall`,
/// `--exact` and `--where`; a damaged index is an error unless `--exact`.
#[test]
fn cli_index_and_query_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, db) = common::changes::fresh(tmp.path());
    let d = db.to_str().unwrap();
    let (code, out, err) = common::cli(&["index", "--db", d, "--m", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("indexed 12 rows") && out.contains("ef 10:"),
        "{out}"
    );
    let img = data
        .join("n01443537")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let q = |extra: &[&str]| {
        let mut a = vec![
            "query",
            "--db",
            d,
            "--image",
            img.to_str().unwrap(),
            "--json",
        ];
        a.extend(extra);
        let (code, out, err) = common::cli(&a);
        assert_eq!(code, 0, "{extra:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let rows: Vec<(u64, String)> = v[0]["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_u64().unwrap(),
                    r["class_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        (rows, err)
    };
    let (exact, err) = q(&["--exact"]);
    assert!(!err.contains("ANN index"), "{err}");
    assert_eq!(exact.len(), 10);
    let (ann, err) = q(&["--ef", "50"]);
    assert!(err.contains("searched with the ANN index (ef 50)"), "{err}");
    assert_eq!(ann, exact);
    let (ann, err) = q(&["--recall", "0.9"]);
    assert!(err.contains("searched with the ANN index"), "{err}");
    assert_eq!(ann, exact);
    let (only, _) = q(&["--where", "class=n02279972"]);
    assert_eq!(only.len(), 4);
    assert!(only.iter().all(|r| r.1 == "n02279972"), "{only:?}");
    let prefix = data.join("n01443537");
    let (only, _) = q(&["--where", &format!("path={}", prefix.display()), "--exact"]);
    assert!(
        only.len() == 4 && only.iter().all(|r| r.1 == "n01443537"),
        "{only:?}"
    );
    for bad in [
        vec!["--where", "colour=red"],
        vec!["--ef", "0"],
        vec!["--recall", "1.5"],
        vec!["--ef", "10", "--exact"],
    ] {
        let mut a = vec!["query", "--db", d, "--image", img.to_str().unwrap()];
        a.extend(&bad);
        let (code, _, err) = common::cli(&a);
        // clap refuses conflicting flags (2); deeprank bad values (1).
        let want = if bad.contains(&"--exact") { 2 } else { 1 };
        assert_eq!(code, want, "{bad:?}: {err}");
        assert!(!err.contains("panick"), "{bad:?}: {err}");
    }
    // eval through the index scores what the exact scan scores (each query, itself a DB image,
    // left out of its own results); a filter scores only that class's queries.
    let ev = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--db",
            d,
            "--queries",
            data.to_str().unwrap(),
            "--json",
        ];
        a.extend(extra);
        let (code, out, err) = common::cli(&a);
        assert_eq!(code, 0, "{extra:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let m = serde_json::json!({
            "queries": v["queries"],
            "precision_at_k": v["precision_at_k"],
            "recall_at_k": v["recall_at_k"],
            "map_at_r": v["map_at_r"],
        });
        assert!(m["map_at_r"].is_f64(), "{v}");
        (m, v["queries_without_class_in_db"].clone(), err)
    };
    let (exact_m, _, _) = ev(&["--exact", "--k", "1,5"]);
    let (ann_m, _, err) = ev(&["--ef", "20", "--k", "1,5"]);
    assert!(err.contains("searched with the ANN index (ef 20)"), "{err}");
    assert_eq!(ann_m, exact_m);
    assert_eq!(exact_m["queries"], 12);
    let (one, left, _) = ev(&["--k", "1,3", "--where", "class=n02279972"]);
    assert_eq!(
        (one["queries"].as_u64(), left.as_u64()),
        (Some(4), Some(8)),
        "{one}"
    );
    // Within its own class every result is relevant: P@3 = 1 (3 others of 4).
    assert_eq!(one["precision_at_k"]["3"].as_f64(), Some(1.0), "{one}");
    // A damaged index: a clear error naming it, and --exact still answers.
    let st = deeprank::store::state::read(&db).unwrap().unwrap();
    let file = db.join(st.index.unwrap().file);
    std::fs::write(&file, b"garbage").unwrap();
    let a = ["query", "--db", d, "--image", img.to_str().unwrap()];
    let (code, _, err) = common::cli(&a);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&file.display().to_string()) && err.contains("--exact"),
        "{err}"
    );
    assert!(!err.contains("panick"), "{err}");
    let (again, _) = q(&["--exact"]);
    assert_eq!(again, exact);
    // `deeprank index` builds a new one; `check` sees no problem.
    let (code, _, err) = common::cli(&["index", "--db", d]);
    assert_eq!(code, 0, "{err}");
    assert!(!file.exists());
    assert!(common::changes::consistent(&db).is_empty());
}
