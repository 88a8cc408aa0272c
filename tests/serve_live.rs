//! `serve` over a changing DB: reload on a commit (poll and `POST /api/reload`), uploads with
//! `--writable` and the API key, and searches during adds that only ever see whole commits.

mod common;

use common::changes::{fresh, png};
use common::server::{self, Server, agent};
use deeprank::store::db::Db;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start(db: &Path, extra: &[&str]) -> Server {
    server::start(db, "2", extra)
}

fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().unwrap();
    let v = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (r.status().as_u16(), v)
}

fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut req = agent().post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.send(body).unwrap();
    let v = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (r.status().as_u16(), v)
}

fn count(s: &Server) -> u64 {
    get(&format!("{}/api/stats", s.base)).1["count"]
        .as_u64()
        .unwrap()
}

fn add(db: &Path, paths: &[PathBuf], crash: Option<&str>) -> bool {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deeprank"));
    c.args(["--threads", "1", "add", "--db", db.to_str().unwrap()])
        .args(paths)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = crash {
        c.env("DEEPRANK_CRASH_AT", p);
    }
    c.status().unwrap().success()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_follows_commits_by_polling_and_on_post_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    let new: Vec<PathBuf> = (0..4)
        .map(|i| tmp.path().join(format!("n{i}.png")))
        .collect();
    for (i, p) in new.iter().enumerate() {
        png(p, 40 + i as u32);
    }
    let polled = start(&db, &["--reload-ms", "100"]);
    let manual = start(&db, &["--reload-ms", "0"]);
    assert_eq!(count(&polled), 12);
    assert!(add(&db, &new[..2], None));
    wait_for("the poll sees the add", || count(&polled) == 14);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&manual), 12, "no polling: still the old view");
    let (code, v) = post(&format!("{}/api/reload", manual.base), &[], b"");
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["reloaded"].as_bool(), v["count"].as_u64()),
        (Some(true), Some(14))
    );
    let (_, v) = post(&format!("{}/api/reload", manual.base), &[], b"");
    assert_eq!(v["reloaded"].as_bool(), Some(false));
    // A removed row disappears from results and from /api/images.
    let (code, _) = get(&format!("{}/api/images/13", polled.base));
    assert_ne!(code, 404);
    let (code, _, err) = common::cli(&["remove", "--db", db.to_str().unwrap(), "13"]);
    assert_eq!(code, 0, "{err}");
    wait_for("the poll sees the removal", || count(&polled) == 13);
    let r = agent()
        .get(&format!("{}/api/images/13", polled.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (_, v) = get(&format!("{}/api/search?id=12&top=20", polled.base));
    let ids: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 12);
    assert!(!ids.contains(&13) && !ids.contains(&12), "{ids:?}");
}

#[test]
fn uploads_need_writable_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    let img = tmp.path().join("up.png");
    png(&img, 77);
    let bytes = std::fs::read(&img).unwrap();
    // --writable without a key does not start.
    let (code, _, err) = common::cli(&["serve", "--db", db.to_str().unwrap(), "--writable"]);
    assert_ne!(code, 0);
    assert!(err.contains("--api-key"), "{err}");
    let ro = start(&db, &[]);
    let (code, v) = post(
        &format!("{}/api/images?name=up.png", ro.base),
        &[("Authorization", "Bearer k3y")],
        &bytes,
    );
    assert_eq!(code, 403, "{v}");
    drop(ro);
    let s = start(&db, &["--writable", "--api-key", "k3y"]);
    let url = format!("{}/api/images?name=my%20photo.png", s.base);
    for auth in [None, Some("Bearer wrong"), Some("k3y"), Some("Bearer k3")] {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (code, v) = post(&url, &h, &bytes);
        assert_eq!(code, 401, "{auth:?}: {v}");
    }
    assert_eq!(count(&s), 12, "refused uploads store nothing");
    let key = [("Authorization", "Bearer k3y")];
    let (code, v) = post(&url, &key, &bytes);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["id"], 12);
    assert_eq!(v["count"], 13);
    // The same bytes again: the existing id, nothing stored.
    let (code, v2) = post(&url, &key, &bytes);
    assert_eq!(
        (code, &v2["id"], &v2["duplicate"]),
        (200, &v["id"], &Value::Bool(true))
    );
    let (code, bad) = post(&url, &key, b"not an image");
    assert!(code == 415 || code == 400, "{code} {bad}");
    // Multipart, with the form's file name.
    let other = tmp.path().join("other.png");
    png(&other, 78);
    let b = "bnd";
    let mut body = format!("--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"../../evil name.png\"\r\n\r\n").into_bytes();
    body.extend_from_slice(&std::fs::read(&other).unwrap());
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={b}");
    let (code, v3) = post(
        &format!("{}/api/images", s.base),
        &[key[0], ("Content-Type", &ct)],
        &body,
    );
    assert_eq!(code, 201, "{v3}");
    // Stored under DB/uploads/, found by search as itself, served by id.
    let d = Db::open(&db).unwrap();
    let stored: Vec<PathBuf> = d
        .live_rows()
        .filter(|&r| d.ids[r] >= 12)
        .map(|r| d.entries[r].path.clone())
        .collect();
    assert_eq!(stored.len(), 2);
    for p in &stored {
        assert!(
            p.starts_with(std::path::absolute(db.join("uploads")).unwrap()),
            "{}",
            p.display()
        );
        assert!(p.is_file());
    }
    assert!(
        stored[0].to_str().unwrap().ends_with("-my_photo.png"),
        "{}",
        stored[0].display()
    );
    assert!(
        stored[1].to_str().unwrap().ends_with("-evil_name.png"),
        "{}",
        stored[1].display()
    );
    let (code, v) = post(
        &format!("{}/api/search?top=1", s.base),
        &[("Content-Type", "image/png")],
        &bytes,
    );
    assert_eq!(code, 200);
    assert_eq!(v["results"][0]["id"], 12);
    assert!(v["results"][0]["distance"].as_f64().unwrap() < 1e-3);
    let mut r = agent()
        .get(&format!("{}/api/images/12", s.base))
        .call()
        .unwrap();
    assert_eq!(r.body_mut().read_to_vec().unwrap(), bytes);
}

