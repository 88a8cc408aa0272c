//! Serving a PostgreSQL store (`serve --db postgres://…`): searches, images and uploads go to the
//! database through a few pooled connections. While the server (or a shard behind the
//! coordinator) cannot be reached, the API answers 503 with a JSON error naming it; the next
//! request opens a new connection, so the service comes back by itself when the database does.
//! An upload is answered only after its row's transaction committed.

// Handlers return ready responses as their error type, as axum handlers do.
#![allow(clippy::result_large_err)]

use crate::search::pg::{rank_partial, result_rows};
use crate::serve::routes::{AppState, SearchParams, err, hits};
use crate::store::pg::embed::{PgStored, store_upload};
use crate::store::pg::{Filter, Mode, PgStore, Shard, StoreMeta, redact, unreachable};
use anyhow::Result;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How a store is served (`serve --db postgres://…`).
#[derive(Clone, Debug)]
pub struct StoreServeOptions {
    /// Exact or pgvector's HNSW (`--exact`, `--ef`).
    pub mode: Mode,
    /// A sharded store answers without the shards it cannot reach, marked partial.
    pub allow_partial: bool,
    /// Where uploaded images are kept (needed with `--writable`).
    pub uploads: Option<PathBuf>,
}

/// Idle connections kept at most (more requests at once open more, closed after use).
const POOL: usize = 16;

/// A store being served: its identity and a pool of connections.
pub(super) struct StoreSource {
    url: String,
    meta: StoreMeta,
    pub(super) opts: StoreServeOptions,
    idle: Mutex<Vec<PgStore>>,
    /// Classes of the labelled rows (read at start and on `POST /api/reload`).
    classes: Mutex<usize>,
}

impl StoreSource {
    pub(super) fn new(mut store: PgStore, opts: StoreServeOptions) -> Result<StoreSource> {
        let classes = store.classes_partial(opts.allow_partial)?.len();
        Ok(StoreSource {
            url: store.url().url.clone(),
            meta: store.meta().clone(),
            opts,
            idle: Mutex::new(vec![store]),
            classes: Mutex::new(classes),
        })
    }

    fn open(&self) -> Result<PgStore> {
        PgStore::open(&self.url, Some(&self.meta))
    }

    /// Runs `f` on a connection: an idle one, or a new one. When a pooled connection turns out to
    /// be dead (the server restarted since), `f` runs once more on a new connection.
    fn with<T>(&self, f: impl Fn(&mut PgStore) -> Result<T>) -> Result<T> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let reused = pooled.is_some();
        let mut st = match pooled {
            Some(s) => s,
            None => self.open()?,
        };
        let mut res = f(&mut st);
        let dead_conn = |r: &Result<T>| {
            r.as_ref()
                .err()
                .and_then(unreachable)
                .is_some_and(|u| u.shard.is_none())
        };
        if reused && dead_conn(&res) {
            st = self.open()?;
            res = f(&mut st);
        }
        if !st.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < POOL {
                idle.push(st);
            }
        }
        res
    }
}

/// 503 naming the server or shard when the database cannot be reached (with `Retry-After`),
/// else 500.
fn db_error(e: &anyhow::Error) -> Response {
    match unreachable(e) {
        Some(u) => {
            let body = serde_json::json!({
                "error": format!("the database is unreachable, retry later: {}", u.message),
                "unreachable": u.server,
                "shard": u.shard,
            });
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        None => err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Runs a database call off the async threads; its error as a response.
async fn call<T: Send + 'static>(
    src: &Arc<StoreSource>,
    f: impl Fn(&mut PgStore) -> Result<T> + Send + 'static,
) -> Result<T, Response> {
    let src = src.clone();
    match tokio::task::spawn_blocking(move || src.with(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(db_error(&e)),
        Err(_) => Err(err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the database call failed",
        )),
    }
}

/// `where=class=…|path=…` as SQL filters.
fn filter(p: &SearchParams) -> Result<Filter, Response> {
    let mut f = Filter::default();
    if let Some(w) = p.wheres.as_deref() {
        match w.split_once('=') {
            Some(("class", c)) if !c.is_empty() => f.class = Some(c.to_string()),
            Some(("path", x)) if !x.is_empty() => f.path_prefix = Some(x.to_string()),
            _ => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    format!("where={w:?}: expected class=CLASS_ID or path=PREFIX"),
                ));
            }
        }
    }
    Ok(f)
}

/// The shards left out of a partial answer, as JSON.
fn missing_json(missing: &[Shard]) -> serde_json::Value {
    missing
        .iter()
        .map(|s| serde_json::json!({"shard": s.partition, "server": redact(&s.url)}))
        .collect()
}

/// What a search answers; `partial` and `missing_shards` say which shards it lacks.
fn search_answer(
    t0: Instant,
    query: serde_json::Value,
    rows: Vec<crate::search::query::ResultRow>,
    missing: &[Shard],
) -> Response {
    Json(serde_json::json!({
        "query_ms": t0.elapsed().as_secs_f64() * 1e3,
        "generation": null,
        "query": query,
        "results": hits(rows),
        "partial": !missing.is_empty(),
        "missing_shards": missing_json(missing),
    }))
    .into_response()
}

