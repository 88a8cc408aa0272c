//! `serve --db postgres://…` and `--allow-partial` against real PostgreSQL servers
//! (`tests/common/pg.rs`): searches equal the CLI's, 503 naming the server while it is down and
//! 200 again when it is back (same server process), an acknowledged upload kept across kill -9 of
//! the server, and a sharded store answering without a stopped shard only when asked to.

mod common;

use common::changes::png;
use common::pg::Servers;
use common::server::{self, Server, agent};
use common::{class_folders, cli, weights};
use serde_json::Value;
use std::path::{Path, PathBuf};

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

fn ok(args: &[&str]) -> String {
    let (code, out, err) = cli(args);
    assert_eq!(code, 0, "deeprank {args:?} failed:\n{out}\n{err}");
    out
}

/// Images in class folders embedded into `url` (64 px, the test weights).
fn embed(data: &Path, url: &str) {
    let w = weights();
    ok(&[
        "embed",
        "--data",
        data.to_str().unwrap(),
        "--out",
        url,
        "--size",
        "64",
        "--weights",
        w.to_str().unwrap(),
    ]);
}

fn serve(url: &str, extra: &[&str]) -> Server {
    let w = weights();
    let mut args = vec!["--weights", w.to_str().unwrap()];
    args.extend_from_slice(extra);
    server::start(Path::new(url), "2", &args)
}

/// (id, path) of each result of `query --json` for one image.
fn cli_ids(url: &str, image: &Path, top: usize, extra: &[&str]) -> Vec<(u64, String)> {
    let (w, top) = (weights(), top.to_string());
    let mut args = vec![
        "query",
        "--db",
        url,
        "--image",
        image.to_str().unwrap(),
        "--top",
        &top,
        "--json",
        "--weights",
        w.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    v[0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {v}"))
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn serve_a_store_503_while_it_is_down_and_acknowledged_uploads_survive_kill() {
    let Some(pg) = Servers::start(1) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files = class_folders(&data, 3, 6);
    let url = pg.url(0, "photos");
    embed(&data, &url);
    let uploads = tmp.path().join("uploads");
    let up = uploads.to_str().unwrap();

    // --writable needs a folder for the uploaded files.
    let (code, _, err) = cli(&[
        "serve",
        "--db",
        &url,
        "--writable",
        "--api-key",
        "k",
        "--addr",
        "127.0.0.1:0",
    ]);
    assert!(code != 0 && err.contains("--uploads DIR"), "{err}");

    let mut s = serve(&url, &["--writable", "--api-key", "k", "--uploads", up]);
    let (code, st) = get(&format!("{}/api/stats", s.base));
    assert_eq!(
        (code, st["count"].as_u64()),
        (200, Some(files.len() as u64))
    );
    assert_eq!(st["classes"], 3, "{st}");

    // Search by upload answers what `query` answers; by id, the row itself left out.
    let q = &files[2];
    let want = cli_ids(&url, q, 5, &[]);
    let (code, v) = post(
        &format!("{}/api/search?top=5", s.base),
        &[],
        &std::fs::read(q).unwrap(),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v), want.iter().map(|x| x.0).collect::<Vec<_>>());
    assert_eq!(v["partial"], false);
    let me = want[0].0;
    let (code, v) = get(&format!("{}/api/search?id={me}&top=4", s.base));
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v), want[1..].iter().map(|x| x.0).collect::<Vec<_>>());
    let (code, _) = get(&format!("{}/api/images/{me}", s.base));
    assert_eq!(code, 200);
    let (code, v) = get(&format!("{}/api/search?id=random&top=2", s.base));
    assert_eq!((code, ids(&v).len()), (200, 2), "{v}");

    // The database restarted while the server was idle: its pooled connections are dead, the
    // next request is answered on a new one.
    pg.stop_one(0);
    pg.restart_one(0);
    let (code, v) = get(&format!("{}/api/search?id={me}&top=4", s.base));
    assert_eq!(code, 200, "{v}");

    // The database stopped: 503 naming it, for searches, images and stats alike.
    pg.stop_one(0);
    let port = pg.ports[0].to_string();
    for (code, v) in [
        get(&format!("{}/api/search?id={me}", s.base)),
        post(
            &format!("{}/api/search", s.base),
            &[],
            &std::fs::read(q).unwrap(),
        ),
        get(&format!("{}/api/stats", s.base)),
    ] {
        assert_eq!(code, 503, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("unreachable") && e.contains(&port), "{e}");
        assert!(v["unreachable"].as_str().unwrap().contains(&port), "{v}");
    }
    // Back: the same server process answers again.
    pg.restart_one(0);
    let (code, v) = get(&format!("{}/api/search?id={me}&top=4", s.base));
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v), want[1..].iter().map(|x| x.0).collect::<Vec<_>>());

    // An upload is acknowledged once committed: it is there after kill -9 of the server.
    let new = tmp.path().join("new.png");
    png(&new, 7);
    let bytes = std::fs::read(&new).unwrap();
    let auth = [("Authorization", "Bearer k")];
    let (code, v) = post(&format!("{}/api/images?name=new.png", s.base), &[], &bytes);
    assert_eq!(code, 401, "{v}");
    let (code, v) = post(
        &format!("{}/api/images?name=new.png", s.base),
        &auth,
        &bytes,
    );
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let top = cli_ids(&url, &new, 1, &["--exact"]);
    assert_eq!(top[0].0, id, "{top:?}");
    assert!(
        PathBuf::from(&top[0].1).starts_with(std::path::absolute(&uploads).unwrap()),
        "{top:?}"
    );
    assert!(Path::new(&top[0].1).is_file());
    // The same bytes again: the stored row, nothing new.
    let s = serve(&url, &["--writable", "--api-key", "k", "--uploads", up]);
    let (code, v) = post(&format!("{}/api/images", s.base), &auth, &bytes);
    assert_eq!(
        (code, v["id"].as_u64(), v["duplicate"].as_bool()),
        (200, Some(id), Some(true))
    );
    let (_, st) = get(&format!("{}/api/stats", s.base));
    assert_eq!(st["count"].as_u64(), Some(files.len() as u64 + 1));
}

