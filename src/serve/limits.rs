//! What the server refuses, and how: admission (at most so many uploads in flight), upload size
//! (before and while reading the body) and image errors mapped to HTTP statuses.

// Handlers return ready responses as their error type, as axum handlers do.
#![allow(clippy::result_large_err)]

use crate::data::transform::ImageError;
use crate::serve::routes::err;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts an admitted upload until its answer is sent.
pub(super) struct Admission(pub(super) Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) fn image_error(e: ImageError) -> Response {
    match e {
        ImageError::Unsupported(_) => err(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()),
        ImageError::TooManyPixels { .. } => err(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        ImageError::FileTooLarge(_) => err(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        other => err(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

/// Reads the upload: a multipart form's first file field (any name), or the raw body; with the
/// form's file name when it has one. Errors are ready JSON answers (400 for a damaged form, 413
/// over `limit`). Public for the hostile-input test.
pub async fn upload_bytes(req: Request, limit: usize) -> Result<(Bytes, Option<String>), Response> {
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
                    let name = f.file_name().map(str::to_string);
                    return match f.bytes().await {
                        Ok(b) if b.len() > limit => Err(too_big()),
                        Ok(b) => Ok((b, name)),
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
            .map(|b| (b, None))
            .map_err(|_| too_big())
    }
}
