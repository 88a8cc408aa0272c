//! Changing the collection over HTTP: `POST /api/images` stores an image into the DB (only with
//! `--writable`, and only with `Authorization: Bearer KEY`), `POST /api/reload` reopens the DB
//! now instead of at the next poll.

// Handlers return ready responses as their error type, as axum handlers do.
#![allow(clippy::result_large_err)]

use crate::search::ann::update;
use crate::serve::limits::{Admission, upload_bytes};
use crate::serve::routes::{AppState, client_error, err};
use crate::serve::{Source, store};
use crate::store::uploads::store_upload;
use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[derive(Deserialize)]
pub(super) struct UploadParams {
    /// The file name for a raw-body upload (a multipart form's file name wins).
    name: Option<String>,
}

/// Compares without an early exit, so the time taken does not tell how much of a key matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 403 on a read-only server, 401 without the right `Authorization: Bearer KEY`.
fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = s.opts.api_key.as_deref().filter(|_| s.opts.writable) else {
        return Err(err(
            StatusCode::FORBIDDEN,
            "this server is read-only: start it with --writable --api-key KEY to accept images",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(given.trim().as_bytes(), key.as_bytes()) {
        let mut r = err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send the header Authorization: Bearer KEY",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(r);
    }
    Ok(())
}

/// `POST /api/images[?name=FILE]` with an image (multipart or raw body): stores it, and inserts it
/// into the DB's ANN index when there is one.
/// 201 with its id; 200 with the existing id when the same bytes are already in the DB.
pub(super) async fn upload(
    State(s): State<Arc<AppState>>,
    Query(p): Query<UploadParams>,
    req: Request,
) -> Response {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    if let Err(r) = authorize(&s, req.headers()) {
        return client_error(&s, r);
    }
    if s.inflight.fetch_add(1, Ordering::AcqRel) >= s.opts.admission_limit() {
        s.inflight.fetch_sub(1, Ordering::AcqRel);
        return client_error(&s, err(StatusCode::SERVICE_UNAVAILABLE, "busy: retry"));
    }
    let _admitted = Admission(s.inflight.clone());
    let (bytes, form_name) = match upload_bytes(req, s.opts.max_upload).await {
        Ok(b) => b,
        Err(r) => return client_error(&s, r),
    };
    let name = form_name.or(p.name).unwrap_or_else(|| "upload".into());
    let input = match s.prepare(bytes.clone()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let vector = match s.embed(input).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let live = match &s.source {
        Source::Folder(l) => l.clone(),
        Source::Store(src) => return store::upload(src, bytes, name, vector).await,
    };
    let stored = tokio::task::spawn_blocking(move || {
        let dir = live.dir();
        let stored = store_upload(dir, &bytes, &name, vector)?;
        if !stored.duplicate {
            // Into the DB's ANN index too, when it has one (a delta over its graph). The row is
            // committed either way: should this fail, searches scan it exactly.
            if let Err(e) = update::refresh(dir, None) {
                eprintln!(
                    "warning: upload {} is stored, but the ANN index was not updated: {e:#}. Rows past the index are searched exactly; rebuild it with `deeprank index --db {}`",
                    stored.id,
                    dir.display()
                );
            }
        }
        live.reload()?;
        anyhow::Ok(stored)
    })
    .await;
    match stored {
        Ok(Ok(x)) => {
            let code = if x.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = serde_json::json!({
                "id": x.id,
                "duplicate": x.duplicate,
                "image_url": format!("/api/images/{}", x.id),
                "generation": x.generation,
                "count": x.live,
            });
            (code, Json(body)).into_response()
        }
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the image: {e:#}"),
        ),
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "storing failed"),
    }
}

/// `POST /api/reload`: reopens the DB if it changed; answers its generation and count.
pub(super) async fn reload(State(s): State<Arc<AppState>>) -> Response {
    let live = match &s.source {
        Source::Folder(l) => l.clone(),
        Source::Store(src) => return store::reload(src).await,
    };
    let l = live.clone();
    match tokio::task::spawn_blocking(move || l.reload()).await {
        Ok(Ok(changed)) => {
            let v = live.get();
            Json(serde_json::json!({
                "reloaded": changed,
                "generation": v.db.state.generation,
                "count": v.db.len(),
            }))
            .into_response()
        }
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot reload the DB: {e:#}"),
        ),
        Err(_) => err(StatusCode::INTERNAL_SERVER_ERROR, "reload failed"),
    }
}
