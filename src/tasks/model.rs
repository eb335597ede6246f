//! The task: what was asked, where it is in its life, and what it produced.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::shopping::Offer;

/// Where a task is in its life: queued → processing → done | failed | canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Accepted and waiting for a worker.
    Queued,
    /// A worker is running the pipeline.
    Processing,
    /// Finished; the output is in the record.
    Done,
    /// Finished with an error code and message.
    Failed,
    /// Canceled by the client before it finished.
    Canceled,
}

impl TaskStatus {
    /// True for done, failed and canceled: nothing changes after these.
    pub fn is_final(self) -> bool {
        matches!(self, TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled)
    }

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Processing => "processing",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::Canceled => "canceled",
        }
    }
}

/// Stable error codes of failed tasks and API errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The request broke a validation rule.
    InvalidInput,
    /// The photo could not be downloaded.
    ImageFetchFailed,
    /// The photo is not a decodable image of a usable size.
    InvalidImage,
    /// A model failed to run.
    ModelError,
    /// The generated image could not be stored.
    S3UploadFailed,
    /// The shopping provider failed.
    ShoppingFailed,
    /// The client canceled the task.
    Canceled,
    /// The task ran past its deadline.
    Timeout,
    /// No task has this id.
    TaskNotFound,
    /// The queue is at its limit.
    QueueFull,
    /// No valid API key was given.
    Unauthenticated,
    /// The task already reached a final state.
    AlreadyFinished,
    /// The service is still loading its models.
    NotReady,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The code as it appears in JSON bodies and `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "INVALID_INPUT",
            ErrorCode::ImageFetchFailed => "IMAGE_FETCH_FAILED",
            ErrorCode::InvalidImage => "INVALID_IMAGE",
            ErrorCode::ModelError => "MODEL_ERROR",
            ErrorCode::S3UploadFailed => "S3_UPLOAD_FAILED",
            ErrorCode::ShoppingFailed => "SHOPPING_FAILED",
            ErrorCode::Canceled => "CANCELED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::TaskNotFound => "TASK_NOT_FOUND",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::AlreadyFinished => "ALREADY_FINISHED",
            ErrorCode::NotReady => "NOT_READY",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// A LoRA adapter and its weight for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraWeight {
    /// Adapter name as listed by /info.
    pub name: String,
    /// Merge weight.
    pub weight: f32,
}

/// A validated generation request with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// Photo to start from; none means text-to-image.
    pub initial_image_url: Option<String>,
    /// The user's text, if any (never blank).
    pub prompt: Option<String>,
    /// Negative prompt; none means the configured default.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub num_inference_steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// Output height in pixels; none means the model's native size.
    pub height: Option<u32>,
    /// Output width in pixels; none means the model's native size.
    pub width: Option<u32>,
    /// img2img strength in (0, 1].
    pub strength: f32,
    /// Seed; none means pick one at random when the task runs.
    pub seed: Option<u64>,
    /// Scheduler id; none means the model's.
    pub scheduler: Option<String>,
    /// LoRA adapters to apply.
    pub loras: Vec<LoraWeight>,
    /// Where to POST the result.
    pub webhook_url: Option<String>,
    /// Which webhook events to send (all when empty).
    pub webhook_events: Vec<String>,
    /// Offers per recommended category.
    pub max_items_per_category: u32,
}

/// What a running task is doing now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Stage name: fetch, vision, caption, prompt, diffusion, upload, shopping.
    pub stage: String,
    /// Steps done within the stage.
    pub step: u32,
    /// Steps the stage has.
    pub steps: u32,
}

/// A box in normalised image coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    /// Left edge in [0, 1].
    pub x_min: f32,
    /// Top edge in [0, 1].
    pub y_min: f32,
    /// Right edge in [0, 1].
    pub x_max: f32,
    /// Bottom edge in [0, 1].
    pub y_max: f32,
}

/// An item found in the photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectedItem {
    /// Item name, e.g. "laptop".
    pub label: String,
    /// Detector confidence.
    pub score: f32,
    /// Where it is.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
}

/// Offers for one recommended category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Category id, e.g. "desk_lamp".
    pub category: String,
    /// Display name and REST result key, e.g. "데스크 조명".
    pub display_name: String,
    /// The offers, cheapest first.
    pub items: Vec<Offer>,
}

/// What a finished (or fallen-back) pipeline produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// Public URL of the photo the task started from.
    pub initial_image_url: Option<String>,
    /// URL of the generated PNG; none when generation was skipped or failed.
    pub processed_image_url: Option<String>,
    /// Whether the photo shows a desk; none for text-only requests.
    pub is_desk: Option<bool>,
    /// Caption of the photo.
    pub caption: Option<String>,
    /// Items found in the photo.
    pub detected_items: Vec<DetectedItem>,
    /// Shopping offers per recommended category.
    pub recommendations: Vec<Recommendation>,
    /// The prompt the diffusion model saw.
    pub prompt_used: Option<String>,
    /// The negative prompt the diffusion model saw.
    pub negative_prompt_used: Option<String>,
    /// Milliseconds per stage.
    pub timings_ms: BTreeMap<String, f64>,
    /// Problems that did not fail the task.
    pub warnings: Vec<String>,
    /// The seed generation used.
    pub seed: Option<u64>,
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    /// Stable code.
    pub code: ErrorCode,
    /// Message for people.
    pub message: String,
}

/// Everything known about one task; persisted on every change of status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's id (client-chosen or UUID v4).
    pub task_id: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// The validated request.
    pub request: TaskRequest,
    /// Progress while processing.
    pub progress: Option<Progress>,
    /// The pipeline's output once done.
    pub output: Option<TaskOutput>,
    /// The error once failed or canceled.
    pub error: Option<TaskError>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When a worker last started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub completed_at: Option<DateTime<Utc>>,
    /// How many times a worker started it.
    pub attempts: u32,
}

impl TaskRecord {
    /// A freshly queued task.
    pub fn new(task_id: String, request: TaskRequest) -> TaskRecord {
        TaskRecord {
            task_id,
            status: TaskStatus::Queued,
            request,
            progress: None,
            output: None,
            error: None,
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            attempts: 0,
        }
    }

    /// Ends the task: done with `output`, or canceled or failed with the error.
    pub fn complete(&mut self, outcome: Result<TaskOutput, TaskError>) {
        self.progress = None;
        self.completed_at = Some(Utc::now());
        match outcome {
            Ok(output) => {
                self.status = TaskStatus::Done;
                self.output = Some(output);
            }
            Err(error) => {
                self.status =
                    if error.code == ErrorCode::Canceled { TaskStatus::Canceled } else { TaskStatus::Failed };
                self.error = Some(error);
            }
        }
    }
}
