//! `deeprank serve`: a real server on a loopback port, a real HTTP client, every endpoint and error
//! case; and the page in headless Chromium (WebDriver).

mod common;

use common::server::{self, Server, agent};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// A DB of the bundled sample at 128 px (built once per test binary).
fn db() -> PathBuf {
    static DB: OnceLock<PathBuf> = OnceLock::new();
    DB.get_or_init(|| {
        common::weights();
        let dir = std::env::temp_dir().join(format!("deeprank-serve-test-{}", std::process::id()));
        let db = dir.join("db");
        let (code, _, err) = common::cli(&[
            "embed",
            "--data",
            common::sample().to_str().unwrap(),
            "--out",
            db.to_str().unwrap(),
            "--size",
            "128",
        ]);
        assert_eq!(code, 0, "{err}");
        db
    })
    .clone()
}

fn start(extra: &[&str]) -> Server {
    server::start(&db(), "2", extra)
}

/// A server with default settings (one per test: a process outliving the tests would hold their
/// output pipe open).
fn shared() -> Server {
    start(&[])
}

fn get(url: &str) -> (u16, Vec<u8>, Option<String>) {
    let mut r = agent().get(url).call().unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (r.status().as_u16(), r.body_mut().read_to_vec().unwrap(), ct)
}

fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, Value, Option<String>) {
    let mut r = agent()
        .post(url)
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let v = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
    (r.status().as_u16(), v, retry)
}

fn multipart(field: &str, file: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let b = "deeprank-test-boundary";
    let mut body = format!("--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

/// Sends only the head of a POST declaring `len` body bytes; returns the status the server answers.
fn status_for_head(base: &str, content_type: &str, len: usize) -> u16 {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(tcp, "POST /api/search HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {line:?}"))
}

/// POSTs `head` then `len` zero bytes with `Transfer-Encoding: chunked` (no length up front),
/// reading the answer on another thread while sending, and stops sending when the server has
/// answered or closed. Returns the status and the body.
fn answer_to_chunked(base: &str, content_type: &str, head: &[u8], len: usize) -> (u16, String) {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut rx = tcp.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let want = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + want {
                    break;
                }
            }
            match rx.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    write!(tcp, "POST /api/search HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    if !head.is_empty() {
        write!(tcp, "{:x}\r\n", head.len()).unwrap();
        tcp.write_all(head).unwrap();
        tcp.write_all(b"\r\n").unwrap();
    }
    let chunk = vec![0u8; 64 << 10];
    let mut sent = 0;
    while sent < len && !reader.is_finished() {
        let n = chunk.len().min(len - sent);
        let ok = write!(tcp, "{n:x}\r\n").is_ok()
            && tcp.write_all(&chunk[..n]).is_ok()
            && tcp.write_all(b"\r\n").is_ok();
        if !ok {
            break;
        }
        sent += n;
    }
    if sent == len {
        let _ = tcp.write_all(b"0\r\n\r\n");
    }
    let got = reader.join().unwrap();
    let text = String::from_utf8_lossy(&got).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no answer after {sent} of {len} bytes: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (code, body)
}

fn sample_jpeg() -> Vec<u8> {
    std::fs::read(common::sample().join("val/images/val_68.JPEG")).unwrap()
}

#[test]
fn health_stats_and_images() {
    let s = &shared();
    let (code, body, _) = get(&format!("{}/healthz", s.base));
    assert_eq!((code, body.as_slice()), (200, &b"ok"[..]));
    let (code, body, _) = get(&format!("{}/api/stats", s.base));
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["count"], 300);
    assert_eq!(v["dim"], 1280);
    assert_eq!(v["size"], 128);
    assert_eq!(v["classes"], 10);
    let (code, body, ct) = get(&format!("{}/api/images/0", s.base));
    assert_eq!(code, 200);
    assert_eq!(ct.as_deref(), Some("image/jpeg"));
    assert!(image::load_from_memory(&body).is_ok());
    for bad in ["300", "-1", "abc", "..%2F..%2Fetc%2Fpasswd"] {
        let (code, body, _) = get(&format!("{}/api/images/{bad}", s.base));
        assert_eq!(code, 404, "{bad}");
        assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
    }
    let (code, _, _) = get(&format!("{}/no/such/endpoint", s.base));
    assert_eq!(code, 404);
    let (code, body, ct) = get(&format!("{}/", s.base));
    assert_eq!(code, 200);
    assert!(ct.unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&body).contains("deeprank"));
}

