//! `deeprank serve`: the visual search engine over HTTP. A single page at `/`, a JSON API, and
//! micro-batching: uploads that arrive together are embedded in one batch by one worker; a bounded
//! queue answers 503 with `Retry-After` when full instead of growing memory.

// Handlers return ready responses as their error type, as axum handlers do.
#![allow(clippy::result_large_err)]

use crate::db::Db;
use crate::embed::Embedder;
use crate::query::{self, ResultRow};
use crate::transform::{self, ImageError};
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, Multipart, Path as UrlPath, Query, Request, State,
};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const INDEX: &str = include_str!("index.html");

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: String,
    /// Largest accepted upload in bytes (larger: 413).
    pub max_upload: usize,
    /// Largest image (header-declared pixels) accepted (larger: 413, before decoding).
    pub max_pixels: u64,
    /// Embedding jobs waiting at most (more: 503).
    pub queue: usize,
    /// Images embedded together at most.
    pub max_batch: usize,
    /// How long the worker waits for more jobs to fill a batch.
    pub batch_wait: Duration,
    pub max_top: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            max_upload: 10 << 20,
            max_pixels: 40_000_000,
            queue: 64,
            max_batch: 16,
            batch_wait: Duration::from_millis(3),
            max_top: 100,
        }
    }
}

struct Job {
    input: Vec<f32>,
    top: usize,
    reply: oneshot::Sender<Result<Vec<ResultRow>, String>>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    busy: AtomicU64,
    client_errors: AtomicU64,
    batches: AtomicU64,
    embedded: AtomicU64,
    largest_batch: AtomicUsize,
}

/// Counts an admitted upload until its answer is sent.
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct AppState {
    /// Uploads admitted and not yet answered (waiting, decoding or being embedded).
    inflight: Arc<AtomicUsize>,
    db: Arc<Db>,
    jobs: SyncSender<Job>,
    size: u32,
    model: String,
    opts: ServeOptions,
    counters: Arc<Counters>,
    classes: usize,
}

#[derive(Serialize)]
struct Hit {
    rank: usize,
    id: usize,
    class_id: String,
    class_name: String,
    distance: f32,
    image_url: String,
    same_class: Option<bool>,
}

#[derive(Serialize)]
struct QueryInfo {
    id: Option<usize>,
    class_id: Option<String>,
    class_name: Option<String>,
    image_url: Option<String>,
}

#[derive(Serialize)]
struct SearchResponse {
    query_ms: f64,
    query: QueryInfo,
    results: Vec<Hit>,
}

fn hits(rows: Vec<ResultRow>) -> Vec<Hit> {
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| Hit {
            rank: i + 1,
            id: r.id,
            class_id: r.class_id,
            class_name: r.class_name,
            distance: r.distance,
            image_url: format!("/api/images/{}", r.id),
            same_class: r.same_class,
        })
        .collect()
}

/// A JSON error response.
fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

#[derive(Deserialize)]
struct SearchParams {
    top: Option<usize>,
    id: Option<String>,
}

impl AppState {
    fn top(&self, p: &SearchParams) -> Result<usize, Response> {
        match p.top {
            None => Ok(10),
            Some(0) => Err(err(StatusCode::BAD_REQUEST, "top must be at least 1")),
            Some(t) if t > self.opts.max_top => Err(err(
                StatusCode::BAD_REQUEST,
                format!("top must be at most {}", self.opts.max_top),
            )),
            Some(t) => Ok(t),
        }
    }
}

/// The embedding worker: takes a job, waits briefly for more, embeds them as one batch, ranks.
fn worker(
    emb: Embedder,
    db: Arc<Db>,
    rx: Receiver<Job>,
    opts: ServeOptions,
    counters: Arc<Counters>,
) {
    let per = 3 * (emb.size as usize).pow(2);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + opts.batch_wait;
        while jobs.len() < opts.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let n = jobs.len();
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.embedded.fetch_add(n as u64, Ordering::Relaxed);
        counters.largest_batch.fetch_max(n, Ordering::Relaxed);
        let mut buf = Vec::with_capacity(per * n);
        for j in &jobs {
            buf.extend_from_slice(&j.input);
        }
        match emb.embed_batch(buf, n) {
            Ok(vecs) => {
                for (j, v) in jobs.into_iter().zip(vecs.chunks_exact(emb.dim)) {
                    let rows = query::rank(&db, v, &[None], j.top)
                        .pop()
                        .unwrap_or_default();
                    let _ = j.reply.send(Ok(rows));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(format!("embedding failed: {e:#}")));
                }
            }
        }
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn stats(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let c = &s.counters;
    Json(serde_json::json!({
        "count": s.db.len(),
        "dim": s.db.meta.dim,
        "model": s.model,
        "size": s.size,
        "normalized": s.db.meta.normalized,
        "classes": s.classes,
        "requests": c.requests.load(Ordering::Relaxed),
        "rejected_busy": c.busy.load(Ordering::Relaxed),
        "client_errors": c.client_errors.load(Ordering::Relaxed),
        "batches": c.batches.load(Ordering::Relaxed),
        "embedded": c.embedded.load(Ordering::Relaxed),
        "largest_batch": c.largest_batch.load(Ordering::Relaxed),
        "max_upload_bytes": s.opts.max_upload,
    }))
}

