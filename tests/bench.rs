//! `deeprank-bench`, the measurements `bench/*.sh` run: each command on tiny inputs prints its
//! `RESULT` line with sane figures; bad input is an error, not a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

/// Runs `deeprank-bench` with the test weights; returns (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deeprank-bench"))
        .args(["--threads", "2"])
        .args(args)
        .env("DEEPRANK_WEIGHTS", common::weights())
        .output()
        .expect("run deeprank-bench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The `key=value` figures of the one `RESULT name …` line of `out`.
fn result(out: &str, name: &str) -> HashMap<String, String> {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("RESULT {name} ")))
        .collect();
    assert_eq!(lines.len(), 1, "one RESULT {name} line expected: {out}");
    lines[0]
        .split_whitespace()
        .skip(2)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A figure as a finite positive number.
fn positive(r: &HashMap<String, String>, key: &str) -> f64 {
    let v: f64 = r
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {r:?}: {e}"));
    assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    v
}

#[test]
fn search_writes_its_vectors_and_times_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // 3 queries take the scan, 20 the matrix-product path.
    for q in ["3", "20"] {
        let (code, out, err) = bench(&[
            "search",
            "--dir",
            d,
            "--n",
            "3000",
            "--dim",
            "16",
            "--queries",
            q,
            "--k",
            "5",
            "--runs",
            "2",
        ]);
        assert_eq!(code, 0, "{err}");
        let r = result(&out, "deeprank_search");
        assert_eq!(r["n"], "3000");
        assert_eq!(r["queries"], q);
        positive(&r, "seconds");
        // The arrays FAISS reads: numpy .npy files of the stated shapes.
        let db = deeprank::store::npy::NpyMap::open(Path::new(&r["db"])).unwrap();
        let qs = deeprank::store::npy::NpyMap::open(Path::new(&r["q"])).unwrap();
        assert_eq!(db.data().len(), 3000 * 16);
        assert_eq!(qs.data().len(), q.parse::<usize>().unwrap() * 16);
        assert!(db.data().iter().all(|v| (-1.0..1.0).contains(v)));
    }
}

