//! `deeprank serve`: the admission bound (at most --queue + --max-batch uploads in flight, the
//! next one 503), query-string errors as JSON, and the runtime sized by --threads.

mod common;

use common::server::{self, Server, agent};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A DB of the bundled sample at 64 px.
fn db(dir: &std::path::Path) -> PathBuf {
    common::weights();
    let db = dir.join("db");
    let (code, _, err) = common::cli(&[
        "embed",
        "--data",
        common::sample().to_str().unwrap(),
        "--out",
        db.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert_eq!(code, 0, "{err}");
    db
}

fn start(db: &std::path::Path, threads: &str, extra: &[&str]) -> Server {
    server::start(db, threads, extra)
}

/// (status, JSON body or Null, Retry-After).
fn request(method: &str, url: &str, body: Option<&[u8]>) -> (u16, Value, Option<String>) {
    let a = agent();
    let mut r = match (method, body) {
        ("GET", _) => a.get(url).call().unwrap(),
        ("DELETE", _) => a.delete(url).call().unwrap(),
        (_, b) => a
            .post(url)
            .header("Content-Type", "image/jpeg")
            .send(b.unwrap_or_default())
            .unwrap(),
    };
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let v = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (r.status().as_u16(), v, retry)
}

fn stats(base: &str) -> Value {
    request("GET", &format!("{base}/api/stats"), None).1
}

/// Waits until the server counts `n` uploads in flight.
fn wait_in_flight(base: &str, n: u64) {
    let t0 = Instant::now();
    loop {
        let v = stats(base);
        if v["in_flight"].as_u64() == Some(n) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "in flight never reached {n}: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sample_jpeg() -> Vec<u8> {
    std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap()
}

/// An upload whose head and first bytes are sent, the rest held back: admitted, not finished.
fn slow_upload(base: &str, jpg: &[u8]) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        tcp,
        "POST /api/search?top=3 HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        jpg.len()
    )
    .unwrap();
    tcp.write_all(&jpg[..100]).unwrap();
    tcp.flush().unwrap();
    tcp
}

#[test]
fn admission_allows_queue_plus_max_batch_uploads_in_flight_then_503() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path());
    let s = start(&db, "2", &["--queue", "1", "--max-batch", "1"]);
    let url = format!("{}/api/search?top=3", s.base);
    let jpg = sample_jpeg();
    assert_eq!(stats(&s.base)["admission_limit"], 2);
    // Two uploads in flight (1 queued + a batch of 1): the limit.
    let mut first = slow_upload(&s.base, &jpg);
    let second = slow_upload(&s.base, &jpg);
    wait_in_flight(&s.base, 2);
    // The third is turned away at once, before its body is read.
    let (code, v, retry) = request("POST", &url, Some(&jpg));
    assert_eq!(code, 503, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    assert_eq!(stats(&s.base)["rejected_busy"], 1);
    // The first upload completes and is answered.
    first.write_all(&jpg[100..]).unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"results\""), "{answer}");
    // One slot is free again: the next upload is served.
    wait_in_flight(&s.base, 1);
    let (code, v, _) = request("POST", &url, Some(&jpg));
    assert_eq!(code, 200, "{v}");
    // A client that gives up frees its slot.
    drop(second);
    wait_in_flight(&s.base, 0);
    let (code, _, _) = request("POST", &url, Some(&jpg));
    assert_eq!(code, 200);
}

#[test]
fn query_string_errors_are_json_and_threads_size_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path());
    let s = start(&db, "3", &[]);
    assert_eq!(stats(&s.base)["runtime_threads"], 3, "--threads 3");
    let jpg = sample_jpeg();
    for q in [
        "top=-1",
        "top=abc",
        "top=0",
        "top=101",
        "top=1.5",
        "top=5&top=6",
    ] {
        let (code, v, _) = request("POST", &format!("{}/api/search?{q}", s.base), Some(&jpg));
        assert_eq!(code, 400, "POST ?{q}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("top"),
            "POST ?{q}: {v}"
        );
        let (code, v, _) = request("GET", &format!("{}/api/search?id=1&{q}", s.base), None);
        assert_eq!(code, 400, "GET ?{q}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("top"),
            "GET ?{q}: {v}"
        );
    }
    for q in ["id=x", "id=-1", "id=300"] {
        let (code, v, _) = request("GET", &format!("{}/api/search?{q}", s.base), None);
        assert_eq!(code, 404, "?{q}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("no image"),
            "?{q}: {v}"
        );
    }
    let (code, v, _) = request("GET", &format!("{}/api/search?id=1&id=2", s.base), None);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("query string"), "{v}");
    let (code, v, _) = request("DELETE", &format!("{}/api/search", s.base), None);
    assert_eq!(code, 405, "{v}");
    assert!(v["error"].is_string(), "{v}");
    // Good requests still work.
    let (code, v, _) = request("POST", &format!("{}/api/search?top=4", s.base), Some(&jpg));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 4);
}
