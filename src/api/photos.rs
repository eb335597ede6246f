//! Photos in REST bodies: `POST /v1/uploads` (a raw image body, or multipart/form-data with one
//! file part), and a photo inline with `POST /v1/generate` (a multipart file part `image` beside
//! the request's fields, or JSON `initial_image` as base64 or a `data:image/…;base64,` URL).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::errors::ApiError;
use super::{AppState, Inline};
use crate::core::Violation;
use crate::intake::extension_for;
use crate::storage::new_upload_key;

/// Request fields a multipart form carries as text; every other field is read as JSON (numbers,
/// lists such as `loras`).
const TEXT_FIELDS: [&str; 7] = [
    "initial_image_url",
    "mask_image_url",
    "prompt",
    "negative_prompt",
    "scheduler",
    "webhook_url",
    "task_id",
];

/// Room for a form's boundaries and part headers around an upload's file.
const MULTIPART_OVERHEAD: usize = 64 << 10;

/// The body limit of `POST /v1/generate`: the usual limit, plus room for a photo in base64.
pub fn body_limit_with_photo(state: &AppState) -> usize {
    let photo = state.intake.max_bytes as usize;
    // Base64 takes four bytes for every three, plus a data URL's prefix.
    state.max_body_bytes + photo.div_ceil(3) * 4 + 64
}

/// The body limit of `POST /v1/uploads`: the photo, and room for a multipart form around it.
pub fn upload_body_limit(state: &AppState) -> usize {
    state.intake.max_bytes as usize + MULTIPART_OVERHEAD
}

