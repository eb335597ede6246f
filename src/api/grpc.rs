//! The gRPC services (also served as grpc-web): Generate, Result and Info.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::errors::ApiError;
use super::{AppState, Inline, SdModelEntry};
use crate::core::request::{
    DEFAULT_GUIDANCE, DEFAULT_IMAGES, DEFAULT_ITEMS_PER_CATEGORY, DEFAULT_STEPS, DEFAULT_STRENGTH,
    MAX_GUIDANCE, MAX_STEPS,
};
use crate::core::{
    ControlInput, ControlNetInfo, ControlUsed, DefaultControl, GenerateInput, LoraInfo, LoraInput,
    PipelineInfo, ResizeMode,
};
use crate::tasks::{self, TaskRecord};

/// Generated protobuf types and service traits of `deskgen.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("deskgen.v1");

    /// Encoded descriptors of every deskgen proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("deskgen_descriptor");
}

use pb::generate_server::Generate;
use pb::info_server::Info;
use pb::result_server::Result as ResultService;

/// Rejects calls without a valid `authorization: Bearer <key>` metadata entry.
pub fn check_auth(state: &AppState, request: &Request<()>) -> Result<(), Status> {
    caller(state, request.metadata()).map(drop)
}

/// The caller the `authorization` metadata entry names.
fn caller(state: &AppState, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
    let value = metadata.get("authorization").map(|v| v.as_bytes());
    state.keys.caller(value).ok_or_else(|| ApiError::Unauthenticated.into())
}

/// Implements all three services over the shared state.
#[derive(Clone)]
pub struct GrpcApi {
    state: Arc<AppState>,
}

impl GrpcApi {
    /// The services over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        GrpcApi { state }
    }
}

fn status(s: tasks::TaskStatus) -> pb::TaskStatus {
    match s {
        tasks::TaskStatus::Queued => pb::TaskStatus::Queued,
        tasks::TaskStatus::Processing => pb::TaskStatus::Processing,
        tasks::TaskStatus::Done => pb::TaskStatus::Done,
        tasks::TaskStatus::Failed => pb::TaskStatus::Failed,
        tasks::TaskStatus::Canceled => pb::TaskStatus::Canceled,
    }
}

fn as_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

impl From<pb::GenerateRequest> for GenerateInput {
    fn from(r: pb::GenerateRequest) -> Self {
        GenerateInput {
            initial_image_url: r.initial_image_url,
            initial_image: None,
            prompt: r.prompt,
            negative_prompt: r.negative_prompt,
            num_inference_steps: r.num_inference_steps.map(i64::from),
            guidance_scale: r.guidance_scale.map(f64::from),
            height: r.height.map(i64::from),
            width: r.width.map(i64::from),
            resize_mode: r.resize_mode,
            strength: r.strength.map(f64::from),
            seed: r.seed,
            scheduler: r.scheduler,
            model: r.model,
            num_images: r.num_images.map(i64::from),
            preview_every: r.preview_every.map(i64::from),
            priority: r.priority,
            loras: (!r.loras.is_empty()).then(|| {
                r.loras
                    .into_iter()
                    .map(|l| LoraInput { name: l.name, weight: l.weight.map(f64::from) })
                    .collect()
            }),
            control: r.control.map(|c| c.units.into_iter().map(ControlInput::from).collect()),
            mask_image_url: r.mask_image_url,
            mask_image: None,
            keep: (!r.keep.is_empty()).then_some(r.keep),
            repaint: (!r.repaint.is_empty()).then_some(r.repaint),
            preserve_unmasked: r.preserve_unmasked,
            mask_blur: r.mask_blur.map(f64::from),
            padding_mask_crop: r.padding_mask_crop.map(i64::from),
            webhook_url: r.webhook_url,
            webhook_events: (!r.webhook_events.is_empty()).then_some(r.webhook_events),
            max_items_per_category: r.max_items_per_category.map(i64::from),
            task_id: r.task_id,
            stored_photo: None,
            stored_mask: None,
        }
    }
}

impl From<pb::ControlUnit> for ControlInput {
    fn from(u: pb::ControlUnit) -> Self {
        ControlInput {
            control_type: u.r#type,
            scale: u.scale.map(f64::from),
            guidance_start: u.guidance_start.map(f64::from),
            guidance_end: u.guidance_end.map(f64::from),
            image_url: u.image_url,
            low_threshold: u.low_threshold.map(f64::from),
            high_threshold: u.high_threshold.map(f64::from),
        }
    }
}

