//! The API: gRPC, grpc-web and the REST bridge on one listener, over the same operations.

pub mod auth;
pub mod edge;
pub mod errors;
pub mod fleet;
pub mod grpc;
pub mod guard;
pub mod health;
pub mod photos;
pub mod render;
pub mod rest;
pub mod web;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use futures::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use self::auth::{ApiKeys, Caller};
use self::edge::Edge;
use self::errors::ApiError;
use self::fleet::{Fleet, WorkerEntry};
use crate::core::request::{
    DEFAULT_GUIDANCE, DEFAULT_IMAGES, DEFAULT_ITEMS_PER_CATEGORY, DEFAULT_STEPS, DEFAULT_STRENGTH,
    MAX_GUIDANCE, MAX_STEPS,
};
use crate::core::{
    ControlNetInfo, DefaultControl, GenerateInput, Limits, LoraInfo, MaskSource, ModelInfo, PhotoSource,
    PipelineInfo, Preview, Progress, ResizeMode, SdModelInfo, Violation, validate,
};
use crate::inference::diffusion::mask;
use crate::inference::vision::decode_upright;
use crate::intake::{Intake, IntakeError, Photo};
use crate::pipeline::{Pipeline, Services};
use crate::storage::StorageError;
use crate::tasks::{TaskQueue, TaskRecord, TaskStatus};
use crate::webhook::WebhookSender;

/// The size rule as /info states it.
const SIZE_RULE: &str = "With resize_mode fit (the default) an image from a photo keeps the photo's aspect \
ratio at the model's native area: width x height ~ native^2, each side rounded to the nearest \
multiple of limits.size_multiple, the longer side at most limits.max_side. crop, fill and stretch \
give the native square (defaults.width x defaults.height), as does text-to-image; width and height \
override, and with only one given the other follows the photo's shape (fit) or stays native.";

/// How much of a stored photo is read to check it before queueing: enough for the header of
/// every accepted format, including a JPEG whose EXIF block comes before its frame header.
const PHOTO_HEAD_BYTES: u64 = 256 * 1024;

/// Images a request carries as bytes instead of URLs.
#[derive(Debug, Default)]
pub struct Inline {
    /// The photo (`initial_image`, a multipart `image` part, the CLI's file).
    pub photo: Option<Bytes>,
    /// The inpainting mask (`mask_image`, a multipart `mask_image` part).
    pub mask: Option<Bytes>,
}

/// Shared state of every handler.
pub struct AppState {
    /// Tasks: queue, store, progress.
    pub queue: Arc<dyn TaskQueue>,
    /// The object store and the shopping provider, for health.
    pub services: Services,
    /// Accepted API keys.
    pub keys: ApiKeys,
    /// Request limits.
    pub limits: Limits,
    /// The checks a photo handed in as bytes passes before it is stored.
    pub intake: Intake,
    /// Webhook delivery, for checking webhook URLs at submission.
    pub webhooks: WebhookSender,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Prometheus registry.
    pub metrics: PrometheusHandle,
    /// Set once the models are loaded; the service is ready from then on.
    pub pipeline: OnceLock<ReadyPipeline>,
    /// On an API node that loads no models: the live workers, whose models it serves.
    pub fleet: Option<Arc<Fleet>>,
    /// Fixed facts for /info.
    pub about: About,
}

/// The loaded pipeline and its description, taken once when it became ready.
pub struct ReadyPipeline {
    /// What it offers; requests are checked against this.
    pub info: Arc<PipelineInfo>,
    /// The pipeline, asked which models are in memory now.
    pub pipeline: Arc<dyn Pipeline>,
}

/// One entry of /info's `sd_models`.
#[derive(Debug, Clone, Serialize)]
pub struct SdModelEntry {
    /// The model.
    #[serde(flatten)]
    pub model: SdModelInfo,
    /// Whether its sessions are in memory now (with `--max-loaded-models`, others load on demand).
    pub loaded: bool,
}

/// Facts about the deployment, for /info.
#[derive(Debug, Clone, Serialize)]
pub struct About {
    /// Queue backend name.
    pub queue_backend: String,
    /// Execution provider asked for (each model reports the one it runs on).
    pub execution_provider: String,
}