#[test]
fn search_by_upload_multipart_and_raw() {
    let s = &shared();
    let jpg = sample_jpeg();
    let (ct, body) = multipart("image", "val_68.JPEG", &jpg);
    let (code, v, _) = post(&format!("{}/api/search?top=5", s.base), &ct, &body);
    assert_eq!(code, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert!(v["query_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        r[0]["class_id"], "n01443537",
        "a goldfish finds goldfish first: {v}"
    );
    for (i, h) in r.iter().enumerate() {
        assert_eq!(h["rank"], i + 1);
        assert!(h["image_url"].as_str().unwrap().starts_with("/api/images/"));
        assert!(h["class_name"].is_string() && h["id"].is_u64());
    }
    let d: Vec<f64> = r.iter().map(|h| h["distance"].as_f64().unwrap()).collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]));
    // Raw body: same answer.
    let (code, v2, _) = post(&format!("{}/api/search?top=5", s.base), "image/jpeg", &jpg);
    assert_eq!(code, 200);
    assert_eq!(v2["results"], v["results"]);
    // Default top is 10; top beyond the limit and 0 are refused.
    let (_, v3, _) = post(&format!("{}/api/search", s.base), "image/jpeg", &jpg);
    assert_eq!(v3["results"].as_array().unwrap().len(), 10);
    for bad in ["0", "1000", "x"] {
        let (code, _, _) = post(
            &format!("{}/api/search?top={bad}", s.base),
            "image/jpeg",
            &jpg,
        );
        assert_eq!(code, 400, "top={bad}");
    }
}

#[test]
fn search_by_id_marks_same_class_and_leaves_the_query_out() {
    let s = &shared();
    let (code, body, _) = get(&format!("{}/api/search?id=31&top=7", s.base));
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["query"]["id"], 31);
    assert_eq!(v["query"]["class_id"], "n02279972");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 7);
    assert!(r.iter().all(|h| h["id"] != 31));
    assert!(
        r.iter()
            .all(|h| h["same_class"] == (h["class_id"] == "n02279972"))
    );
    for bad in ["300", "abc", "-3"] {
        let (code, _, _) = get(&format!("{}/api/search?id={bad}", s.base));
        assert_eq!(code, 404, "id={bad}");
    }
    let (code, _, _) = get(&format!("{}/api/search", s.base));
    assert_eq!(code, 400);
}

