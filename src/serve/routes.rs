//! The HTTP routes: the page, the JSON search API (by upload or by DB id), DB images, stats.

// Handlers return ready responses as their error type, as axum handlers do.
#![allow(clippy::result_large_err)]

use crate::data::transform::{self, ImageError};
use crate::search::ann::db::Where;
use crate::search::query::ResultRow;
use crate::serve::limits::{Admission, image_error, upload_bytes};
use crate::serve::upload;
use crate::serve::worker::{Counters, Job, Ranked, Reply};
use crate::serve::{INDEX, ServeOptions, Source, store};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Instant;
use tokio::sync::oneshot;

pub(super) struct AppState {
    /// Uploads admitted and not yet answered (waiting, decoding or being embedded).
    pub(super) inflight: Arc<AtomicUsize>,
    /// The DB folder, or the PostgreSQL store, being served.
    pub(super) source: Source,
    pub(super) jobs: SyncSender<Job>,
    pub(super) size: u32,
    pub(super) model: String,
    pub(super) opts: ServeOptions,
    pub(super) counters: Arc<Counters>,
}

#[derive(Serialize)]
pub(super) struct Hit {
    rank: usize,
    id: u64,
    class_id: String,
    class_name: String,
    distance: f32,
    image_url: String,
    same_class: Option<bool>,
}

#[derive(Serialize)]
struct QueryInfo {
    id: Option<u64>,
    class_id: Option<String>,
    class_name: Option<String>,
    image_url: Option<String>,
}

#[derive(Serialize)]
struct SearchResponse {
    query_ms: f64,
    /// The DB commit the results come from.
    generation: u64,
    query: QueryInfo,
    results: Vec<Hit>,
}

pub(super) fn hits(rows: Vec<ResultRow>) -> Vec<Hit> {
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
pub(super) fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// The query string, as text: the handlers parse the numbers and say what is wrong.
#[derive(Deserialize)]
pub(super) struct SearchParams {
    top: Option<String>,
    id: Option<String>,
    /// `class=CLASS_ID` or `path=PREFIX`: only rows matching.
    #[serde(rename = "where")]
    pub(super) wheres: Option<String>,
}

/// The query string, or the JSON error every other refusal uses.
fn params(q: Result<Query<SearchParams>, QueryRejection>) -> Result<SearchParams, Response> {
    q.map(|Query(p)| p).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {}", e.body_text()),
        )
    })
}

/// The `where` condition, parsed (a bad one is a 400 saying what is expected).
fn wheres(p: &SearchParams) -> Result<Vec<Where>, Response> {
    p.wheres
        .as_deref()
        .map(|w| Where::parse(w).map_err(|e| err(StatusCode::BAD_REQUEST, format!("{e:#}"))))
        .transpose()
        .map(|w| w.into_iter().collect())
}

impl AppState {
    fn top(&self, p: &SearchParams) -> Result<usize, Response> {
        let Some(text) = p.top.as_deref() else {
            return Ok(10);
        };
        match text.parse::<usize>() {
            Ok(t) if (1..=self.opts.max_top).contains(&t) => Ok(t),
            _ => Err(err(
                StatusCode::BAD_REQUEST,
                format!(
                    "top must be a whole number from 1 to {} (got {text:?})",
                    self.opts.max_top
                ),
            )),
        }
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX)
}

async fn healthz() -> &'static str {
    "ok"
}

impl AppState {
    /// The fields of `/api/stats` that do not depend on what is served.
    pub(super) fn counters_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let c = &self.counters;
        let v = serde_json::json!({
            "writable": self.opts.writable,
            "model": self.model,
            "size": self.size,
            "requests": c.requests.load(Ordering::Relaxed),
            "rejected_busy": c.busy.load(Ordering::Relaxed),
            "client_errors": c.client_errors.load(Ordering::Relaxed),
            "batches": c.batches.load(Ordering::Relaxed),
            "embedded": c.embedded.load(Ordering::Relaxed),
            "largest_batch": c.largest_batch.load(Ordering::Relaxed),
            "max_upload_bytes": self.opts.max_upload,
            "in_flight": self.inflight.load(Ordering::Relaxed),
            "admission_limit": self.opts.admission_limit(),
            "runtime_threads": tokio::runtime::Handle::current().metrics().num_workers(),
        });
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a JSON object"),
        }
    }
}