/// The /info document (the gRPC `InfoResponse` carries the same data).
#[derive(Debug, Clone, Serialize)]
pub struct InfoDocument {
    /// Service version.
    pub version: &'static str,
    /// Loaded models (empty while loading).
    pub models: Vec<ModelInfo>,
    /// The Stable Diffusion models a request's `model` may name; the first is the default, which
    /// the other fields describe (empty while loading).
    pub sd_models: Vec<SdModelEntry>,
    /// Schedulers a request may name.
    pub schedulers: Vec<String>,
    /// LoRA adapters a request may name, with rank, target modules and trigger words.
    pub loras: Vec<LoraInfo>,
    /// ControlNets a request's `control` may name, by type.
    pub controlnets: Vec<ControlNetInfo>,
    /// The control desk photos get when a request leaves `control` out; null without one.
    pub default_control: Option<DefaultControl>,
    /// Where generated images go.
    pub object_store: Option<String>,
    /// Where shopping offers come from.
    pub shopping_provider: Option<String>,
    /// Defaults applied to omitted request fields.
    pub defaults: serde_json::Value,
    /// Request limits.
    pub limits: serde_json::Value,
    /// The ways a photo can be shaped to the output (`resize_mode`).
    pub resize_modes: Vec<&'static str>,
    /// How the output size follows from the photo, in words.
    pub size_rule: &'static str,
    /// On an API node that loads no models: the live workers it serves for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerEntry>>,
    /// Deployment facts.
    #[serde(flatten)]
    pub about: About,
}

impl AppState {
    /// What this node serves: its pipeline's description once the models are loaded, or on an
    /// API node without models what every live worker serves.
    pub fn pipeline_info(&self) -> Option<Arc<PipelineInfo>> {
        match &self.fleet {
            Some(fleet) => fleet.serving(),
            None => self.pipeline.get().map(|ready| ready.info.clone()),
        }
    }

    /// Whether the node can take tasks: its models are loaded, or enough workers are live.
    pub fn serving(&self) -> bool {
        match &self.fleet {
            Some(fleet) => fleet.ready(),
            None => self.pipeline.get().is_some(),
        }
    }

    /// Every Stable Diffusion model, default first, and whether it is in memory now.
    pub fn sd_models(&self) -> Vec<SdModelEntry> {
        let Some(info) = self.pipeline_info() else { return Vec::new() };
        let loaded = match (&self.fleet, self.pipeline.get()) {
            (Some(fleet), _) => fleet.loaded_models(),
            (None, Some(ready)) => ready.pipeline.loaded_models(),
            (None, None) => Vec::new(),
        };
        let entries = info.sd_models.iter().cloned();
        entries.map(|model| SdModelEntry { loaded: loaded.contains(&model.name), model }).collect()
    }

    /// Validates and queues a request; a photo sent inline (`photo`) is checked first and stored
    /// once the request is known to be valid, and the task reads it from the store. A priority
    /// above the caller's ceiling is refused.
    pub async fn submit(
        &self,
        mut input: GenerateInput,
        inline: Inline,
        caller: &Caller,
    ) -> Result<TaskRecord, ApiError> {
        let info = match &self.fleet {
            Some(fleet) => fleet.serving_now(input.model.as_deref()).await,
            None => self.pipeline_info(),
        };
        let info = info.ok_or(ApiError::NotReady)?;
        let photo = match inline.photo {
            Some(bytes) => Some(self.check_photo("initial_image", bytes).await?),
            None => None,
        };
        let mask = match inline.mask {
            Some(bytes) => Some(self.check_mask(bytes).await?),
            None => None,
        };
        input.stored_photo = photo.as_ref().map(|p| p.key.clone());
        input.stored_mask = mask.as_ref().map(|m| m.key.clone());
        let (task_id, mut request) = validate::validate(input, &self.limits, &info)?;
        if self.fleet.is_some() {
            // Whichever worker claims it runs the model it was checked against.
            request.model.get_or_insert_with(|| info.default_model().name.clone());
        }
        request.trace = crate::telemetry::current_traceparent();
        if request.priority < caller.max_priority {
            return Err(ApiError::Forbidden(format!(
                "This API key may ask for priority {} at most; this request asks for {}.",
                caller.max_priority.as_str(),
                request.priority.as_str()
            )));
        }
        if let Some(url) = &request.webhook_url
            && let Err(e) = self.webhooks.check_url(url).await
        {
            let description = format!("webhook_url is not allowed: {e}.");
            return Err(ApiError::Invalid(vec![Violation { field: "webhook_url", description }]));
        }
        if let Some(photo) = &photo {
            self.store_photo(photo).await?;
        } else if let Some(PhotoSource::Url(url)) = &request.photo {
            self.check_stored_photo("initial_image_url", url).await?;
        }
        if let Some(mask) = &mask {
            self.store_photo(mask).await?;
        } else if let Some(MaskSource::Image(PhotoSource::Url(url))) =
            request.mask.as_ref().map(|m| &m.source)
        {
            self.check_stored_photo("mask_image_url", url).await?;
        }
        let (record, _created) = self.queue.submit(task_id, request, caller.client.clone()).await?;
        Ok(record)
    }