/// `GET /api/stats` of a store.
pub(super) async fn stats(s: &AppState, src: &Arc<StoreSource>) -> Response {
    let partial = src.opts.allow_partial;
    let count = match call(src, move |st| st.count_partial(partial)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let classes = *src.classes.lock().unwrap_or_else(|e| e.into_inner());
    let mut j = s.counters_json();
    let m = &src.meta;
    for (k, v) in [
        ("count", serde_json::json!(count.0)),
        ("generation", serde_json::Value::Null),
        ("dim", serde_json::json!(m.dim)),
        ("normalized", serde_json::json!(m.normalized)),
        ("classes", serde_json::json!(classes)),
        ("labelled", serde_json::json!(classes > 0)),
        ("store", serde_json::json!(redact(&src.url))),
        ("partial", serde_json::json!(!count.1.is_empty())),
        ("missing_shards", missing_json(&count.1)),
    ] {
        j.insert(k.to_string(), v);
    }
    Json(serde_json::Value::Object(j)).into_response()
}

/// `GET /api/images/{id}` of a store: the file its row names.
pub(super) async fn image(src: &Arc<StoreSource>, id: &str) -> Response {
    let Ok(n) = id.parse::<i64>() else {
        return err(StatusCode::NOT_FOUND, format!("no image with id {id}"));
    };
    match call(src, move |st| st.get(n)).await {
        Ok(Some(row)) => {
            crate::serve::routes::image_file(&crate::store::db::unescape_path(&row.path), id).await
        }
        Ok(None) => err(StatusCode::NOT_FOUND, format!("no image with id {id}")),
        Err(r) => r,
    }
}

/// `GET /api/search?id=K` of a store: more like row K (itself left out).
pub(super) async fn search_by_id(
    src: &Arc<StoreSource>,
    p: &SearchParams,
    top: usize,
    id_text: &str,
) -> Response {
    let f = match filter(p) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let t0 = Instant::now();
    let random = id_text == "random";
    let id = match (random, id_text.parse::<i64>()) {
        (true, _) => None,
        (false, Ok(i)) => Some(i),
        (false, Err(_)) => {
            return err(StatusCode::NOT_FOUND, format!("no image with id {id_text}"));
        }
    };
    let (mode, partial) = (src.opts.mode, src.opts.allow_partial);
    let found = call(src, move |st| {
        let id = match id {
            Some(i) => i,
            None => match st.id_near(random_id())? {
                Some(i) => i,
                None => return Ok(None),
            },
        };
        let Some(row) = st.get(id)? else {
            return Ok(None);
        };
        let (mut ranked, missing) = rank_partial(st, &row.embedding, top + 1, mode, &f, partial)?;
        ranked.retain(|h| h.id != id);
        ranked.truncate(top);
        Ok(Some((row, ranked, missing)))
    })
    .await;
    match found {
        Ok(Some((row, ranked, missing))) => {
            let class = (!row.class.is_empty()).then(|| row.class.clone());
            let query = serde_json::json!({
                "id": row.id,
                "class_id": class,
                "class_name": class.as_ref().map(|_| row.class_name.clone()),
                "image_url": format!("/api/images/{}", row.id),
            });
            search_answer(t0, query, result_rows(ranked, class.as_deref()), &missing)
        }
        Ok(None) => err(StatusCode::NOT_FOUND, format!("no image with id {id_text}")),
        Err(r) => r,
    }
}

fn random_id() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = crate::store::manifest::sha256(&nanos.to_le_bytes());
    crate::store::pg::id_from_hash(&h)
}

/// `POST /api/search` of a store, with the query's vector already embedded.
pub(super) async fn search_vector(
    src: &Arc<StoreSource>,
    p: &SearchParams,
    top: usize,
    vector: Vec<f32>,
    t0: Instant,
) -> Response {
    let f = match filter(p) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (mode, partial) = (src.opts.mode, src.opts.allow_partial);
    match call(src, move |st| {
        rank_partial(st, &vector, top, mode, &f, partial)
    })
    .await
    {
        Ok((ranked, missing)) => {
            let query = serde_json::json!({"id": null, "class_id": null, "class_name": null, "image_url": null});
            search_answer(t0, query, result_rows(ranked, None), &missing)
        }
        Err(r) => r,
    }
}

/// `POST /api/images` into a store: the file kept under `--uploads`, the row committed, then
/// 201 with its id (200 when the same bytes are stored already).
pub(super) async fn upload(
    src: &Arc<StoreSource>,
    bytes: axum::body::Bytes,
    name: String,
    vector: Vec<f32>,
) -> Response {
    let Some(folder) = src.opts.uploads.clone() else {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "this server has no folder for uploads (serve --uploads DIR)",
        );
    };
    let stored = call(src, move |st| {
        store_upload(st, &folder, &bytes, &name, &vector)
    })
    .await;
    match stored {
        Ok(PgStored { id, duplicate, .. }) => {
            let code = if duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = serde_json::json!({
                "id": id,
                "duplicate": duplicate,
                "image_url": format!("/api/images/{id}"),
                "generation": null,
            });
            (code, Json(body)).into_response()
        }
        Err(r) => r,
    }
}

/// `POST /api/reload` of a store: nothing to reopen (every request reads the database); the
/// class count is read again.
pub(super) async fn reload(src: &Arc<StoreSource>) -> Response {
    let partial = src.opts.allow_partial;
    match call(src, move |st| {
        Ok((
            st.classes_partial(partial)?.len(),
            st.count_partial(partial)?.0,
        ))
    })
    .await
    {
        Ok((classes, count)) => {
            *src.classes.lock().unwrap_or_else(|e| e.into_inner()) = classes;
            Json(serde_json::json!({"reloaded": false, "generation": null, "count": count}))
                .into_response()
        }
        Err(r) => r,
    }
}
