//! embed → DB → query / eval on real images, bad input, and the CLI's errors.

mod common;

use deeprank::data::dataset::{Dataset, Split};
use deeprank::infer::embedder::Embedder;
use deeprank::search::{eval, query};
use deeprank::store::build::embed_dataset;
use deeprank::store::db::Db;
use deeprank::store::npy::NpyMap;
use std::path::{Path, PathBuf};

fn embedder(size: u32) -> Embedder {
    Embedder::pretrained(Some(&common::weights()), size, true).unwrap()
}

/// A class-folder dataset with bad files mixed in: corrupt, truncated, empty, text named .jpg.
fn dataset_with_bad_files(root: &Path) -> Vec<PathBuf> {
    common::class_folders(root, 3, 6);
    let c = root.join("n01443537");
    let good = std::fs::read(c.join("n01443537_0.jpg")).unwrap();
    let bad = vec![
        c.join("corrupt.jpg"),
        c.join("truncated.jpg"),
        c.join("empty.jpg"),
        c.join("text.png"),
    ];
    let mut corrupt = good.clone();
    for b in corrupt.iter_mut().skip(200).take(600) {
        *b = 0x5a;
    }
    // Garbage after a valid JPEG header.
    std::fs::write(&bad[0], [&good[..20], &vec![0xffu8; 3000][..]].concat()).unwrap();
    std::fs::write(&bad[1], &good[..good.len() / 3]).unwrap();
    std::fs::write(&bad[2], b"").unwrap();
    std::fs::write(&bad[3], b"this is not an image").unwrap();
    bad
}

#[test]
fn embed_writes_a_numpy_readable_db_and_query_finds_same_class() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(&common::sample(), Split::Train).unwrap();
    let emb = embedder(64);
    let text = dir.path().join("embeddings.txt");
    let rep = embed_dataset(&emb, &ds, &dir.path().join("db"), Some(&text), 50).unwrap();
    assert_eq!(rep.count, 300);
    assert!(rep.skipped.is_empty());
    let db = Db::open(&dir.path().join("db")).unwrap();
    assert_eq!(db.len(), 300);
    assert_eq!(db.meta.dim, 1280);
    assert_eq!(db.meta.size, 64);
    // The npy header is the numpy v1.0 format with the final shape.
    let raw = std::fs::read(dir.path().join("db/vectors.npy")).unwrap();
    let header = String::from_utf8_lossy(&raw[10..128]);
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'shape': (300, 1280)"),
        "{header}"
    );
    assert_eq!(raw.len(), 128 + 300 * 1280 * 4);
    let v = NpyMap::open(&dir.path().join("db/vectors.npy")).unwrap();
    let norm: f32 = v.row(17).iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalised vectors: {norm}");
    // The text form: path then 1280 values per line, same values as the DB.
    let t = std::fs::read_to_string(&text).unwrap();
    let first: Vec<&str> = t.lines().next().unwrap().split(' ').collect();
    assert_eq!(first.len(), 1281);
    assert_eq!(first[0], ds.items[0].path.to_str().unwrap());
    assert!((first[1].parse::<f32>().unwrap() - v.row(0)[0]).abs() < 1e-6);
    // Embedding the same images again gives the same vectors (batching does not change results).
    let (again, _) = emb.embed_files(&[ds.items[17].path.clone()]).unwrap();
    let again = again[0].as_ref().unwrap();
    let d = again
        .iter()
        .zip(v.row(17))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d < 1e-4, "batch of 1 vs batch of 50: {d}");

    // A DB image as query: itself first at distance ~0, results sorted.
    let q = ds.items[42].path.clone();
    let res = query::query(&db, &emb, std::slice::from_ref(&q), 10).unwrap();
    let r = &res[0].results;
    assert_eq!(r.len(), 10);
    assert_eq!(r[0].path, q);
    assert!(r[0].distance < 1e-3);
    assert!(r.windows(2).all(|w| w[0].distance <= w[1].distance));
    assert_eq!(
        res[0].class_id.as_deref(),
        Some(ds.classes[ds.items[42].class].id.as_str())
    );
}