    /// Checks a photo handed in as bytes; refusals name `field`.
    pub async fn check_photo(&self, field: &'static str, bytes: Bytes) -> Result<Photo, ApiError> {
        self.intake.check_blocking(bytes).await.map_err(|e| match e {
            IntakeError::TooLarge { limit } => ApiError::TooLarge(limit as usize),
            IntakeError::Encode(reason) => ApiError::Internal(reason),
            refused => ApiError::Invalid(vec![Violation { field, description: refused.to_string() }]),
        })
    }

    /// Checks a mask handed in as bytes like a photo, and that it repaints something.
    async fn check_mask(&self, bytes: Bytes) -> Result<Photo, ApiError> {
        const FIELD: &str = "mask_image";
        let nothing = || {
            let description = "Nothing to repaint: the mask is empty or black everywhere (white repaints).";
            ApiError::Invalid(vec![Violation { field: FIELD, description: description.into() }])
        };
        if bytes.is_empty() {
            return Err(nothing());
        }
        // The photo's rules hold for masks too (formats, bytes, pixels, 32 pixels a side at least).
        let mask = self.check_photo(FIELD, bytes).await.map_err(|e| match e {
            ApiError::Invalid(mut violations) => {
                for v in &mut violations {
                    v.description = v.description.replacen("The photo", "The mask", 1);
                }
                ApiError::Invalid(violations)
            }
            other => other,
        })?;
        let (bytes, max_pixels) = (mask.bytes.clone(), self.intake.max_pixels);
        let repaints = tokio::task::spawn_blocking(move || {
            decode_upright(&bytes, max_pixels).map(|m| mask::repaints_anything(&mask::from_image(&m.image)))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Invalid(vec![Violation { field: FIELD, description: e.to_string() }]))?;
        if repaints { Ok(mask) } else { Err(nothing()) }
    }

    /// Checks an `initial_image_url` or `mask_image_url` (`field`) that names an object in the
    /// service's own store (a presigned upload, say) from its size and first bytes, so a missing or
    /// refused image is answered now rather than by a failed task. A store that cannot be read
    /// right now leaves the check to the task's fetch stage.
    async fn check_stored_photo(&self, field: &'static str, url: &str) -> Result<(), ApiError> {
        let Some(key) = self.services.store.key_for_url(url) else { return Ok(()) };
        let what = if field == "mask_image_url" { "mask" } else { "photo" };
        let peek = match self.services.store.peek(&key, PHOTO_HEAD_BYTES).await {
            Ok(peek) => peek,
            Err(StorageError::NotFound { .. }) => {
                let description =
                    format!("{field} names {key}, which holds no object; upload the {what} first.");
                return Err(ApiError::Invalid(vec![Violation { field, description }]));
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "stored photo not checked before queueing");
                return Ok(());
            }
        };
        self.intake.check_head(peek.size, &peek.head).map_err(|refused| {
            let description = format!("{field} ({key}): {refused}");
            ApiError::Invalid(vec![Violation { field, description }])
        })
    }

    /// Stores a checked photo; returns the URL the store hands out for it.
    pub async fn store_photo(&self, photo: &Photo) -> Result<String, ApiError> {
        photo
            .store(self.services.store.as_ref())
            .await
            .map_err(|e| ApiError::Unavailable(format!("storing the photo: {e}")))
    }

    /// The current record of a task, or TASK_NOT_FOUND.
    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, ApiError> {
        self.queue.get(task_id).await?.ok_or_else(|| ApiError::TaskNotFound(task_id.to_string()))
    }

    /// Every change of a task from now on, or TASK_NOT_FOUND.
    pub async fn watch(&self, task_id: &str) -> Result<watch::Receiver<TaskRecord>, ApiError> {
        self.queue.watch(task_id).await?.ok_or_else(|| ApiError::TaskNotFound(task_id.to_string()))
    }