impl From<ControlUsed> for pb::ControlUsed {
    fn from(c: ControlUsed) -> Self {
        pb::ControlUsed { r#type: c.control_type, scale: c.scale as f32 }
    }
}

impl From<LoraInfo> for pb::LoraInfo {
    fn from(l: LoraInfo) -> Self {
        pb::LoraInfo {
            name: l.name,
            rank: l.rank,
            target_modules: l.target_modules,
            trigger_words: l.trigger_words,
        }
    }
}

impl From<SdModelEntry> for pb::SdModel {
    fn from(entry: SdModelEntry) -> Self {
        let SdModelEntry { model: m, loaded } = entry;
        pb::SdModel {
            name: m.name,
            variant: m.variant,
            path: m.path,
            native_size: m.native_size,
            size_multiple: m.size_multiple,
            schedulers: m.schedulers,
            defaults: Some(pb::SdModelDefaults {
                num_inference_steps: m.defaults.num_inference_steps,
                guidance_scale: m.defaults.guidance_scale,
                scheduler: m.defaults.scheduler,
                height: m.defaults.height,
                width: m.defaults.width,
            }),
            scheduler_max_steps: m.scheduler_max_steps.into_iter().collect(),
            loras: m.loras.into_iter().map(pb::LoraInfo::from).collect(),
            controlnets: m.controlnets.into_iter().map(pb::ControlNetInfo::from).collect(),
            previews: m.previews,
            inpainting: m.inpainting,
            default_control: m.default_control.map(pb::DefaultControl::from),
            loaded,
        }
    }
}

impl From<ControlNetInfo> for pb::ControlNetInfo {
    fn from(c: ControlNetInfo) -> Self {
        pb::ControlNetInfo { r#type: c.control_type, from_photo: c.from_photo }
    }
}

impl From<DefaultControl> for pb::DefaultControl {
    fn from(d: DefaultControl) -> Self {
        pb::DefaultControl {
            r#type: d.control_type,
            scale: d.scale as f32,
            guidance_start: d.guidance_start as f32,
            guidance_end: d.guidance_end as f32,
            strength: d.strength as f32,
        }
    }
}

impl From<&TaskRecord> for pb::TaskResult {
    fn from(record: &TaskRecord) -> Self {
        let bounding_box = |b: crate::core::BoundingBox| pb::BoundingBox {
            x_min: b.x_min,
            y_min: b.y_min,
            x_max: b.x_max,
            y_max: b.y_max,
        };
        let output = record.output.clone().unwrap_or_default();
        pb::TaskResult {
            task_id: record.task_id.clone(),
            status: status(record.status) as i32,
            progress: record.progress.as_ref().map(|p| pb::Progress {
                stage: p.stage.clone(),
                step: p.step,
                steps: p.steps,
                preview: Default::default(),
            }),
            initial_image_url: output.initial_image_url,
            processed_image_url: output.processed_image_url,
            processed_image_urls: output.processed_image_urls,
            queue_position: None,
            mask_url: output.mask_url,
            is_desk: output.is_desk,
            caption: output.caption,
            detected_items: output
                .detected_items
                .into_iter()
                .map(|d| pb::DetectedItem {
                    label: d.label,
                    score: d.score,
                    r#box: Some(bounding_box(d.bbox)),
                    item: d.item,
                    source: d.source,
                })
                .collect(),
            detected_text: output
                .detected_text
                .into_iter()
                .map(|t| pb::DetectedText {
                    text: t.text,
                    score: t.score,
                    r#box: Some(bounding_box(t.bbox)),
                    brand: t.brand,
                })
                .collect(),
            recommendations: output
                .recommendations
                .into_iter()
                .map(|r| pb::Recommendation {
                    reason: r.reason.as_str().to_string(),
                    category: r.category,
                    display_name: r.display_name,
                    items: r
                        .items
                        .into_iter()
                        .map(|i| pb::ShoppingItem {
                            title: i.title,
                            price: i.price,
                            mall: i.mall,
                            category3: i.category3,
                            category4: i.category4,
                            link: i.link,
                            image: i.image,
                        })
                        .collect(),
                })
                .collect(),
            prompt_used: output.prompt_used,
            negative_prompt_used: output.negative_prompt_used,
            timings_ms: output.timings_ms.into_iter().collect(),
            warnings: output.warnings,
            error_code: record.error.as_ref().map(|e| e.code.as_str().to_string()),
            message: record.error.as_ref().map(|e| e.message.clone()),
            created_at: Some(timestamp(record.created_at)),
            completed_at: record.completed_at.map(timestamp),
            seed: output.seed,
            control: output.control.into_iter().map(pb::ControlUsed::from).collect(),
        }
    }
}

#[tonic::async_trait]
impl Generate for GrpcApi {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let caller = caller(&self.state, request.metadata())?;
        let mut request = request.into_inner();
        let photo = request.initial_image.take().map(Bytes::from);
        let mask = request.mask_image.take().map(Bytes::from);
        // The decoder's limit leaves room for a photo; the rest of the message keeps the usual one,
        // refused with the code tonic gives any message over its limit.
        let rest = request.encoded_len();
        if rest > self.state.max_body_bytes {
            return Err(Status::out_of_range(format!(
                "The request without its photo and mask is {rest} bytes, over the limit of {} bytes.",
                self.state.max_body_bytes
            )));
        }
        let record = self.state.submit(request.into(), Inline { photo, mask }, &caller).await?;
        Ok(Response::new(pb::GenerateResponse {
            task_id: record.task_id,
            status: status(record.status) as i32,
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let record = self.state.cancel(&request.into_inner().task_id).await?;
        Ok(Response::new(pb::CancelResponse {
            task_id: record.task_id,
            status: status(record.status) as i32,
        }))
    }
}

/// The stream type of `WatchResult`.
pub type ResultStream = Pin<Box<dyn Stream<Item = Result<pb::TaskResult, Status>> + Send>>;

#[tonic::async_trait]
impl ResultService for GrpcApi {
    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::TaskResult>, Status> {
        let task_id = request.into_inner().task_id;
        let record = self.state.get(&task_id).await?;
        let mut result = pb::TaskResult::from(&record);
        result.queue_position = super::queue_position(self.state.queue.as_ref(), &record).await.map(as_u32);
        Ok(Response::new(result))
    }

    type WatchResultStream = ResultStream;

    async fn watch_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<Self::WatchResultStream>, Status> {
        let request = request.into_inner();
        let (updates, previews) = self.state.watch_with_previews(&request.task_id, request.previews).await?;
        let queue = self.state.queue.clone();
        let stream = super::watched_updates(updates, previews, queue).map(|watched| {
            let mut result = pb::TaskResult::from(&watched.record);
            result.queue_position = watched.queue_position.map(as_u32);
            if let (Some(progress), Some(preview)) = (result.progress.as_mut(), watched.preview) {
                progress.preview = preview.jpeg.to_vec();
            }
            Ok(result)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl Info for GrpcApi {
    async fn get_info(&self, _: Request<pb::GetInfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let info = self.state.info();
        let pipeline = self.state.pipeline_info();
        let pipeline = pipeline.as_deref();
        let model = pipeline.map(PipelineInfo::default_model);
        Ok(Response::new(pb::InfoResponse {
            version: info.version.to_string(),
            models: info
                .models
                .iter()
                .map(|m| pb::ModelInfo {
                    id: m.id.clone(),
                    path: m.path.clone(),
                    sha256: m.sha256.clone(),
                    size_bytes: m.size_bytes,
                    execution_provider: m.execution_provider.clone(),
                })
                .collect(),
            defaults: Some(pb::Defaults {
                num_inference_steps: model.map_or(DEFAULT_STEPS, |m| m.defaults.num_inference_steps),
                guidance_scale: model.map_or(DEFAULT_GUIDANCE, |m| m.defaults.guidance_scale),
                height: model.map(|m| m.defaults.height).unwrap_or_default(),
                width: model.map(|m| m.defaults.width).unwrap_or_default(),
                strength: DEFAULT_STRENGTH,
                scheduler: model.map(|m| m.defaults.scheduler.clone()).unwrap_or_default(),
                negative_prompt: pipeline.map(|p| p.negative_prompt.clone()).unwrap_or_default(),
                max_items_per_category: DEFAULT_ITEMS_PER_CATEGORY,
                resize_mode: ResizeMode::default().as_str().to_string(),
                num_images: DEFAULT_IMAGES,
            }),
            limits: Some(pb::Limits {
                max_steps: MAX_STEPS,
                max_side: self.state.limits.max_side,
                max_guidance_scale: MAX_GUIDANCE,
                max_queue_depth: self.state.queue.capacity() as u32,
                max_body_bytes: self.state.max_body_bytes as u64,
                max_lora_weight: pipeline.map(|p| p.max_lora_weight).unwrap_or_default(),
                max_upload_bytes: self.state.intake.max_bytes,
                max_image_pixels: self.state.intake.max_pixels,
                size_multiple: model.map(|m| m.size_multiple).unwrap_or_default(),
                max_images: self.state.limits.max_images,
                scheduler_max_steps: model
                    .map(|m| m.scheduler_max_steps.clone().into_iter().collect())
                    .unwrap_or_default(),
            }),
            queue_backend: info.about.queue_backend,
            schedulers: info.schedulers,
            resize_modes: info.resize_modes.iter().map(|m| m.to_string()).collect(),
            loras: info.loras.into_iter().map(pb::LoraInfo::from).collect(),
            object_store: info.object_store.unwrap_or_default(),
            shopping_provider: info.shopping_provider.unwrap_or_default(),
            controlnets: info.controlnets.into_iter().map(pb::ControlNetInfo::from).collect(),
            default_control: info.default_control.map(pb::DefaultControl::from),
            sd_models: info.sd_models.into_iter().map(pb::SdModel::from).collect(),
        }))
    }
}
