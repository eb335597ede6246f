//! The REST bridge: the same operations as gRPC, JSON in and out, in the product spec's shapes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::errors::ApiError;
use super::guard;
use super::health::Probe;
use super::photos;
use super::render::result_json;
use super::{AppState, Inline};
use crate::core::{FailureCode, GenerateInput, Violation};
use crate::tasks::{TaskRecord, TaskStatus};

/// Longest `Prefer: wait=N` honoured, in seconds.
const MAX_WAIT_SECS: u64 = 60;

pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let value = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    state.keys.caller(value).ok_or(ApiError::Unauthenticated)
}

/// A generation request from a JSON body (the photo and mask as URLs, or inline in
/// `initial_image` and `mask_image`) or a multipart form (the request's fields and `image` and
/// `mask_image` file parts).
async fn read_generate(state: &AppState, request: Request) -> Result<(GenerateInput, Inline), ApiError> {
    guard::check_json_body(&request, true)?;
    if photos::is_multipart(request.headers()) {
        let (fields, inline) = photos::generate_form(state, request).await?;
        check_shape(&fields)?;
        let input = serde_json::from_value(fields).map_err(invalid_body)?;
        return Ok((input, inline));
    }
    let limit = photos::body_limit_with_photo(state);
    let body = Bytes::from_request(request, &()).await.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(limit),
        _ => ApiError::Malformed(rejection.body_text()),
    })?;
    // Only an inline image earns a body beyond the usual limit: a larger body that is not a request
    // with `initial_image` or `mask_image` is too large, whatever else is wrong with it.
    let oversized = body.len() > state.max_body_bytes;
    // The common case, an object that parses, is read once; what fails is read again below to say
    // what is wrong in the order the checks promise.
    if !oversized
        && body.trim_ascii_start().starts_with(b"{")
        && let Ok(input) = serde_json::from_slice::<GenerateInput>(&body)
    {
        if blank(input.prompt.as_deref()) {
            return Err(ApiError::EmptyPrompt);
        }
        return inline_photos(input);
    }
    let too_large = || ApiError::TooLarge(state.max_body_bytes);
    let value: Value = serde_json::from_slice(&body).map_err(|e| match oversized {
        true => too_large(),
        false => ApiError::Malformed(format!("Malformed JSON: {e}.")),
    })?;
    let inline = |field: &str| value.get(field).is_some_and(|v| !v.is_null());
    if oversized && !inline("initial_image") && !inline("mask_image") {
        return Err(too_large());
    }
    check_shape(&value)?;
    // From the bytes, not the parsed value: a `Value` keeps only the last of repeated keys, and a
    // proxy that read the first one would have checked a different request.
    inline_photos(serde_json::from_slice(&body).map_err(invalid_body)?)
}

/// Takes the inline photo and mask out of `input`, decoded.
fn inline_photos(mut input: GenerateInput) -> Result<(GenerateInput, Inline), ApiError> {
    let photo =
        input.initial_image.take().map(|text| photos::decode_inline("initial_image", &text)).transpose()?;
    let mask = input.mask_image.take().map(|text| photos::decode_inline("mask_image", &text)).transpose()?;
    Ok((input, Inline { photo, mask }))
}

/// A request must be an object, and a blank prompt is the product spec's 400 whatever else is wrong.
fn check_shape(value: &Value) -> Result<(), ApiError> {
    if !value.is_object() {
        return Err(ApiError::Malformed("The request body must be a JSON object.".into()));
    }
    if blank(value.get("prompt").and_then(Value::as_str)) {
        return Err(ApiError::EmptyPrompt);
    }
    Ok(())
}

/// Whether a prompt was sent with nothing but whitespace in it.
fn blank(prompt: Option<&str>) -> bool {
    prompt.is_some_and(|p| p.trim().is_empty())
}

fn invalid_body(e: serde_json::Error) -> ApiError {
    ApiError::Invalid(vec![Violation { field: "body", description: format!("{e}.") }])
}