#[test]
fn hostile_uploads_get_clear_json_errors_and_do_not_hurt_others() {
    let s = &shared();
    let url = format!("{}/api/search", s.base);
    let jpg = sample_jpeg();
    // Not an image.
    let (code, v, _) = post(&url, "application/octet-stream", b"hello, not an image");
    assert_eq!(code, 415);
    assert!(
        v["error"].as_str().unwrap().contains("unsupported format"),
        "{v}"
    );
    // Empty.
    let (code, v, _) = post(&url, "image/jpeg", b"");
    assert_eq!(code, 400, "{v}");
    // Truncated JPEG.
    let (code, v, _) = post(&url, "image/jpeg", &jpg[..jpg.len() / 2]);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("truncated"), "{v}");
    // Decompression bomb: a header declaring 60000 x 60000 pixels.
    let mut bomb = jpg.clone();
    let sof = bomb.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    bomb[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
    bomb[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
    let (code, v, _) = post(&url, "image/jpeg", &bomb);
    assert_eq!(code, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("pixels"), "{v}");
    // Over the upload limit (10 MB by default), raw and multipart: refused from the headers,
    // before the body is read.
    assert_eq!(status_for_head(&s.base, "image/jpeg", 11 << 20), 413);
    let (ct, _) = multipart("image", "big.jpg", b"");
    assert_eq!(status_for_head(&s.base, &ct, 11 << 20), 413);
    // A chunked upload (no length up front) over the limit is cut off at the limit: 413 with a
    // JSON error, raw and multipart, answered while the client is still sending.
    let (mp_ct, mp_body) = multipart("image", "big.jpg", b"");
    // The form's head, then zeros as the file's content.
    let mp_head = &mp_body[..mp_body.len() - "\r\n--deeprank-test-boundary--\r\n".len()];
    for (ct, head) in [("image/jpeg", &b""[..]), (mp_ct.as_str(), mp_head)] {
        let (code, body) = answer_to_chunked(&s.base, ct, head, 11 << 20);
        assert_eq!(code, 413, "{ct}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("limit")),
            "{ct}: {body}"
        );
    }
    // Under the limit, the same chunked sending gets an answer about the image (zeros: 415).
    let (code, body) = answer_to_chunked(&s.base, "image/jpeg", b"", 1 << 20);
    assert_eq!(code, 415, "{body}");
    // A form without the image.
    let (ct, body) = multipart("other", "", b"x");
    let (code, v, _) = post(&url, &ct, &body);
    assert_eq!(code, 400, "{v}");
    // The server still answers good requests.
    let (code, _, _) = post(&url, "image/jpeg", &jpg);
    assert_eq!(code, 200);
}

#[test]
fn concurrent_uploads_are_embedded_in_batches() {
    let s = start(&["--batch-wait-ms", "50", "--max-batch", "16"]);
    let jpg = sample_jpeg();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (url, jpg) = (format!("{}/api/search?top=3", s.base), jpg.clone());
            std::thread::spawn(move || post(&url, "image/jpeg", &jpg).0)
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let (_, body, _) = get(&format!("{}/api/stats", s.base));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["embedded"], 16);
    assert!(
        v["largest_batch"].as_u64().unwrap() > 1,
        "no micro-batching: {v}"
    );
    assert!(v["batches"].as_u64().unwrap() < 16, "{v}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = start(&["--queue", "1", "--max-batch", "2", "--batch-wait-ms", "400"]);
    let jpg = sample_jpeg();
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let (url, jpg) = (format!("{}/api/search?top=3", s.base), jpg.clone());
            std::thread::spawn(move || post(&url, "image/jpeg", &jpg))
        })
        .collect();
    let res: Vec<(u16, Value, Option<String>)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<_> = res.iter().filter(|r| r.0 == 503).collect();
    assert!(
        !busy.is_empty(),
        "no 503 with a queue of 1: {:?}",
        res.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        busy.iter()
            .all(|r| r.2.as_deref() == Some("1") && r.1["error"].is_string())
    );
    assert!(res.iter().all(|r| r.0 == 200 || r.0 == 503));
    assert!(res.iter().any(|r| r.0 == 200));
}