    /// [`AppState::watch`], and with `previews` the task's previews from now on.
    pub async fn watch_with_previews(
        &self,
        task_id: &str,
        previews: bool,
    ) -> Result<(watch::Receiver<TaskRecord>, Option<broadcast::Receiver<Preview>>), ApiError> {
        let updates = self.watch(task_id).await?;
        let running = !updates.borrow().status.is_final();
        let previews =
            if previews && running { Some(self.queue.watch_previews(task_id).await) } else { None };
        Ok((updates, previews))
    }

    /// Cancels a task; for a running task, waits briefly for it to stop.
    pub async fn cancel(&self, task_id: &str) -> Result<TaskRecord, ApiError> {
        let record = self.queue.cancel(task_id).await?;
        if record.status.is_final() {
            return Ok(record);
        }
        Ok(self.wait_final(task_id, Duration::from_secs(5)).await.unwrap_or(record))
    }

    /// The task's record once final, or `None` if `timeout` passes first.
    pub async fn wait_final(&self, task_id: &str, timeout: Duration) -> Option<TaskRecord> {
        let mut updates = self.queue.watch(task_id).await.ok()??;
        let finished = updates.wait_for(|r| r.status.is_final());
        tokio::time::timeout(timeout, finished).await.ok()?.ok().map(|r| r.clone())
    }

    /// The /info document.
    pub fn info(&self) -> InfoDocument {
        let pipeline = self.pipeline_info();
        let pipeline = pipeline.as_deref();
        let model = pipeline.map(PipelineInfo::default_model);
        InfoDocument {
            version: env!("CARGO_PKG_VERSION"),
            models: pipeline.map(|p| p.models.clone()).unwrap_or_default(),
            sd_models: self.sd_models(),
            schedulers: model.map(|m| m.schedulers.clone()).unwrap_or_default(),
            loras: model.map(|m| m.loras.clone()).unwrap_or_default(),
            controlnets: model.map(|m| m.controlnets.clone()).unwrap_or_default(),
            default_control: model.and_then(|m| m.default_control.clone()),
            object_store: pipeline.map(|p| p.object_store.clone()),
            shopping_provider: pipeline.map(|p| p.shopping_provider.clone()),
            defaults: serde_json::json!({
                "num_inference_steps": model.map_or(DEFAULT_STEPS, |m| m.defaults.num_inference_steps),
                "guidance_scale": model.map_or(DEFAULT_GUIDANCE, |m| m.defaults.guidance_scale),
                "strength": DEFAULT_STRENGTH,
                "height": model.map(|m| m.defaults.height),
                "width": model.map(|m| m.defaults.width),
                "scheduler": model.map(|m| m.defaults.scheduler.clone()),
                "negative_prompt": pipeline.map(|p| p.negative_prompt.clone()),
                "max_items_per_category": DEFAULT_ITEMS_PER_CATEGORY,
                "resize_mode": ResizeMode::default().as_str(),
                "num_images": DEFAULT_IMAGES,
            }),
            resize_modes: ResizeMode::ALL.iter().map(|m| m.as_str()).collect(),
            size_rule: SIZE_RULE,
            limits: serde_json::json!({
                "max_steps": MAX_STEPS,
                "max_side": self.limits.max_side,
                "max_images": self.limits.max_images,
                "max_guidance_scale": MAX_GUIDANCE,
                "max_queue_depth": self.queue.capacity(),
                "max_body_bytes": self.max_body_bytes,
                "max_upload_bytes": self.intake.max_bytes,
                "max_image_pixels": self.intake.max_pixels,
                "max_lora_weight": pipeline.map(|p| p.max_lora_weight),
                "size_multiple": model.map(|m| m.size_multiple),
                "scheduler_max_steps": model.map(|m| m.scheduler_max_steps.clone()),
            }),
            workers: self.fleet.as_ref().map(|fleet| fleet.workers()),
            about: self.about.clone(),
        }
    }
}

/// How often a stream of a queued task looks whether its place changed.
const POSITION_POLL: Duration = Duration::from_secs(1);

/// One message of a watched task's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    /// The task's state (with a preview: the step it was made at as progress).
    pub record: TaskRecord,
    /// A preview of the running image, when this message brings one.
    pub preview: Option<Preview>,
    /// Where the task stands while queued: 1 starts next.
    pub queue_position: Option<usize>,
}