#[test]
fn searches_during_adds_only_see_whole_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    // Reloads on POST only, so the test decides when the server reopens the DB: right after
    // killed adds left uncommitted rows in the files.
    let s = start(&db, &["--reload-ms", "0"]);
    // A query like the images being added (it is added last, to know its vector).
    let query = tmp.path().join("query.png");
    png(&query, 199);
    let qbytes = std::fs::read(&query).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let searcher = {
        let (base, stop) = (s.base.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, v) = post(
                    &format!("{base}/api/search?top=8"),
                    &[("Content-Type", "image/png")],
                    &qbytes,
                );
                assert_eq!(code, 200, "{v}");
                answers.push(v);
            }
            answers
        })
    };
    let pngs = |k: u32, seed: u32| -> Vec<PathBuf> {
        (0..3)
            .map(|i| {
                let p = tmp.path().join(format!("a{seed}-{k}-{i}.png"));
                png(&p, seed + k * 3 + i);
                p
            })
            .collect()
    };
    // Adds that commit, then adds of other images killed mid-append, then a reload: the files
    // hold rows past the commit while the server reopens the DB. Those rows would take the ids
    // the next add gives to other images, so a reader that saw them would report distances the
    // final DB contradicts.
    let reload = format!("{}/api/reload", s.base);
    for k in 0..6u32 {
        assert!(add(&db, &pngs(k, 200), None));
        if k % 2 == 0 {
            assert!(!add(&db, &pngs(k, 500), Some("torn-vector")));
            assert!(!add(&db, &pngs(k, 600), Some("appended")));
        }
        let (code, v) = post(&reload, &[], b"");
        assert_eq!((code, v["reloaded"].as_bool()), (200, Some(true)), "{v}");
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = searcher.join().unwrap();
    assert!(add(&db, std::slice::from_ref(&query), None));
    // Every answer is exact for the final DB's vectors of the ids it names.
    let d = Db::open(&db).unwrap();
    assert_eq!(d.len(), 12 + 18 + 1);
    let qrow = d.row_of(30).unwrap();
    assert_eq!(d.entries[qrow].path, std::path::absolute(&query).unwrap());
    let q = d.vectors.row(qrow).to_vec();
    let mut generations = std::collections::BTreeSet::new();
    let mut last = 0;
    for a in &answers {
        let g = a["generation"].as_u64().unwrap();
        assert!(g >= last, "generations go back: {last} then {g}");
        last = g;
        generations.insert(g);
        let hits = a["results"].as_array().unwrap();
        assert_eq!(hits.len(), 8);
        let mut prev = -1.0;
        for h in hits {
            let id = h["id"].as_u64().unwrap();
            let row = d
                .row_of(id)
                .unwrap_or_else(|| panic!("id {id} is not in the DB"));
            let want: f32 = q
                .iter()
                .zip(d.vectors.row(row))
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            let got = h["distance"].as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() < 1e-3,
                "id {id}: {got} vs {want} (generation {g})"
            );
            assert!(got >= prev);
            prev = got;
        }
    }
    assert!(
        generations.len() >= 3,
        "searches saw too few commits: {generations:?}"
    );
    let newest = answers.last().unwrap()["results"].as_array().unwrap();
    assert!(
        newest.iter().any(|h| h["id"].as_u64().unwrap() >= 12),
        "the added images should rank near the query"
    );
    assert!(answers.len() > 20);
}