async fn image(State(s): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(e) = id.parse::<usize>().ok().and_then(|i| s.db.entries.get(i)) else {
        return err(StatusCode::NOT_FOUND, format!("no image with id {id}"));
    };
    let path = e.path.clone();
    let ct = match path
        .extension()
        .and_then(|x| x.to_str())
        .map(|x| x.to_ascii_lowercase())
    {
        Some(x) if x == "png" => "image/png",
        _ => "image/jpeg",
    };
    match tokio::fs::read(&path).await {
        Ok(b) => (
            [
                (header::CONTENT_TYPE, ct),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            b,
        )
            .into_response(),
        Err(_) => err(
            StatusCode::NOT_FOUND,
            format!("image {id} is missing on the server"),
        ),
    }
}

/// `GET /api/search?id=K`: "more like this" for a DB image (itself left out).
async fn search_by_id(State(s): State<Arc<AppState>>, Query(p): Query<SearchParams>) -> Response {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let top = match s.top(&p) {
        Ok(t) => t,
        Err(r) => return client_error(&s, r),
    };
    let Some(id_text) = p.id.as_deref() else {
        return client_error(
            &s,
            err(StatusCode::BAD_REQUEST, "give ?id=K, or POST an image"),
        );
    };
    let Some(id) = id_text.parse::<usize>().ok().filter(|&i| i < s.db.len()) else {
        return client_error(
            &s,
            err(StatusCode::NOT_FOUND, format!("no image with id {id_text}")),
        );
    };
    let t0 = Instant::now();
    let st = s.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let e = &st.db.entries[id];
        let v = st.db.vectors.row(id).to_vec();
        let mut rows = query::rank(&st.db, &v, &[Some(e.class_id.clone())], top + 1)
            .pop()
            .unwrap_or_default();
        rows.retain(|r| r.id != id);
        rows.truncate(top);
        rows
    })
    .await;
    let Ok(rows) = rows else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "search failed");
    };
    let e = &s.db.entries[id];
    Json(SearchResponse {
        query_ms: t0.elapsed().as_secs_f64() * 1e3,
        query: QueryInfo {
            id: Some(id),
            class_id: Some(e.class_id.clone()),
            class_name: Some(e.class_name.clone()),
            image_url: Some(format!("/api/images/{id}")),
        },
        results: hits(rows),
    })
    .into_response()
}

fn client_error(s: &AppState, r: Response) -> Response {
    s.counters.client_errors.fetch_add(1, Ordering::Relaxed);
    r
}

fn image_error(e: ImageError) -> Response {
    match e {
        ImageError::UnknownFormat => err(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a JPEG or PNG image",
        ),
        ImageError::TooManyPixels { .. } => err(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        ImageError::FileTooLarge(_) => err(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        other => err(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

/// Reads the upload: a multipart form's first file field (any name), or the raw body.
async fn upload_bytes(req: Request, limit: usize) -> Result<Bytes, Response> {
    let too_big = || {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("upload over the {limit}-byte limit"),
        )
    };
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit + 64 * 1024
    {
        return Err(too_big());
    }
    if is_multipart {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")))?;
        loop {
            match mp.next_field().await {
                Ok(Some(f)) => {
                    let is_file = f.file_name().is_some_and(|n| !n.is_empty());
                    if !is_file && f.name() != Some("image") {
                        continue;
                    }
                    return match f.bytes().await {
                        Ok(b) if b.len() > limit => Err(too_big()),
                        Ok(b) => Ok(b),
                        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_big()),
                        Err(e) => Err(err(
                            StatusCode::BAD_REQUEST,
                            format!("cannot read the upload: {e}"),
                        )),
                    };
                }
                Ok(None) => {
                    return Err(err(StatusCode::BAD_REQUEST, "the form has no image field"));
                }
                Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_big()),
                Err(e) => {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        format!("bad multipart body: {e}"),
                    ));
                }
            }
        }
    } else {
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_big())
    }
}

