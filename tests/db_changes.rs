//! A DB that changes: add (dedupe, stable ids, append-only), remove, sync, compact, format-1 DBs,
//! and readers during commits. The model-free cases use synthetic rows through the library.

mod common;

use common::changes::{consistent, fresh, logical, make_format_1, png, synthetic};
use deeprank::store::commit::{Change, NewRow, Wait, Writer};
use deeprank::store::db::{Db, Entry};
use deeprank::store::manifest::Stamp;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> String {
    let (code, out, err) = common::cli(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

#[test]
fn add_appends_with_new_ids_and_stores_the_same_bytes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, db) = fresh(tmp.path());
    let before = logical(&db);
    let raw0 = std::fs::read(db.join("vectors.npy")).unwrap();
    let man0 = std::fs::read(db.join("manifest.tsv")).unwrap();
    let new = tmp.path().join("new");
    std::fs::create_dir_all(new.join("sub")).unwrap();
    png(&new.join("a.png"), 1);
    png(&new.join("sub/b.png"), 2);
    std::fs::copy(new.join("a.png"), new.join("a-copy.png")).unwrap();
    let existing = std::fs::read_dir(data.join("n01443537"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&existing, new.join("old.jpg")).unwrap();
    std::fs::write(new.join("notes.txt"), "not an image").unwrap();
    let out = run(&["add", "--db", s(&db), s(&new), s(&new.join("a.png"))]);
    assert!(out.contains("2 added"), "{out}");
    assert!(out.contains("2 duplicates skipped"), "{out}");
    let after = logical(&db);
    assert_eq!(after.len(), 14);
    assert_eq!(&after[..12], &before[..], "old rows and ids unchanged");
    assert_eq!((after[12].0, after[13].0), (12, 13));
    // Append-only: old bytes unchanged (but the npy header's shape).
    let raw = std::fs::read(db.join("vectors.npy")).unwrap();
    assert_eq!(&raw[128..raw0.len()], &raw0[128..]);
    assert!(String::from_utf8_lossy(&raw[..128]).contains("(14, 1280)"));
    assert!(
        std::fs::read(db.join("manifest.tsv"))
            .unwrap()
            .starts_with(&man0)
    );
    assert!(consistent(&db).is_empty());
    // The added image is found as itself.
    let q = run(&[
        "query",
        "--db",
        s(&db),
        "--image",
        s(&new.join("sub/b.png")),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&q).unwrap();
    let top = &v[0]["results"][0];
    assert_eq!(top["id"], 13);
    assert!(top["distance"].as_f64().unwrap() < 1e-3);
    // Adding the same again changes nothing.
    let out = run(&["add", "--db", s(&db), s(&new)]);
    assert!(
        out.contains("0 added") && out.contains("2 unchanged"),
        "{out}"
    );
    assert_eq!(logical(&db), after);
}

#[test]
fn removed_rows_never_show_and_ids_survive_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, db) = fresh(tmp.path());
    let d0 = Db::open(&db).unwrap();
    let (p3, p5) = (d0.entries[3].path.clone(), d0.entries[5].path.clone());
    drop(d0);
    run(&["remove", "--db", s(&db), "2", s(&p3)]);
    let l = logical(&db);
    assert_eq!(l.len(), 10);
    assert!(l.iter().all(|r| r.0 != 2 && r.0 != 3));
    // Querying with a removed image: it is not among the results, nor is any removed id.
    let q = run(&[
        "query",
        "--db",
        s(&db),
        "--image",
        s(&p3),
        "--top",
        "20",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&q).unwrap();
    let ids: Vec<u64> = v[0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 10);
    assert!(!ids.contains(&2) && !ids.contains(&3), "{ids:?}");
    // A target that matches nothing removes nothing.
    let (code, _, err) = common::cli(&["remove", "--db", s(&db), "4", "no/such/file.jpg"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no/such/file.jpg") && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(logical(&db).len(), 10);
    // A folder removes every row under it: the 2 left of the first class; 4 of 12 rows removed is
    // past the 25% share, so it compacts.
    let first_class = p5.parent().unwrap().parent().unwrap().join("n01443537");
    assert!(first_class.starts_with(&data));
    let out = run(&["remove", "--db", s(&db), s(&first_class)]);
    assert!(out.contains("compacted: 4"), "{out}");
    let l2 = logical(&db);
    assert_eq!(l2.len(), 8);
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        (st["rows"].as_u64(), st["next_id"].as_u64()),
        (Some(8), Some(12))
    );
    assert_eq!(
        std::fs::metadata(db.join("vectors.npy")).unwrap().len(),
        128 + 8 * 1280 * 4
    );
    // Ids, paths and vectors of the survivors are as they were.
    assert!(l2.iter().all(|r| l.contains(r)));
    assert!(consistent(&db).is_empty());
    // Eval and explicit compaction still work.
    run(&["compact", "--db", s(&db)]);
    assert_eq!(logical(&db), l2);
}

#[test]
fn sync_adds_new_removes_vanished_and_reembeds_changed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, db) = fresh(tmp.path());
    let d0 = Db::open(&db).unwrap();
    let gone = d0.entries[0].path.clone();
    let changed = d0.entries[5].path.clone();
    let touched = d0.entries[7].path.clone();
    let changed_class = d0.entries[5].class_id.clone();
    drop(d0);
    std::fs::remove_file(&gone).unwrap();
    png(&data.join("n01443537/brand-new.png"), 9);
    // New content under the same name (still a JPEG by extension; the decoder reads PNG too).
    let img = image::open(&changed).unwrap().fliph();
    img.save_with_format(&changed, image::ImageFormat::Png)
        .unwrap();
    let t = std::fs::read(&touched).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&touched, t).unwrap();
    let out = run(&["sync", "--db", s(&db), "--data", s(&data), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["added"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(v["removed"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(v["changed"], 1, "{out}");
    assert_eq!(v["unchanged"], 10, "{out}");
    let l = logical(&db);
    assert_eq!(l.len(), 12);
    assert!(
        l.iter().all(|r| r.0 != 0 && r.0 != 5),
        "gone and changed rows removed"
    );
    assert!(l.iter().any(|r| r.0 == 7), "a touched file keeps its id");
    let new_changed = l.iter().find(|r| r.1 == s(&changed)).unwrap();
    assert!(new_changed.0 >= 12);
    assert_eq!(
        new_changed.2, changed_class,
        "a new file in a class folder gets the class"
    );
    assert!(consistent(&db).is_empty());
    // A second sync finds nothing to do.
    let generation = |db: &Path| Db::open(db).unwrap().state.generation;
    let g = generation(&db);
    let out = run(&["sync", "--db", s(&db), "--data", s(&data)]);
    assert!(
        out.contains("0 added, 0 removed, 0 changed, 12 unchanged"),
        "{out}"
    );
    assert_eq!(generation(&db), g);
}

#[test]
fn a_format_1_db_opens_as_generation_0_and_is_upgraded_by_its_first_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    let l0 = logical(&db);
    make_format_1(&db);
    let d = Db::open(&db).unwrap();
    assert_eq!((d.state.format, d.state.generation, d.len()), (1, 0, 12));
    drop(d);
    assert_eq!(logical(&db), l0);
    run(&["query", "--db", s(&db), "--image", &l0[4].1]);
    let out = run(&["remove", "--db", s(&db), "4"]);
    assert!(out.contains("1 removed"), "{out}");
    let d = Db::open(&db).unwrap();
    assert_eq!((d.state.format, d.len()), (2, 11));
    assert!(
        d.stamps.iter().all(|s| s.sha256.is_some()),
        "stamps filled by the upgrade"
    );
    drop(d);
    let l1 = logical(&db);
    assert_eq!(
        l1,
        l0.iter().filter(|r| r.0 != 4).cloned().collect::<Vec<_>>()
    );
    assert!(consistent(&db).is_empty());
}

fn row(i: u64) -> NewRow {
    NewRow {
        entry: Entry {
            path: PathBuf::from(format!("/x/new-{i}.jpg")),
            class_id: String::new(),
            class_name: String::new(),
        },
        stamp: Stamp::default(),
        vector: (0..8).map(|j| (i * 8 + j) as f32).collect(),
    }
}

#[test]
fn readers_see_whole_commits_while_a_writer_appends_and_compacts() {
    let tmp = tempfile::tempdir().unwrap();
    let db = synthetic(tmp.path(), 50);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let d = Db::open(&db).unwrap();
                // Every committed row added by the writer has its full, final vector.
                for r in d.live_rows().filter(|&r| d.ids[r] >= 50) {
                    let i = d.ids[r] - 50;
                    let want: Vec<f32> = (0..8).map(|j| (i * 8 + j) as f32).collect();
                    assert_eq!(d.vectors.row(r), &want[..], "row id {}", d.ids[r]);
                }
                assert_eq!(d.live_rows().count(), d.len());
                seen.insert(d.state.generation);
            }
            seen.len()
        })
    };
    let mut w = Writer::open(&db, Wait::Fail).unwrap();
    // A second writer is refused while this one holds the lock.
    assert!(Writer::open(&db, Wait::Fail).is_err());
    for k in 0..40u64 {
        let remove = if k % 4 == 3 { vec![k] } else { vec![] };
        w.commit(&Change {
            add: (0..5).map(|j| row(k * 5 + j)).collect(),
            remove,
        })
        .unwrap();
        if k % 10 == 9 {
            w.compact().unwrap();
        }
    }
    drop(w);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let generations = reader.join().unwrap();
    assert!(generations > 3, "the reader saw {generations} generations");
    let d = Db::open(&db).unwrap();
    assert_eq!(d.len(), 50 + 200 - 10);
    assert!(consistent(&db).is_empty());
}