#[test]
fn eval_on_the_sample_beats_chance_by_far() {
    let dir = tempfile::tempdir().unwrap();
    let tr = Dataset::open(&common::sample(), Split::Train).unwrap();
    let va = Dataset::open(&common::sample(), Split::Val).unwrap();
    let emb = embedder(128);
    embed_dataset(&emb, &tr, &dir.path().join("db"), None, 64).unwrap();
    let db = Db::open(&dir.path().join("db")).unwrap();
    let rep = eval::evaluate(&emb, &db, &va, &[1, 10, 30], 64).unwrap();
    assert_eq!(rep.metrics.queries, 60);
    // Chance is 0.1 with 10 balanced classes.
    assert!(rep.metrics.precision_at_k[&1] > 0.6, "{:?}", rep.metrics);
    assert!(rep.metrics.precision_at_k[&30] > 0.4, "{:?}", rep.metrics);
    assert!(
        rep.metrics.map_at_r > 0.3 && rep.metrics.map_at_r <= 1.0,
        "{:?}",
        rep.metrics
    );
    assert!(rep.metrics.recall_at_k[&10] >= rep.metrics.precision_at_k[&10]);

    // The CLI prints one JSON object with a precision_at_k map keyed by k.
    let (code, out, err) = common::cli(&[
        "eval",
        "--db",
        dir.path().join("db").to_str().unwrap(),
        "--queries",
        common::sample().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p30 = v["precision_at_k"]["30"].as_f64().unwrap();
    assert!((p30 - rep.metrics.precision_at_k[&30]).abs() < 1e-9);
    assert!(v["map_at_r"].as_f64().is_some());
}

#[test]
fn bad_images_are_reported_by_path_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let bad = dataset_with_bad_files(&root);
    let ds = Dataset::open(&root, Split::Train).unwrap();
    assert_eq!(ds.items.len(), 18 + 4);
    let rep = embed_dataset(&embedder(64), &ds, &dir.path().join("db"), None, 8).unwrap();
    assert_eq!(rep.count, 18);
    let mut skipped: Vec<PathBuf> = rep.skipped.iter().map(|s| s.path.clone()).collect();
    skipped.sort();
    let mut want = bad.clone();
    want.sort();
    assert_eq!(skipped, want);
    assert_eq!(Db::open(&dir.path().join("db")).unwrap().len(), 18);
    // Through the CLI: each bad file named, a count at the end, exit 0.
    let (code, out, err) = common::cli(&[
        "embed",
        "--data",
        root.to_str().unwrap(),
        "--out",
        dir.path().join("db2").to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    for b in &bad {
        assert!(err.contains(&format!("skipped {}", b.display())), "{err}");
    }
    assert!(err.contains("skipped 4 unreadable images"), "{err}");
    assert!(out.contains("embedded 18 images"), "{out}");
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    // A real JPEG whose frame header (SOF0) is patched to declare 60000 x 60000 pixels.
    let mut jpg = std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap();
    let sof = jpg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("baseline JPEG");
    jpg[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
    let e =
        deeprank::data::transform::decode_rgb(&jpg, deeprank::data::transform::DEFAULT_MAX_PIXELS)
            .unwrap_err();
    assert!(
        e.to_string().contains("60000x60000") && e.to_string().contains("over the limit"),
        "{e}"
    );
    // A real image over a (small) pixel limit is refused the same way.
    let jpg = std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap();
    let e = deeprank::data::transform::decode_rgb(&jpg, 1000).unwrap_err();
    assert!(e.to_string().contains("64x64"), "{e}");
}

#[test]
fn db_model_mismatch_and_bad_queries_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    common::class_folders(&root, 2, 3);
    let db_dir = dir.path().join("db");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        root.to_str().unwrap(),
        "--out",
        db_dir.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    let img = common::sample().join("val/images/val_68.JPEG");
    let (code, out, err) = common::cli(&[
        "query",
        "--db",
        db_dir.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--top",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["results"].as_array().unwrap().len(), 3);
    assert_eq!(v[0]["class_id"], "n01443537");

    // Bad --k against a good DB: refused for the k list itself (a good list passes).
    let eval = |k: &str| {
        common::cli(&[
            "eval",
            "--db",
            db_dir.to_str().unwrap(),
            "--queries",
            common::sample().to_str().unwrap(),
            "--k",
            k,
        ])
    };
    for k in ["0,x", "0", "1,x", ""] {
        let (code, _, err) = eval(k);
        assert_eq!(code, 1, "--k {k:?}: {err}");
        assert!(
            err.contains(&format!("--k {k:?}: expected positive integers")),
            "--k {k:?}: {err}"
        );
    }
    let (code, out, err) = eval("1,3");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("P@3"), "{out}");

    // Unreadable and missing query images.
    let junk = dir.path().join("junk.jpg");
    std::fs::write(&junk, b"nope").unwrap();
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db_dir.to_str().unwrap(),
        "--image",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("junk.jpg") && !err.contains("panicked"),
        "{err}"
    );
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db_dir.to_str().unwrap(),
        "--image",
        "/no/such.jpg",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/no/such.jpg"), "{err}");

    // A DB made by another model is refused.
    let meta = db_dir.join("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["model"] = "some-other-model".into();
    std::fs::write(&meta, m.to_string()).unwrap();
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db_dir.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("was made with model some-other-model"),
        "{err}"
    );
    let (code, _, err) = common::cli(&[
        "eval",
        "--db",
        db_dir.to_str().unwrap(),
        "--queries",
        common::sample().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("re-run `deeprank embed`"), "{err}");

    // Not a DB; truncated vectors.
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        root.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a deeprank DB"), "{err}");
    std::fs::write(&meta, text).unwrap();
    let vec_path = db_dir.join("vectors.npy");
    let raw = std::fs::read(&vec_path).unwrap();
    std::fs::write(&vec_path, &raw[..raw.len() - 100]).unwrap();
    let (code, _, err) = common::cli(&[
        "query",
        "--db",
        db_dir.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn bad_flags_and_missing_folders_exit_non_zero_without_panic() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["embed", "--data", "/no/such/dir", "--out", "/tmp/x-db"],
        vec![
            "embed",
            "--data",
            "data/sample",
            "--out",
            "/tmp/x-db",
            "--size",
            // Odd: the pretrained network takes any even size (Lite1/Lite2 run at 240/260).
            "99",
        ],
        vec![
            "embed",
            "--data",
            "data/sample",
            "--out",
            "/tmp/x-db",
            "--model",
            "resnet",
        ],
        vec!["eval", "--db", "/no/such/db", "--queries", "data/sample"],
        vec!["sample", "--data", "/no/such/dir"],
        vec!["sample", "--data", "data/sample", "--n-pos", "0"],
        vec!["query", "--db", "/no/such/db"],
        vec!["frobnicate"],
        vec!["--device", "tpu", "weights", "path"],
    ];
    // At 32 px the pretrained features are all zero (PyTorch's too): refused, naming the fix.
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        "data/sample",
        "--out",
        "/tmp/x-db",
        "--size",
        "32",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--size 64 or larger"), "{err}");
    for args in cases {
        let (code, _, err) = common::cli(&args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
}

/// A CPU-only build names the build `--device vulkan` needs (a GPU build runs it: tests/gpu.rs).
#[cfg(not(feature = "gpu"))]
#[test]
fn vulkan_in_a_cpu_build_asks_for_a_gpu_build() {
    let (code, _, err) = common::cli(&["--device", "vulkan", "weights", "path"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--device vulkan needs a GPU build") && err.contains("--features gpu"),
        "{err}"
    );
}

#[test]
fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let w = common::weights();
    let (code, stdout, err) = common::cli(&[
        "demo",
        "--out",
        out.to_str().unwrap(),
        "--size",
        "64",
        "--weights",
        w.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("report:"), "{stdout}");
    assert!(out.join("report.md").is_file());
    for i in 1..=4 {
        for model in ["pretrained", "trained"] {
            let g = image::open(out.join(format!("query-{i}-{model}.png"))).unwrap();
            assert!(g.width() > 600 && g.height() > 150);
        }
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("MAP@R"));
}

/// `embed_stream` (each step finishes one batch while it begins the next and decodes the one
/// after) hands on every decoded image's vector once, in order, at its position, the same bits as
/// the image embedded alone: batches of 12 (the engine's grouped tail, in two groups per batch)
/// with a broken file in the second and a short last one, and batches of one.
#[test]
fn stream_hands_on_each_image_in_order_as_embedded_alone() {
    use deeprank::infer::stream::embed_stream;
    let emb = embedder(64);
    let dir = tempfile::tempdir().unwrap();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(common::sample().join("val/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.truncate(28);
    let broken = dir.path().join("broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    paths.insert(15, broken.clone());
    let alone: Vec<Option<Vec<f32>>> = paths
        .iter()
        .map(|p| {
            emb.embed_files(std::slice::from_ref(p))
                .unwrap()
                .0
                .remove(0)
        })
        .collect();
    assert!(alone[15].is_none() && alone.iter().filter(|v| v.is_some()).count() == 28);
    for batch in [12, 1] {
        let mut got = Vec::new();
        let skipped = embed_stream(&emb, &paths, batch, "test", |i, v| {
            got.push((i, v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(skipped.len(), 1, "batch {batch}");
        assert_eq!(skipped[0].path, broken);
        let want: Vec<(usize, Vec<f32>)> = alone
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.clone().map(|v| (i, v)))
            .collect();
        assert_eq!(got.len(), want.len(), "batch {batch}");
        for ((gi, g), (wi, w)) in got.iter().zip(&want) {
            assert_eq!(gi, wi, "batch {batch}");
            let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "batch {batch}: image {gi} differs from itself embedded alone"
            );
        }
    }
}