#[test]
fn decode_times_every_val_image() {
    let data = common::sample();
    let (code, out, err) = bench(&[
        "decode",
        "--data",
        data.to_str().unwrap(),
        "--size",
        "64",
        "--runs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let r = result(&out, "deeprank_decode");
    assert_eq!(r["images"], "60");
    assert_eq!(r["size"], "64");
    let s = positive(&r, "seconds");
    let ips = positive(&r, "img_per_s");
    // `seconds` is printed to 6 decimals: allow its rounding, relative to s.
    let tol = ips * (0.01 + 0.5e-6 / s) + 1.0;
    assert!((ips - 60.0 / s).abs() <= tol, "{r:?}");
    // A folder that is not there: an error naming it.
    let (code, _, err) = bench(&["decode", "--data", "/no/such/data"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/no/such/data") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn train_times_steps_of_the_seed_recipe() {
    let data = common::sample();
    let (code, out, err) = bench(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--size",
        "64",
        "--triplets",
        "2",
        "--dim",
        "16",
        "--warmup",
        "1",
        "--steps",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let r = result(&out, "deeprank_train");
    assert_eq!(r["triplets"], "2");
    let s = positive(&r, "seconds_per_step");
    let ips = positive(&r, "img_per_s");
    let tol = ips * (0.01 + 0.5e-6 / s) + 0.1;
    assert!((ips - 6.0 / s).abs() <= tol, "{r:?}");
    // The ranking loss of a random head on real triplets: finite, non-negative.
    let loss: f64 = r["loss"].parse().unwrap();
    assert!(loss.is_finite() && loss >= 0.0, "{r:?}");
    // More triplets than the val split has images for: refused with a message.
    let (code, _, err) = bench(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--size",
        "64",
        "--triplets",
        "100",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("needs 300 decodable images") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn ann_builds_the_shipped_index_and_measures_recall_against_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (dbp, qp) = (dir.path().join("db.npy"), dir.path().join("q.npy"));
    deeprank::benchkit::random_npy(&dbp, 2000, 12, 1).unwrap();
    deeprank::benchkit::random_npy(&qp, 30, 12, 2).unwrap();
    let save = dir.path().join("ix.hnsw");
    let (code, out, err) = bench(&[
        "ann",
        "--db-npy",
        dbp.to_str().unwrap(),
        "--queries",
        qp.to_str().unwrap(),
        "--m",
        "8",
        "--ef-construction",
        "100",
        "--ef",
        "500",
        "--add",
        "50",
        "--save",
        save.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let b = result(&out, "deeprank_ann_build");
    assert_eq!((b["n"].as_str(), b["dim"].as_str()), ("2000", "12"));
    positive(&b, "build_seconds");
    assert_eq!(b["add_rows"], "50");
    assert_eq!(
        b["index_bytes"],
        std::fs::metadata(&save).unwrap().len().to_string()
    );
    positive(&result(&out, "deeprank_ann_exact"), "qps");
    let s = result(&out, "deeprank_ann_search");
    assert_eq!((s["ef"].as_str(), s["queries"].as_str()), ("500", "30"));
    positive(&s, "qps");
    // ef = 500 over 2000 rows of 12-d: the graph walk finds what the exact scan finds.
    let recall: f64 = s["recall"].parse().unwrap();
    assert!(recall >= 0.99, "recall {recall}");
    // Without --queries, the last --nq rows are the queries; each --ef gets a line.
    let (code, out, err) = bench(&[
        "ann",
        "--db-npy",
        dbp.to_str().unwrap(),
        "--nq",
        "20",
        "--ef",
        "8,64",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(result(&out, "deeprank_ann_build")["n"], "1980");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("RESULT deeprank_ann_search "))
            .count(),
        2
    );
    // Bad input: an error naming the problem, no panic.
    let other = dir.path().join("other.npy");
    deeprank::benchkit::random_npy(&other, 10, 5, 3).unwrap();
    for (args, want) in [
        (vec!["--queries", other.to_str().unwrap()], "values"),
        (vec!["--ef", "8,x"], "--ef"),
        (vec!["--nq", "5000"], "--nq"),
    ] {
        let mut a = vec!["ann", "--db-npy", dbp.to_str().unwrap()];
        a.extend(args);
        let (code, _, err) = bench(&a);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(want) && !err.contains("panick"), "{err}");
    }
}

#[test]
fn kernels_times_every_shape_against_the_fma_peak() {
    let (code, out, err) = bench(&["kernels", "--gflop", "0.02"]);
    assert_eq!(code, 0, "{err}");
    let peak = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT fma_peak gflops="))
        .unwrap_or_else(|| panic!("no fma_peak line: {out}"));
    assert!(
        peak.starts_with("none") || peak.parse::<f64>().is_ok_and(|g| g > 1.0),
        "{peak}"
    );
    let shapes: Vec<_> = out
        .lines()
        .filter(|l| l.starts_with("RESULT pointwise "))
        .collect();
    assert_eq!(shapes.len(), 13, "{out}");
    for l in shapes {
        for key in [" gflops=", " weights_from_l3_gflops="] {
            let g = l
                .split(key)
                .nth(1)
                .unwrap_or_else(|| panic!("no{key}: {l}"));
            let g: f64 = g.split(' ').next().unwrap().parse().unwrap();
            assert!(g > 0.1 && g.is_finite(), "{l}");
        }
    }
}

#[test]
fn layers_times_every_stage_with_blocks_fused_and_not() {
    let data = common::sample();
    let (code, out, err) = bench(&[
        "layers",
        "--data",
        data.to_str().unwrap(),
        "--size",
        "128",
        "--n",
        "3",
        "--runs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    for name in [
        "deeprank_layers_plain",
        "deeprank_layers_fused",
        "deeprank_layers_grouped",
    ] {
        let r = result(&out, name);
        assert_eq!(r["images"], "3");
        positive(&r, "img_per_s");
    }
    // `| stage | layer by layer | fused | fused + grouped tail |` rows: every stage is there; at 128 px block 2 runs
    // fused with any band the L2 gives (its expansion is 590 KB, bands are 128–512 KB and hold its 4
    // rows or more), so its whole time sits under its depthwise, none under its expansion; block 0
    // has no expansion to fuse.
    let row = |stage: &str| -> Vec<f64> {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("| {stage} |")))
            .unwrap_or_else(|| panic!("no {stage} row: {out}"));
        line.split('|')
            .skip(2)
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().parse().unwrap())
            .collect()
    };
    for stage in ["stem", "block 15 project", "head + pool"] {
        let v = row(stage);
        assert!(v.len() == 3 && v.iter().all(|t| *t > 0.0), "{stage}: {v:?}");
    }
    // Which stage a time lands under, not how long it is (no timing comparisons in tests).
    let (expand, dw) = (row("block 2 expand"), row("block 2 depthwise"));
    assert!(
        expand[0] > 0.0 && expand[1] == 0.0 && expand[2] == 0.0 && dw[1] > 0.0,
        "{expand:?} {dw:?}"
    );
    let total = row("total (thread-ms per image)");
    assert!(total.iter().all(|t| *t > 0.0), "{total:?}");
    let (code, _, err) = bench(&["layers", "--data", "/no/such/data"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/no/such/data") && !err.contains("panicked"),
        "{err}"
    );
}