/// The ids of a search response, and its generation.
fn ids_of(v: &Value) -> Vec<u64> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {v}"))
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn serve_searches_through_the_index_with_filters_and_follows_its_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    let d = db.to_str().unwrap();
    let (code, _, err) = common::cli(&["index", "--db", d]);
    assert_eq!(code, 0, "{err}");
    let ann = start(&db, &["--reload-ms", "100", "--ef", "40"]);
    let exact = start(&db, &["--reload-ms", "100", "--exact"]);
    let (_, st) = get(&format!("{}/api/stats", ann.base));
    assert_eq!(st["index"]["rows"].as_u64(), Some(12), "{st}");
    assert!(st["index_error"].is_null(), "{st}");
    for id in [0, 5, 11] {
        let url = |s: &Server| format!("{}/api/search?id={id}&top=8", s.base);
        let (a, e) = (get(&url(&ann)).1, get(&url(&exact)).1);
        assert_eq!(ids_of(&a), ids_of(&e), "id {id}");
        assert!(!ids_of(&a).contains(&id));
    }
    // A class filter: only that class, the query itself left out.
    let (code, v) = get(&format!(
        "{}/api/search?id=0&top=8&where=class%3Dn01443537",
        ann.base
    ));
    assert_eq!(code, 200, "{v}");
    let got = v["results"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{v}");
    assert!(got.iter().all(|h| h["class_id"] == "n01443537"), "{v}");
    let (code, v) = get(&format!("{}/api/search?id=0&where=size%3Dbig", ann.base));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("class="), "{v}");
    // An add folds its rows into the index; the server reloads and finds them.
    let new = tmp.path().join("new.png");
    png(&new, 77);
    let (code, _, err) = common::cli(&["add", "--db", d, new.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ANN index updated"), "{err}");
    wait_for("the server sees the updated index", || {
        get(&format!("{}/api/stats", ann.base)).1["index"]["rows"].as_u64() == Some(13)
    });
    // The exact server polls on its own clock: wait until it has the new row too.
    wait_for("the exact server sees the add", || count(&exact) == 13);
    let (a, e) = (
        get(&format!("{}/api/search?id=12&top=5", ann.base)).1,
        get(&format!("{}/api/search?id=12&top=5", exact.base)).1,
    );
    assert_eq!(ids_of(&a), ids_of(&e));
    // A damaged index: the server says so and searches exactly.
    let file = db.join(Db::open(&db).unwrap().state.index.unwrap().file);
    std::fs::write(&file, b"damaged").unwrap();
    let s = start(&db, &[]);
    let (_, st) = get(&format!("{}/api/stats", s.base));
    assert!(st["index"].is_null(), "{st}");
    assert!(
        st["index_error"]
            .as_str()
            .unwrap()
            .contains("damaged ANN index"),
        "{st}"
    );
    let (code, v) = get(&format!("{}/api/search?id=3&top=5", s.base));
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        ids_of(&v),
        ids_of(&get(&format!("{}/api/search?id=3&top=5", exact.base)).1)
    );
}

/// An upload goes into the DB's ANN index before it is answered (a delta over the graph file when
/// the DB has one), and a search through the index finds it.
#[test]
fn uploads_update_the_ann_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, db) = fresh(tmp.path());
    let d = db.to_str().unwrap();
    let (code, _, err) = common::cli(&["index", "--db", d]);
    assert_eq!(code, 0, "{err}");
    let img = tmp.path().join("up.png");
    png(&img, 91);
    let bytes = std::fs::read(&img).unwrap();
    let s = start(&db, &["--writable", "--api-key", "k3y"]);
    let (code, v) = post(
        &format!("{}/api/images?name=up.png", s.base),
        &[("Authorization", "Bearer k3y")],
        &bytes,
    );
    assert_eq!(code, 201, "{v}");
    let st = deeprank::store::state::read(&db).unwrap().unwrap();
    assert_eq!(st.rows, 13);
    assert_eq!(
        st.index.as_ref().map(|i| i.rows),
        Some(13),
        "the upload is not in the index: {:?}",
        st.index
    );
    assert!(common::changes::consistent(&db).is_empty());
    let (_, stats) = get(&format!("{}/api/stats", s.base));
    assert_eq!(
        (&stats["index"]["rows"], &stats["index"]["tail_rows"]),
        (&Value::from(13), &Value::from(0)),
        "{stats}"
    );
    let (code, v) = post(
        &format!("{}/api/search?top=1", s.base),
        &[("Content-Type", "image/png")],
        &bytes,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][0]["id"], 12, "{v}");
}