async fn stats(State(s): State<Arc<AppState>>) -> Response {
    let live = match &s.source {
        Source::Folder(l) => l,
        Source::Store(src) => return store::stats(&s, src).await,
    };
    let v = live.get();
    let mut j = s.counters_json();
    let own = serde_json::json!({
        "count": v.db.len(),
        "generation": v.db.state.generation,
        "dim": v.db.meta.dim,
        "normalized": v.db.meta.normalized,
        "classes": v.classes,
        "labelled": v.classes > 0,
        "index": v.index.as_ref().map(|ix| serde_json::json!({
            "file": ix.path.file_name().map(|n| n.to_string_lossy().to_string()),
            "rows": ix.rows,
            "tail_rows": v.db.rows() - ix.rows,
        })),
        "index_error": v.index_error,
    });
    if let serde_json::Value::Object(own) = own {
        j.extend(own);
    }
    Json(serde_json::Value::Object(j)).into_response()
}

async fn image(State(s): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    let live = match &s.source {
        Source::Folder(l) => l,
        Source::Store(src) => return store::image(src, &id).await,
    };
    let v = live.get();
    let Some(row) = id.parse::<u64>().ok().and_then(|i| v.db.row_of(i)) else {
        return err(StatusCode::NOT_FOUND, format!("no image with id {id}"));
    };
    let path = v.db.entries[row].path.clone();
    image_file(&path, &id).await
}

/// The image file of row `id`, with its content type (404 when the file is gone).
pub(super) async fn image_file(path: &std::path::Path, id: &str) -> Response {
    let ct = match path
        .extension()
        .and_then(|x| x.to_str())
        .map(|x| x.to_ascii_lowercase())
    {
        Some(x) if x == "png" => "image/png",
        Some(x) if x == "webp" => "image/webp",
        Some(x) if x == "gif" => "image/gif",
        Some(x) if x == "bmp" => "image/bmp",
        Some(x) if x == "tif" || x == "tiff" => "image/tiff",
        _ => "image/jpeg",
    };
    match tokio::fs::read(path).await {
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
async fn search_by_id(
    State(s): State<Arc<AppState>>,
    q: Result<Query<SearchParams>, QueryRejection>,
) -> Response {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let p = match params(q) {
        Ok(p) => p,
        Err(r) => return client_error(&s, r),
    };
    let top = match s.top(&p) {
        Ok(t) => t,
        Err(r) => return client_error(&s, r),
    };
    let wheres = match wheres(&p) {
        Ok(w) => w,
        Err(r) => return client_error(&s, r),
    };
    let Some(id_text) = p.id.as_deref() else {
        return client_error(
            &s,
            err(StatusCode::BAD_REQUEST, "give ?id=K, or POST an image"),
        );
    };
    let live = match &s.source {
        Source::Folder(l) => l,
        Source::Store(src) => return store::search_by_id(src, &p, top, id_text).await,
    };
    let view = live.get();
    let db = &view.db;
    let row = if id_text == "random" {
        // The page's "random" button: any live row.
        let n = db.len();
        let pick = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0))
            % n.max(1);
        db.live_rows().nth(pick)
    } else {
        id_text.parse::<u64>().ok().and_then(|i| db.row_of(i))
    };
    let Some(row) = row else {
        return client_error(
            &s,
            err(StatusCode::NOT_FOUND, format!("no image with id {id_text}")),
        );
    };
    let id = db.ids[row];
    let t0 = Instant::now();
    let v = view.clone();
    let mode = s.opts.search;
    let rows = tokio::task::spawn_blocking(move || {
        let db = &v.db;
        let e = &db.entries[row];
        let q = db.vectors.row(row);
        let class = e.class().map(str::to_string);
        v.rank(mode, &wheres, q, class, top, Some(row))
    })
    .await;
    let Ok(rows) = rows else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "search failed");
    };
    let e = &db.entries[row];
    Json(SearchResponse {
        query_ms: t0.elapsed().as_secs_f64() * 1e3,
        generation: db.state.generation,
        query: QueryInfo {
            id: Some(id),
            class_id: e.class().map(|_| e.class_id.clone()),
            class_name: e.class().map(|_| e.class_name.clone()),
            image_url: Some(format!("/api/images/{id}")),
        },
        results: hits(rows),
    })
    .into_response()
}