/// Where a queued task stands (1 starts next); none for a task that is not queued, or when the
/// backend cannot tell right now.
pub async fn queue_position(queue: &dyn TaskQueue, record: &TaskRecord) -> Option<usize> {
    if record.status != TaskStatus::Queued {
        return None;
    }
    queue.queue_position(&record.task_id).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, task_id = %record.task_id, "cannot tell the task's place in the queue");
        None
    })
}

/// Every state a task passes through from now on, ending with its final state (or when the task
/// is purged); each preview from `previews` comes as one more message, with the state it came in
/// and the step it was made at as progress; while the task is queued, a change of its place in
/// `queue` comes as one more message too.
pub fn watched_updates(
    updates: watch::Receiver<TaskRecord>,
    previews: Option<broadcast::Receiver<Preview>>,
    queue: Arc<dyn TaskQueue>,
) -> impl Stream<Item = Watched> {
    struct Watching {
        updates: watch::Receiver<TaskRecord>,
        previews: Option<broadcast::Receiver<Preview>>,
        queue: Arc<dyn TaskQueue>,
        fresh: bool,
        position: Option<usize>,
        /// The state the stream sent last.
        sent: Option<TaskRecord>,
    }
    let start = Watching { updates, previews, queue, fresh: true, position: None, sent: None };
    futures::stream::unfold(Some(start), |state| async move {
        let mut watching = state?;
        if !std::mem::take(&mut watching.fresh) {
            loop {
                let queued = watching.updates.borrow().status == TaskStatus::Queued;
                tokio::select! {
                    // Previews first: one made before the end still comes before the final state.
                    biased;
                    preview = next_preview(&mut watching.previews) => {
                        let mut record = watching.updates.borrow().clone();
                        // The task ended meanwhile: the preview comes with the state before the end,
                        // which was sent (previews are only made while the task runs).
                        if record.status.is_final() {
                            match watching.sent.clone().filter(|r| !r.status.is_final()) {
                                Some(sent) => record = sent,
                                None => break,
                            }
                        }
                        // The progress beside a preview is the step it was made at.
                        let progress =
                            Progress { stage: "diffusion".into(), step: preview.step, steps: preview.steps };
                        let record = TaskRecord { progress: Some(progress), ..record };
                        let message = Watched { record, preview: Some(preview), queue_position: None };
                        return Some((message, Some(watching)));
                    }
                    changed = watching.updates.changed() => {
                        // Sender dropped (task purged): the stream ends.
                        changed.ok()?;
                        break;
                    }
                    _ = tokio::time::sleep(POSITION_POLL), if queued => {
                        let record = watching.updates.borrow().clone();
                        let position = queue_position(watching.queue.as_ref(), &record).await;
                        if position.is_some() && position != watching.position {
                            watching.position = position;
                            let message = Watched { record, preview: None, queue_position: position };
                            return Some((message, Some(watching)));
                        }
                    }
                }
            }
        }
        let record = watching.updates.borrow_and_update().clone();
        let position = queue_position(watching.queue.as_ref(), &record).await;
        watching.position = position;
        watching.sent = Some(record.clone());
        let last = record.status.is_final();
        Some((Watched { record, preview: None, queue_position: position }, (!last).then_some(watching)))
    })
}

/// The next preview a watcher gets; never, once the previews end or when there are none.
async fn next_preview(previews: &mut Option<broadcast::Receiver<Preview>>) -> Preview {
    while let Some(receiver) = previews {
        match receiver.recv().await {
            Ok(preview) => return preview,
            // A slow watcher skips to the newest previews.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => *previews = None,
        }
    }
    std::future::pending().await
}

/// The REST routes (gRPC and grpc-web are merged in by [`crate::server`]).
pub fn rest_router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route(
            "/v1/generate",
            post(rest::generate).layer(DefaultBodyLimit::max(photos::body_limit_with_photo(&state))),
        )
        .route(
            "/generate",
            post(rest::generate).layer(DefaultBodyLimit::max(photos::body_limit_with_photo(&state))),
        )
        .route(
            "/v1/uploads",
            post(photos::upload).layer(DefaultBodyLimit::max(photos::upload_body_limit(&state))),
        )
        .route("/v1/uploads/presign", post(photos::presign))
        .route("/v1/result/{task_id}", get(rest::result))
        .route("/result/{task_id}", get(rest::result))
        .route("/v1/result/{task_id}/events", get(rest::events))
        .route("/v1/result/{task_id}/cancel", post(rest::cancel))
        .route("/healthcheck", get(rest::healthcheck))
        .route("/info", get(rest::info))
        .route("/metrics", get(rest::metrics))
        .route("/openapi.json", get(rest::openapi))
        .route("/", get(web::index))
        .route("/assets/{file}", get(web::asset))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Runs each request in a span (when traces are exported) whose parent is the client's W3C