fn wait_preference(headers: &HeaderMap) -> Option<u64> {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).find_map(
        |p| {
            let secs = p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok()?;
            Some(secs.min(MAX_WAIT_SECS))
        },
    )
}

/// POST /v1/generate: queue a task; with `Prefer: wait=N`, answer with the result if it is ready in time.
pub async fn generate(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ApiError> {
    let caller = authorize(&state, request.headers())?;
    let wait = wait_preference(request.headers());
    let (input, inline) = read_generate(&state, request).await?;
    let record = state.submit(input, inline, &caller).await?;
    if let Some(secs) = wait {
        let finished = state.wait_final(&record.task_id, Duration::from_secs(secs)).await;
        if let Some(done) = finished {
            let mut response = (final_status(&done), Json(result_json(&done))).into_response();
            response
                .headers_mut()
                .insert("preference-applied", format!("wait={secs}").parse().expect("ascii"));
            return Ok(response);
        }
    }
    let body = json!({"task_id": record.task_id, "status": record.status.as_str()});
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/result/{}", record.task_id))], Json(body))
        .into_response())
}

/// The HTTP status of a finished task answered synchronously.
fn final_status(record: &TaskRecord) -> StatusCode {
    let Some(error) = record.error.as_ref().filter(|_| record.status == TaskStatus::Failed) else {
        return StatusCode::OK;
    };
    match error.code {
        FailureCode::InvalidInput | FailureCode::InvalidImage => StatusCode::UNPROCESSABLE_ENTITY,
        FailureCode::ImageFetchFailed => StatusCode::BAD_GATEWAY,
        FailureCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureCode::Canceled => StatusCode::OK,
        FailureCode::ModelError
        | FailureCode::S3UploadFailed
        | FailureCode::ShoppingFailed
        | FailureCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// GET /v1/result/{task_id}
pub async fn result(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let record = state.get(&task_id).await?;
    let position = super::queue_position(state.queue.as_ref(), &record).await;
    Ok(Json(with_position(result_json(&record), position)))
}

/// The result with `queue_position` while the task is queued.
fn with_position(mut body: Value, position: Option<usize>) -> Value {
    if let Some(position) = position {
        body["queue_position"] = json!(position);
    }
    body
}

/// POST /v1/result/{task_id}/cancel
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let record = state.cancel(&task_id).await?;
    Ok(Json(result_json(&record)))
}

/// What an event stream asks for.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Also send a `progress` event with `progress.preview` for every preview of the running image.
    #[serde(default)]
    previews: bool,
}

/// GET /v1/result/{task_id}/events: Server-Sent Events, `progress` events then one `result`; with
/// `?previews=true`, previews in `progress` events too.
pub async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    authorize(&state, &headers)?;
    let (updates, previews) = state.watch_with_previews(&task_id, query.previews).await?;
    let stream = super::watched_updates(updates, previews, state.queue.clone()).map(|watched| {
        let name = if watched.record.status.is_final() { "result" } else { "progress" };
        let mut body = with_position(result_json(&watched.record), watched.queue_position);
        if let (Some(progress), Some(preview)) = (body.get_mut("progress"), watched.preview) {
            progress["preview"] =
                Value::String(format!("data:image/jpeg;base64,{}", BASE64.encode(&preview.jpeg)));
        }
        Ok(Event::default().event(name).json_data(body).expect("JSON values serialise"))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// GET /healthcheck: 200 when ready, 503 while loading or when the queue or the store is down.
pub async fn healthcheck(State(state): State<Arc<AppState>>) -> Response {
    let probe = Probe {
        queue: state.queue.as_ref(),
        store: state.services.store.as_ref(),
        shopping: state.services.shopping.as_ref(),
        models_loaded: state.serving(),
        downloads: &state.services.downloads,
        worker: None,
        fleet: state.fleet.as_ref().map(|fleet| fleet.counts()),
    };
    probe.respond().await
}

/// GET /info
pub async fn info(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(serde_json::to_value(state.info()).expect("info serialises"))
}

/// GET /metrics: Prometheus text.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// GET /openapi.json
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}