/// POST /v1/uploads: checks the photo and stores it under `images/uploads/`; 201 with what a
/// generation needs to name it (`url` works as `initial_image_url`).
pub async fn upload(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ApiError> {
    super::rest::authorize(&state, request.headers())?;
    let limit = upload_body_limit(&state);
    let bytes = if is_multipart(request.headers()) {
        let mut form = multipart(request).await?;
        let mut file = None;
        while let Some(field) = form.next_field().await.map_err(|e| multipart_error(e, limit))? {
            if field.file_name().is_none() {
                continue;
            }
            if file.is_some() {
                return Err(invalid("file", "Send one file part, not several."));
            }
            file = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
        }
        file.ok_or_else(|| invalid("file", "The form has no file part; send the photo as one."))?
    } else {
        read_photo_body(request, state.intake.max_bytes as usize).await?
    };
    let photo = state.check_photo("file", bytes).await?;
    state.store_photo(&photo).await?;
    let url = state.services.store.reference(&photo.key).map_err(|e| ApiError::Internal(e.to_string()))?;
    let body = json!({
        "key": photo.key,
        "url": url,
        "content_type": photo.content_type,
        "width": photo.width,
        "height": photo.height,
        "bytes": photo.bytes.len(),
        "sha256": photo.sha256,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A raw upload's body, read chunk by chunk into one buffer sized from its Content-Length, so the
/// photo is held once (not as chunks plus their copy); refused as soon as it passes `limit`.
async fn read_photo_body(request: Request, limit: usize) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut body = request.into_body().into_data_stream();
    let mut buffer = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::Malformed(format!("Cannot read the body: {e}.")))?;
        if buffer.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// How long a presigned upload may be used.
pub const PRESIGNED_UPLOAD_TTL: Duration = Duration::from_secs(15 * 60);

/// What `POST /v1/uploads/presign` reads.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresignRequest {
    content_type: String,
}

/// POST /v1/uploads/presign (S3 only): a PUT the client sends the photo's bytes with, straight to
/// the bucket, under a fresh `images/uploads/` key; 201 with the key, the `url` a generation names
/// it by, and the PUT's URL, headers and expiry. The photo is checked when a generation names it,
/// from a HEAD and its first bytes before the task is queued, and whole at the fetch stage.
pub async fn presign(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ApiError> {
    super::rest::authorize(&state, request.headers())?;
    super::guard::check_json_body(&request, false)?;
    let body = Bytes::from_request(request, &()).await.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(state.max_body_bytes),
        _ => ApiError::Malformed(rejection.body_text()),
    })?;
    let asked: PresignRequest = serde_json::from_slice(&body).map_err(|e| {
        invalid(
            "content_type",
            &format!("Send {{\"content_type\": \"image/jpeg\"}} or another image type ({e})."),
        )
    })?;
    let extension = extension_for(&asked.content_type).ok_or_else(|| {
        invalid(
            "content_type",
            "content_type must be image/jpeg, image/png, image/webp, image/gif, image/bmp or image/tiff.",
        )
    })?;
    let key = new_upload_key(extension);
    let store = state.services.store.as_ref();
    let presigned = store
        .presign_put(&key, &asked.content_type, PRESIGNED_UPLOAD_TTL)
        .await
        .map_err(|e| ApiError::Unavailable(format!("presigning an upload: {e}")))?
        .ok_or_else(|| {
            invalid(
                "content_type",
                "Presigned uploads need the S3 object store (--object-store s3); send the photo to POST /v1/uploads.",
            )
        })?;
    let url = store.reference(&key).map_err(|e| ApiError::Internal(e.to_string()))?;
    let expires_at = chrono::Utc::now() + PRESIGNED_UPLOAD_TTL;
    let headers: Map<String, Value> =
        presigned.headers.into_iter().map(|(name, value)| (name, Value::String(value))).collect();
    let body = json!({
        "key": key,
        "url": url,
        "upload": {
            "method": "PUT",
            "url": presigned.url,
            "headers": headers,
            "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Whether the request's body is multipart/form-data.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// A generation's form: the request's fields as a JSON object, and the `image` file part.
pub async fn generate_form(state: &AppState, request: Request) -> Result<(Value, Inline), ApiError> {
    let limit = body_limit_with_photo(state);
    let mut form = multipart(request).await?;
    let mut fields = Map::new();
    let mut inline = Inline::default();
    while let Some(field) = form.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or_default().to_string();
        let (part, slot) = match name.as_str() {
            "image" => ("image", &mut inline.photo),
            "mask_image" => ("mask_image", &mut inline.mask),
            _ => ("", &mut None),
        };
        if !part.is_empty() {
            if slot.is_some() {
                return Err(invalid(part, &format!("Send one {part} part, not several.")));
            }
            *slot = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
            continue;
        }
        let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
        let value = if TEXT_FIELDS.contains(&name.as_str()) {
            Value::String(text)
        } else {
            serde_json::from_str(&text).map_err(|_| {
                let description = format!("Form field {name} must be a number or JSON, not {text:?}.");
                ApiError::Invalid(vec![Violation { field: "body", description }])
            })?
        };
        if fields.insert(name.clone(), value).is_some() {
            return Err(ApiError::Invalid(vec![Violation {
                field: "body",
                description: format!("Form field {name} is given twice."),
            }]));
        }
    }
    Ok((Value::Object(fields), inline))
}

/// The bytes of JSON `initial_image` or `mask_image` (`field`): plain base64, or a
/// `data:image/…;base64,` URL.
pub fn decode_inline(field: &'static str, text: &str) -> Result<Bytes, ApiError> {
    let message = format!("{field} must be base64, or a data:image/…;base64, URL.");
    let refused = || invalid(field, &message);
    let encoded = match text.strip_prefix("data:") {
        Some(url) => {
            let (media, data) = url.split_once(',').ok_or_else(refused)?;
            let media = media.to_ascii_lowercase();
            if !(media.starts_with("image/") && media.ends_with(";base64")) {
                return Err(refused());
            }
            data
        }
        None => text,
    };
    let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    BASE64.decode(compact).map(Bytes::from).map_err(|_| refused())
}

async fn multipart(request: Request) -> Result<Multipart, ApiError> {
    Multipart::from_request(request, &()).await.map_err(|e| ApiError::Malformed(e.body_text()))
}

fn multipart_error(error: MultipartError, limit: usize) -> ApiError {
    match error.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(limit),
        _ => ApiError::Malformed(format!("Malformed multipart body: {}.", error.body_text())),
    }
}

fn invalid(field: &'static str, description: &str) -> ApiError {
    ApiError::Invalid(vec![Violation { field, description: description.into() }])
}