/// `traceparent` header, or gRPC metadata entry, if it sent one.
pub async fn trace_requests(request: Request, next: Next) -> Response {
    use tracing::Instrument;
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    // Probes and scrapes would be a trace each, every few seconds.
    if route == "/healthcheck" || route == "/metrics" {
        return next.run(request).await;
    }
    let span = tracing::info_span!("request", method = %request.method(), route = %route);
    let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    crate::telemetry::adopt(&span, traceparent);
    next.run(request).instrument(span).await
}

/// Wraps `router` in `edge`, and in request spans when traces are exported.
pub fn with_edge(router: Router, edge: Edge) -> Router {
    let router = router.layer(edge);
    if crate::telemetry::enabled() { router.layer(middleware::from_fn(trace_requests)) } else { router }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::core::GenerateRequest;
    use crate::tasks::MemoryQueue;

    fn preview(step: u32) -> Preview {
        Preview { step, steps: 10, jpeg: Bytes::from_static(b"jpeg") }
    }

    #[tokio::test]
    async fn previews_come_between_states_at_their_step_and_never_after_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let queue: Arc<dyn TaskQueue> = Arc::new(MemoryQueue::open(dir.path(), 10, 3, 10).unwrap());
        // The sender races the stream: repeat so the events meet it in either order.
        for _ in 0..20 {
            let mut record = TaskRecord::new("t".into(), GenerateRequest::a_desk(1), String::new());
            record.status = TaskStatus::Processing;
            record.progress = Some(Progress { stage: "diffusion".into(), step: 7, steps: 10 });
            let (states, updates) = watch::channel(record.clone());
            let (previews, receiver) = broadcast::channel(4);
            let mut stream = Box::pin(watched_updates(updates, Some(receiver), queue.clone()));
            let first = stream.next().await.unwrap();
            assert_eq!((first.record, first.preview, first.queue_position), (record.clone(), None, None));

            previews.send(preview(5)).unwrap();
            let shown = stream.next().await.unwrap();
            assert_eq!(shown.preview, Some(preview(5)));
            assert_eq!(shown.record.progress.unwrap().step, 5, "the step the preview shows");

            // A preview that was on its way when the task ended still comes, before the end.
            record.status = TaskStatus::Done;
            states.send_replace(record.clone());
            previews.send(preview(10)).unwrap();
            let late = stream.next().await.unwrap();
            assert_eq!((late.record.status, late.preview), (TaskStatus::Processing, Some(preview(10))));
            let last = stream.next().await.unwrap();
            assert_eq!((last.record.status, last.preview), (TaskStatus::Done, None));
            assert!(stream.next().await.is_none(), "nothing after the final state");
        }
    }

    #[tokio::test]
    async fn a_queued_tasks_stream_tells_its_place_as_it_moves_up() {
        use crate::tasks::WorkerQueue;
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(MemoryQueue::open(dir.path(), 10, 3, 10).unwrap());
        let (first, _) = queue.submit(None, GenerateRequest::a_desk(1), String::new()).await.unwrap();
        let (second, _) = queue.submit(None, GenerateRequest::a_desk(2), String::new()).await.unwrap();
        let updates = queue.watch(&second.task_id).await.unwrap().unwrap();
        let mut stream = Box::pin(watched_updates(updates, None, queue.clone()));
        assert_eq!(stream.next().await.unwrap().queue_position, Some(2));

        let claimed = queue.next(&tokio_util::sync::CancellationToken::new()).await.unwrap();
        assert_eq!(claimed.record.task_id, first.task_id);
        let moved = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap();
        assert_eq!((moved.record.status, moved.queue_position), (TaskStatus::Queued, Some(1)));

        queue.next(&tokio_util::sync::CancellationToken::new()).await.unwrap();
        let started = stream.next().await.unwrap();
        assert_eq!((started.record.status, started.queue_position), (TaskStatus::Processing, None));
    }
}
