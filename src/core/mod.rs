//! The domain model every layer stands on: the validated request, what a generation produced, why
//! a task failed, and what the pipeline offers. No transport, no queue, no command line: the API
//! parses into these types once, the task queue stores them, and the pipeline runs them.

pub mod failure;
pub mod info;
pub mod request;
pub mod result;
pub mod validate;

pub use failure::{Failure, FailureCode};
pub use info::{
    ControlNetInfo, DefaultControl, LoraInfo, ModelInfo, PipelineInfo, SdModelDefaults, SdModelInfo,
    WorkerDescription,
};
pub use request::{
    ControlRequest, GenerateRequest, LoraWeight, MaskRequest, MaskSource, PhotoSource, Preview, Priority,
    Progress, ResizeMode,
};
pub use result::{
    BoundingBox, ControlUsed, DetectedItem, DetectedText, GenerateOutput, Offer, Recommendation,
    RecommendationReason,
};
pub use validate::{ControlInput, GenerateInput, Invalid, Limits, LoraInput, Violation};