#[test]
fn sharded_store_down_shard_is_an_error_unless_partial_is_allowed() {
    let Some(pg) = Servers::start(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files = class_folders(&data, 3, 6);
    let coord = pg.url(0, "photos");
    let shards = format!("{},{}", pg.url(1, "photos"), pg.url(2, "photos"));
    let w = weights();
    ok(&[
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
    ]);
    embed(&data, &coord);
    let q = &files[0];
    let whole = cli_ids(&coord, q, files.len(), &["--allow-partial"]);
    assert_eq!(whole.len(), files.len());
    let strict = serve(&coord, &[]);
    let lenient = serve(&coord, &["--allow-partial"]);
    let body = std::fs::read(q).unwrap();
    let (code, v) = post(&format!("{}/api/search?top=50", lenient.base), &[], &body);
    assert_eq!((code, v["partial"].as_bool()), (200, Some(false)));
    assert_eq!(ids(&v), whole.iter().map(|x| x.0).collect::<Vec<_>>());

    // Shard 2 (partition photos_p1) stopped.
    pg.stop_one(2);
    let port = pg.ports[2].to_string();
    let (code, v) = post(&format!("{}/api/search", strict.base), &[], &body);
    assert_eq!(code, 503, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("shard photos_p1") && e.contains(&port), "{e}");
    assert_eq!(v["shard"], "photos_p1");

    // Allowed: the rows of the shard that answers, marked partial, the missing shard named.
    let (code, v) = post(&format!("{}/api/search?top=50", lenient.base), &[], &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["partial"], true, "{v}");
    let missing = v["missing_shards"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{v}");
    assert_eq!(missing[0]["shard"], "photos_p1");
    assert!(missing[0]["server"].as_str().unwrap().contains(&port));
    let got = ids(&v);
    assert!(!got.is_empty() && got.len() < files.len(), "{v}");
    // Exactly the reachable shard's rows, in the whole answer's order.
    let on_shard: Vec<u64> = whole
        .iter()
        .map(|x| x.0)
        .filter(|i| got.contains(i))
        .collect();
    assert_eq!(got, on_shard);
    let (code, st) = get(&format!("{}/api/stats", lenient.base));
    assert_eq!((code, st["partial"].as_bool()), (200, Some(true)), "{st}");
    assert_eq!(st["count"].as_u64(), Some(got.len() as u64));

    // The CLI: an error naming the shard, or with --allow-partial the same rows and a warning.
    let (code, _, err) = cli(&[
        "query",
        "--db",
        &coord,
        "--image",
        q.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
    ]);
    assert!(code != 0 && err.contains("shard photos_p1"), "{err}");
    let (code, out, err) = cli(&[
        "query",
        "--db",
        &coord,
        "--image",
        q.to_str().unwrap(),
        "--top",
        "50",
        "--json",
        "--allow-partial",
        "--weights",
        w.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: partial results: shard photos_p1") && err.contains(&port),
        "{err}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&v[0]), got);

    // Back: whole answers again from both servers, without restarting them.
    pg.restart_one(2);
    let (code, v) = post(&format!("{}/api/search?top=50", strict.base), &[], &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v), whole.iter().map(|x| x.0).collect::<Vec<_>>());
    let (code, v) = post(&format!("{}/api/search?top=50", lenient.base), &[], &body);
    assert_eq!((code, v["partial"].as_bool()), (200, Some(false)), "{v}");
}