pub(super) fn client_error(s: &AppState, r: Response) -> Response {
    s.counters.client_errors.fetch_add(1, Ordering::Relaxed);
    r
}

/// `POST /api/search?top=N` with an image.
async fn search_upload(
    State(s): State<Arc<AppState>>,
    q: Result<Query<SearchParams>, QueryRejection>,
    req: Request,
) -> Response {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let p = match params(q) {
        Ok(p) => p,
        Err(r) => return client_error(&s, r),
    };
    let top = match s.top(&p) {
        Ok(t) => t,
        Err(r) => return client_error(&s, r),
    };
    let wheres = match wheres(&p) {
        Ok(w) => w,
        Err(r) => return client_error(&s, r),
    };
    // Admission before any work: a full server answers 503 without reading or decoding.
    if s.inflight.fetch_add(1, Ordering::AcqRel) >= s.opts.admission_limit() {
        s.inflight.fetch_sub(1, Ordering::AcqRel);
        return busy(&s);
    }
    let _admitted = Admission(s.inflight.clone());
    let (bytes, _) = match upload_bytes(req, s.opts.max_upload).await {
        Ok(b) => b,
        Err(r) => return client_error(&s, r),
    };
    let input = match s.prepare(bytes).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Source::Store(src) = &s.source {
        // The worker embeds; the database ranks (off the worker, which serves other uploads).
        let vector = match s.embed(input).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        return store::search_vector(src, &p, top, vector, t0).await;
    }
    let (tx, rx) = oneshot::channel();
    if let Err(r) = s.submit(Job {
        input,
        reply: Reply::Search { top, wheres, tx },
    }) {
        return r;
    }
    match rx.await {
        Ok(Ok(Ranked { generation, rows })) => Json(SearchResponse {
            query_ms: t0.elapsed().as_secs_f64() * 1e3,
            generation,
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

impl AppState {
    /// Decodes an upload into the network's input (client errors counted and worded).
    pub(super) async fn prepare(&self, bytes: axum::body::Bytes) -> Result<Vec<f32>, Response> {
        if bytes.is_empty() {
            return Err(client_error(
                self,
                err(
                    StatusCode::BAD_REQUEST,
                    format!("empty upload: send a {} image", transform::FORMATS),
                ),
            ));
        }
        let (size, max_pixels) = (self.size, self.opts.max_pixels);
        let input = tokio::task::spawn_blocking(move || -> Result<Vec<f32>, ImageError> {
            let img = transform::decode_rgb(&bytes, max_pixels)?;
            let img =
                transform::resize_rgb(&img, size).map_err(|e| ImageError::Decode(e.to_string()))?;
            let mut v = vec![0f32; 3 * (size as usize).pow(2)];
            transform::normalise_chw(&img, &mut v)
                .map_err(|e| ImageError::Decode(e.to_string()))?;
            Ok(v)
        })
        .await;
        match input {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(client_error(self, image_error(e))),
            Err(_) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed")),
        }
    }

    /// The vector of an upload's decoded input, from the embedding worker.
    pub(super) async fn embed(&self, input: Vec<f32>) -> Result<Vec<f32>, Response> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job {
            input,
            reply: Reply::Vector(tx),
        })?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, e)),
            Err(_) => Err(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the embedding worker stopped",
            )),
        }
    }

    /// Hands a job to the embedding worker (503 when its queue is full).
    pub(super) fn submit(&self, job: Job) -> Result<(), Response> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(busy(self)),
            Err(TrySendError::Disconnected(_)) => Err(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the embedding worker stopped",
            )),
        }
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

async fn method_not_allowed() -> Response {
    err(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// The HTTP routes over a DB and an embedder.
pub(super) fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_upload + 64 * 1024;
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/stats", get(stats))
        .route("/api/images/{id}", get(image))
        .route("/api/search", get(search_by_id).post(search_upload))
        .route("/api/images", post(upload::upload))
        .route("/api/reload", post(upload::reload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