/// `POST /api/search?top=N` with an image.
async fn search_upload(
    State(s): State<Arc<AppState>>,
    Query(p): Query<SearchParams>,
    req: Request,
) -> Response {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let top = match s.top(&p) {
        Ok(t) => t,
        Err(r) => return client_error(&s, r),
    };
    // Admission before any work: a full server answers 503 without reading or decoding.
    let limit = s.opts.queue + s.opts.max_batch;
    if s.inflight.fetch_add(1, Ordering::AcqRel) >= limit {
        s.inflight.fetch_sub(1, Ordering::AcqRel);
        return busy(&s);
    }
    let _admitted = Admission(s.inflight.clone());
    let bytes = match upload_bytes(req, s.opts.max_upload).await {
        Ok(b) => b,
        Err(r) => return client_error(&s, r),
    };
    if bytes.is_empty() {
        return client_error(
            &s,
            err(
                StatusCode::BAD_REQUEST,
                "empty upload: send a JPEG or PNG image",
            ),
        );
    }
    let (size, max_pixels) = (s.size, s.opts.max_pixels);
    let input = tokio::task::spawn_blocking(move || -> Result<Vec<f32>, ImageError> {
        let img = transform::decode_rgb(&bytes, max_pixels)?;
        let img =
            transform::resize_rgb(&img, size).map_err(|e| ImageError::Decode(e.to_string()))?;
        let mut v = vec![0f32; 3 * (size as usize).pow(2)];
        transform::normalise_chw(&img, &mut v).map_err(|e| ImageError::Decode(e.to_string()))?;
        Ok(v)
    })
    .await;
    let input = match input {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return client_error(&s, image_error(e)),
        Err(_) => return err(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed"),
    };
    let (tx, rx) = oneshot::channel();
    match s.jobs.try_send(Job {
        input,
        top,
        reply: tx,
    }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return busy(&s),
        Err(TrySendError::Disconnected(_)) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the embedding worker stopped",
            );
        }
    }
    match rx.await {
        Ok(Ok(rows)) => Json(SearchResponse {
            query_ms: t0.elapsed().as_secs_f64() * 1e3,
            query: QueryInfo {
                id: None,
                class_id: None,
                class_name: None,
                image_url: None,
            },
            results: hits(rows),
        })
        .into_response(),
        Ok(Err(e)) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the embedding worker stopped",
        ),
    }
}

fn busy(s: &AppState) -> Response {
    s.counters.busy.fetch_add(1, Ordering::Relaxed);
    let mut r = err(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is busy: retry shortly",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn not_found() -> Response {
    err(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The HTTP routes over a DB and an embedder.
fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_upload + 64 * 1024;
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/stats", get(stats))
        .route("/api/images/{id}", get(image))
        .route("/api/search", get(search_by_id).post(search_upload))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Starts the server and runs until Ctrl-C. Prints `listening on http://ADDR` once bound.
pub fn serve(db: Db, emb: Embedder, opts: ServeOptions) -> Result<()> {
    query::check_compatible(&db, &emb)?;
    let db = Arc::new(db);
    let counters = Arc::new(Counters::default());
    // Admission (below) keeps at most queue + max_batch uploads in flight, so the channel never
    // blocks; its capacity matches.
    let (tx, rx) = sync_channel::<Job>(opts.queue.max(1) + opts.max_batch);
    let classes = db
        .entries
        .iter()
        .map(|e| e.class_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let state = Arc::new(AppState {
        inflight: Arc::new(AtomicUsize::new(0)),
        db: db.clone(),
        jobs: tx,
        size: emb.size,
        model: emb.identity.clone(),
        opts: opts.clone(),
        counters: counters.clone(),
        classes,
    });
    {
        let (db, opts, counters) = (db.clone(), opts.clone(), counters.clone());
        std::thread::Builder::new()
            .name("embed-worker".into())
            .spawn(move || worker(emb, db, rx, opts, counters))
            .context("cannot start the embedding worker")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&opts.addr)
            .await
            .with_context(|| format!("cannot listen on {}: is the port in use?", opts.addr))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush().ok();
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("server error")
    })
}
