//! Photos in REST bodies: `POST /v1/uploads` (a raw image body, or multipart/form-data with one
//! file part), and a photo inline with `POST /v1/generate` (a multipart file part `image` beside
//! the request's fields, or JSON `initial_image` as base64 or a `data:image/…;base64,` URL).

use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::AppState;
use super::errors::ApiError;
use crate::core::Violation;

/// Request fields a multipart form carries as text; every other field is read as JSON (numbers,
/// lists such as `loras`).
const TEXT_FIELDS: [&str; 6] =
    ["initial_image_url", "prompt", "negative_prompt", "scheduler", "webhook_url", "task_id"];

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
        Bytes::from_request(request, &()).await.map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(state.intake.max_bytes as usize),
            _ => ApiError::Malformed(rejection.body_text()),
        })?
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

/// Whether the request's body is multipart/form-data.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// A generation's form: the request's fields as a JSON object, and the `image` file part.
pub async fn generate_form(state: &AppState, request: Request) -> Result<(Value, Option<Bytes>), ApiError> {
    let limit = body_limit_with_photo(state);
    let mut form = multipart(request).await?;
    let mut fields = Map::new();
    let mut image = None;
    while let Some(field) = form.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "image" {
            if image.is_some() {
                return Err(invalid("image", "Send one image part, not several."));
            }
            image = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
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
    Ok((Value::Object(fields), image))
}

/// The bytes of JSON `initial_image`: plain base64, or a `data:image/…;base64,` URL.
pub fn decode_inline(text: &str) -> Result<Bytes, ApiError> {
    let refused = || invalid("initial_image", "initial_image must be base64, or a data:image/…;base64, URL.");
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