/// The page in headless Chromium through chromedriver: upload a mini-val image, N result tiles
/// with distances appear; a screenshot is saved. Needs Debian's chromium and chromium-driver
/// (`.ci/run` installs them). Where they are missing, plain `cargo test` skips this test with a
/// note, and `.ci/run` (which sets DEEPRANK_REQUIRE_BROWSER=1) fails it; DEEPRANK_SKIP_BROWSER=1
/// skips it always.
#[test]
fn browser_upload_shows_result_tiles() {
    if std::env::var_os("DEEPRANK_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED: DEEPRANK_SKIP_BROWSER is set");
        return;
    }
    let found = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(driver) = found else {
        let msg = "chromedriver not found: apt-get install chromium chromium-driver, or run ./.ci/run, which installs them";
        assert!(
            std::env::var_os("DEEPRANK_REQUIRE_BROWSER").is_none(),
            "{msg} (DEEPRANK_REQUIRE_BROWSER is set)"
        );
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let s = &shared();
    let port = 19515 + (std::process::id() % 1000) as u16;
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _cd = Kill(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wd = format!("http://127.0.0.1:{port}");
    let a = agent();
    let mut ready = false;
    for _ in 0..100 {
        if a.get(&format!("{wd}/status")).call().is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ready, "chromedriver did not start");
    let profile = tempfile::tempdir().unwrap();
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", format!("--user-data-dir={}", profile.path().display())]
    }}}});
    let call = |method: &str, path: &str, body: Value| -> Value {
        let url = format!("{wd}{path}");
        let mut r = if method == "GET" {
            a.get(&url).call().unwrap()
        } else if method == "DELETE" {
            a.delete(&url).call().unwrap()
        } else {
            a.post(&url).send_json(&body).unwrap()
        };
        r.body_mut().read_json::<Value>().unwrap()
    };
    let sess = call("POST", "/session", caps);
    let sid = sess["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {sess}"))
        .to_string();
    let se = |p: &str| format!("/session/{sid}{p}");
    call(
        "POST",
        &se("/url"),
        serde_json::json!({"url": format!("{}/", s.base)}),
    );
    let find = |css: &str| -> Vec<String> {
        let v = call(
            "POST",
            &se("/elements"),
            serde_json::json!({"using": "css selector", "value": css}),
        );
        v["value"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_object()?.values().next()?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let input = find("input[type=file]").pop().expect("file input");
    let img = common::sample()
        .join("val/images/val_68.JPEG")
        .canonicalize()
        .unwrap();
    let r = call(
        "POST",
        &se(&format!("/element/{input}/value")),
        serde_json::json!({"text": img.to_str().unwrap()}),
    );
    assert!(
        r["value"].is_null(),
        "upload through the file input failed: {r}"
    );
    let mut tiles = Vec::new();
    for _ in 0..100 {
        tiles = find("#results .tile");
        if tiles.len() == 10 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if tiles.len() != 10 {
        let st = find("#status")
            .pop()
            .map(|e| call("GET", &se(&format!("/element/{e}/text")), Value::Null));
        let info = find("#info")
            .pop()
            .map(|e| call("GET", &se(&format!("/element/{e}/text")), Value::Null));
        let logs = call(
            "POST",
            &se("/se/log"),
            serde_json::json!({"type": "browser"}),
        );
        panic!(
            "expected 10 result tiles, got {}; status {st:?}; info {info:?}; logs {logs}",
            tiles.len()
        );
    }
    let dists = find("#results .tile .distance");
    assert_eq!(dists.len(), 10);
    let text = call(
        "GET",
        &se(&format!("/element/{}/text", dists[0])),
        Value::Null,
    );
    assert!(
        text["value"].as_str().unwrap().starts_with("d = "),
        "{text}"
    );
    // Clicking a result searches with it: the query panel then shows that DB image and names its
    // class, and the results are its neighbours (itself left out), framed by class.
    let attr = |e: &str, name: &str| -> String {
        call(
            "GET",
            &se(&format!("/element/{e}/attribute/{name}")),
            Value::Null,
        )["value"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let query_caption = || {
        find("#query div")
            .pop()
            .map(|e| call("GET", &se(&format!("/element/{e}/text")), Value::Null))
            .and_then(|v| v["value"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let ids =
        |tiles: &[String]| -> Vec<String> { tiles.iter().map(|t| attr(t, "data-id")).collect() };
    let before = ids(&tiles);
    let clicked = before[1].clone();
    let clicked_class = attr(&find("#results .tile img")[1], "alt");
    assert!(
        !clicked.is_empty() && !clicked_class.is_empty(),
        "{before:?}"
    );
    let caption = query_caption();
    assert!(caption.contains("val_68.JPEG"), "{caption}");
    call(
        "POST",
        &se(&format!("/element/{}/click", tiles[1])),
        serde_json::json!({}),
    );
    let want_src = format!("/api/images/{clicked}");
    let (mut src, mut after, mut tiles) = (String::new(), Vec::new(), Vec::new());
    for _ in 0..100 {
        src = find("#query img")
            .pop()
            .map_or(String::new(), |e| attr(&e, "src"));
        tiles = find("#results .tile");
        after = ids(&tiles);
        if src.ends_with(&want_src) && after.len() == 10 && after.iter().all(|i| !i.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        src.ends_with(&want_src),
        "query image {src:?}, want {want_src}"
    );
    let caption = query_caption();
    assert!(
        caption.contains(&format!("query — {clicked_class} ·")),
        "caption {caption:?} should name {clicked_class}"
    );
    assert_eq!(after.len(), 10, "{after:?}");
    assert!(
        !after.contains(&clicked),
        "the query is among its results: {after:?}"
    );
    assert_ne!(after, before, "the results did not change");
    let imgs = find("#results .tile img");
    for (t, im) in tiles.iter().zip(&imgs) {
        let (class, cls) = (attr(t, "class"), attr(im, "alt"));
        let want = if cls == clicked_class {
            "tile same"
        } else {
            "tile diff"
        };
        assert_eq!(class, want, "a {cls} result for a {clicked_class} query");
    }
    let shot = call("GET", &se("/screenshot"), Value::Null);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["value"].as_str().unwrap())
        .unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png");
    std::fs::write(&out, &png).unwrap();
    assert!(image::load_from_memory(&png).unwrap().width() > 500);
    eprintln!("screenshot: {}", out.display());
    call("DELETE", &se(""), Value::Null);
}
