//! kill -9 during add, remove (with its automatic compaction), sync, compact and the format-1
//! upgrade: at every named crash point (`DEEPRANK_CRASH_AT`) and at random moments (real SIGKILL).
//! After each kill the DB must open, pass `check`, and hold exactly the old or the new content;
//! the next command finishes the change and repairs what the crash left.

mod common;

use common::changes::{Logical, consistent, fresh, logical, make_format_1, png};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Add,
    Remove,
    Sync,
    Compact,
    Upgrade,
}

const POINTS: [&str; 17] = [
    "commit-start",
    "torn-vector",
    "vectors-appended",
    "torn-manifest",
    "appended",
    "state-written",
    "state-renamed",
    "committed",
    "header-written",
    "compact-written",
    "renames-committed",
    "renamed",
    "renamed:2",
    "renames-done",
    "upgrade-written",
    "state-written:2",
    "state-renamed:3",
];

/// The case folder's DB made ready for `op` (the change before it done), and the op's arguments.
fn prepare(dir: &Path, op: Op) -> (PathBuf, Vec<String>) {
    let (data, db) = fresh(dir);
    let d = |p: &Path| p.to_str().unwrap().to_string();
    let first = std::fs::read_dir(data.join("n01443537"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let args = match op {
        Op::Add => {
            let new = dir.join("new");
            std::fs::create_dir_all(&new).unwrap();
            for i in 0..3 {
                png(&new.join(format!("p{i}.png")), i);
            }
            std::fs::copy(&first, new.join("dup.jpg")).unwrap();
            vec!["add".into(), "--db".into(), d(&db), d(&new)]
        }
        Op::Remove => ["remove", "--db", &d(&db), "1", "5", "9", "10"]
            .map(String::from)
            .to_vec(),
        Op::Sync => {
            std::fs::remove_file(&first).unwrap();
            png(&data.join("n01443537/new.png"), 7);
            let second = std::fs::read_dir(data.join("n02279972"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .min()
                .unwrap();
            let img = image::open(&second).unwrap().flipv();
            img.save_with_format(&second, image::ImageFormat::Png)
                .unwrap();
            vec![
                "sync".into(),
                "--db".into(),
                d(&db),
                "--data".into(),
                d(&data),
            ]
        }
        Op::Compact => {
            let (code, _, err) = common::cli(&["remove", "--db", &d(&db), "2", "3"]);
            assert_eq!(code, 0, "{err}");
            vec!["compact".into(), "--db".into(), d(&db)]
        }
        Op::Upgrade => {
            make_format_1(&db);
            ["remove", "--db", &d(&db), "6"].map(String::from).to_vec()
        }
    };
    (db, args)
}

/// Logical content with the case folder's prefix taken off the paths (cases compare across folders).
fn content(db: &Path, base: &Path) -> Logical {
    let prefix = base.to_str().unwrap();
    logical(db)
        .into_iter()
        .map(|(id, p, c, v)| (id, p.replacen(prefix, "", 1), c, v))
        .collect()
}

fn deeprank(args: &[String], crash: Option<&str>) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deeprank"));
    c.args(["--threads", "2"]).args(args);
    if let Some(p) = crash {
        c.env("DEEPRANK_CRASH_AT", p);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish_ok(args: &[String]) {
    let out = deeprank(args, None).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_at_every_named_point_leaves_the_old_or_the_new_db() {
    let tmp = tempfile::tempdir().unwrap();
    for op in [Op::Add, Op::Remove, Op::Sync, Op::Compact, Op::Upgrade] {
        // The two ends: the content before and after the op, uninterrupted.
        let base = tmp.path().join(format!("{op:?}-ref"));
        let (db, args) = prepare(&base, op);
        let old = content(&db, &base);
        finish_ok(&args);
        let new = content(&db, &base);
        // Compaction changes the files, not the content.
        assert_eq!(op == Op::Compact, old == new, "{op:?}");
        let mut crashed = 0;
        for (i, point) in POINTS.iter().enumerate() {
            let case = tmp.path().join(format!("{op:?}-{i}"));
            let (db, args) = prepare(&case, op);
            assert_eq!(content(&db, &case), old);
            let out = deeprank(&args, Some(point)).wait_with_output().unwrap();
            let what = format!("{op:?} killed at {point}");
            match out.status.signal() {
                Some(9) => crashed += 1,
                None if out.status.success() => {} // this op does not pass the point
                _ => panic!(
                    "{what}: {:?} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
            consistent(&db);
            let now = content(&db, &case);
            assert!(
                now == old || now == new,
                "{what}: neither the old nor the new content"
            );
            // The next command finishes the change (or finds it done) and repairs the rest.
            if now == old {
                finish_ok(&args);
            } else {
                finish_ok(&["compact".into(), "--db".into(), db.to_str().unwrap().into()]);
            }
            assert_eq!(content(&db, &case), new, "{what}: after the next command");
            let notes = consistent(&db);
            assert!(
                notes.is_empty(),
                "{what}: left after the next command: {notes:?}"
            );
            std::fs::remove_dir_all(&case).unwrap();
        }
        assert!(crashed >= 6, "{op:?} passed only {crashed} crash points");
    }
}

#[test]
fn sigkill_at_random_moments_of_a_chunked_add_leaves_a_committed_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = |dir: &Path| {
        let (_, db) = fresh(dir);
        let new = dir.join("new");
        std::fs::create_dir_all(&new).unwrap();
        for i in 0..16 {
            png(&new.join(format!("p{i:02}.png")), 100 + i);
        }
        let args: Vec<String> = ["add", "--db", db.to_str().unwrap(), new.to_str().unwrap()]
            .into_iter()
            .map(String::from)
            .chain(["--commit-every", "2", "--batch", "2"].map(String::from))
            .collect();
        (db, args)
    };
    let base = tmp.path().join("ref");
    let (db, args) = setup(&base);
    let old = content(&db, &base);
    // The moments are drawn over the commit phase, from the first commit seen to the exit: model
    // loading dominates a run, and timing the kill from the start put every kill before the first
    // commit or after the last one once embedding got fast.
    let mut child = deeprank(&args, None);
    let t1 = first_commit(&db, &mut child);
    let status = child.wait().unwrap();
    assert!(status.success(), "the reference add failed");
    let phase = t1.elapsed();
    let new = content(&db, &base);
    assert_eq!(new.len(), old.len() + 16);
    let mut seed = 12345u64;
    let mut outcomes = std::collections::BTreeSet::new();
    for i in 0..16 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let frac = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let case = tmp.path().join(format!("kill-{i}"));
        let (db, args) = setup(&case);
        let mut child = deeprank(&args, None);
        first_commit(&db, &mut child);
        std::thread::sleep(phase.mul_f64(frac * 1.1));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        consistent(&db);
        let now = content(&db, &case);
        let added = now.len() - old.len();
        assert_eq!(&now[..old.len()], &old[..], "kill {i}: old rows changed");
        assert_eq!(
            &now[old.len()..],
            &new[old.len()..now.len()],
            "kill {i}: not a prefix"
        );
        assert!(
            added.is_multiple_of(2),
            "kill {i}: {added} rows is not whole commits"
        );
        outcomes.insert(added);
        finish_ok(&args);
        assert_eq!(content(&db, &case), new, "kill {i}: after the next add");
        assert!(consistent(&db).is_empty());
        std::fs::remove_dir_all(&case).unwrap();
    }
    assert!(
        outcomes.len() >= 3,
        "kills landed at too few moments: {outcomes:?}"
    );
}

/// Waits until `child` replaces the DB's `state.json` (its first commit) and returns that moment;
/// panics if the child exits first.
fn first_commit(db: &Path, child: &mut std::process::Child) -> Instant {
    use std::os::unix::fs::MetadataExt;
    let state = db.join("state.json");
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
    let before = ino(&state);
    loop {
        if ino(&state) != before {
            return Instant::now();
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the add exited ({s}) before its first commit was seen");
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Every search through the DB's index (when it has one) equals the exact scan, each live row as a
/// query.
fn index_agrees_with_exact(db: &Path, what: &str) {
    use deeprank::search::ann::db::{self as ann_db, Mode, Request, search};
    let d = deeprank::store::db::Db::open(db).unwrap();
    let ix = ann_db::open(&d).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let qs: Vec<f32> = d
        .live_rows()
        .flat_map(|r| d.vectors.row(r).to_vec())
        .collect();
    let run = |mode| {
        let req = Request {
            mode,
            ..Request::default()
        };
        let (h, _) = search(&d, ix.as_ref(), &qs, 5, &req);
        h.into_iter()
            .map(|h| h.into_iter().map(|x| x.index).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(Mode::Ef(100)), run(Mode::Exact), "{what}");
}

#[test]
fn kill_during_index_build_and_update_leaves_a_searchable_db() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 3] = [
        (
            "index",
            &[
                "index-written",
                "state-written",
                "state-renamed",
                "index-committed",
            ],
        ),
        // The add's own commit is the first state write; the index update's the second. "add":
        // the first update after `index` (on 12 rows); "add-delta": on a 430-row DB whose index
        // has a delta already, so the kill falls between one delta and the next.
        (
            "add",
            &[
                "index-written",
                "state-written:2",
                "state-renamed:2",
                "index-committed",
            ],
        ),
        (
            "add-delta",
            &[
                "index-written",
                "state-written:2",
                "state-renamed:2",
                "index-committed",
            ],
        ),
    ];
    for (op, points) in cases {
        for point in points {
            let what = format!("{op} killed at {point}");
            let case = tmp.path().join(format!("{op}-{}", point.replace(':', "-")));
            let (db, add_args) = prepare(&case, Op::Add);
            let d = db.to_str().unwrap().to_string();
            let index_args: Vec<String> = ["index", "--db", &d].map(String::from).to_vec();
            let args = if op == "index" {
                index_args.clone()
            } else {
                if op == "add-delta" {
                    grow(&db, 0, 400);
                }
                finish_ok(&index_args);
                if op == "add-delta" {
                    grow(&db, 400, 430);
                    let b = deeprank::search::ann::update::refresh(&db, None).unwrap();
                    assert!(b.is_some_and(|b| b.delta), "{what}: no first delta");
                }
                add_args
            };
            let before = deeprank::store::state::read(&db).unwrap().unwrap();
            let out = deeprank(&args, Some(point)).wait_with_output().unwrap();
            assert_eq!(out.status.signal(), Some(9), "{what}: not killed");
            consistent(&db);
            let st = deeprank::store::state::read(&db).unwrap().unwrap();
            match &st.index {
                Some(ix) => {
                    for f in ix.files() {
                        assert!(db.join(f).is_file(), "{what}: no {f}");
                    }
                    if op != "index" {
                        // The old index or the new one over the added rows, nothing else.
                        let old = before.index.as_ref().unwrap();
                        assert!(ix == old || ix.rows == st.rows, "{what}: {ix:?}");
                    }
                }
                None => assert_eq!(op, "index", "{what}: the index is gone"),
            }
            index_agrees_with_exact(&db, &what);
            // The next run finishes it: the index covers every row, one index file is left.
            finish_ok(&args);
            let st = deeprank::store::state::read(&db).unwrap().unwrap();
            let ix = st.index.as_ref().unwrap();
            assert_eq!(ix.rows, st.rows, "{what}");
            if op == "add-delta" {
                assert!(ix.delta.is_some(), "{what}: not a delta: {ix:?}");
            }
            let files = std::fs::read_dir(&db)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    deeprank::store::commit::is_index_file(&name.to_string_lossy())
                })
                .count();
            assert_eq!(files, ix.files().len(), "{what}: stale index files");
            assert!(consistent(&db).is_empty(), "{what}");
            index_agrees_with_exact(&db, &format!("{what}, then finished"));
            std::fs::remove_dir_all(&case).unwrap();
        }
    }
}

/// Commits rows `from..to` of synthetic vectors between pairs of the DB's first rows (points on
/// the segments between real embeddings, a little noise) with made-up paths: a DB big enough for
/// an index update to be a delta.
fn grow(db: &Path, from: usize, to: usize) {
    use deeprank::store::commit::{Change, NewRow, Wait, Writer};
    let mut w = Writer::open(db, Wait::Fail).unwrap();
    let d = w.db();
    let seeds: Vec<Vec<f32>> = d
        .live_rows()
        .take(12)
        .map(|r| d.vectors.row(r).to_vec())
        .collect();
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let add = (from..to)
        .map(|i| NewRow {
            entry: deeprank::store::db::Entry {
                path: db.parent().unwrap().join(format!("extra/x{i}.jpg")),
                class_id: String::new(),
                class_name: String::new(),
            },
            stamp: Default::default(),
            vector: {
                let mut r = || {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32
                };
                let t = r();
                let (a, b) = (&seeds[i % 12], &seeds[(i / 12 + i + 1) % 12]);
                a.iter()
                    .zip(b)
                    .map(|(x, y)| t * x + (1.0 - t) * y + 0.002 * (r() - 0.5))
                    .collect()
            },
        })
        .collect();
    w.commit(&Change {
        add,
        remove: vec![],
    })
    .unwrap();
}
