//! The pipeline: what happens to one request, from the photo to the result.
//!
//! [`DeskPipeline`] runs the stages in order: [`photo`] (fetch and decode), [`look`] (detector,
//! classifier, captioner), [`plan`] (categories and the prompt), [`control`] (ControlNet units and
//! their images), [`mask`] (the inpainting mask, read or drawn from the detections), [`draw`] (Stable Diffusion and the upload) and [`shop`] (offers per category, beside the drawing).
//! [`models`] keeps the Stable Diffusion models a request may name, loading them on demand.

pub mod context;
pub mod control;
pub mod desk;
pub mod draw;
pub mod look;
pub mod mask;
pub mod models;
pub mod photo;
pub mod plan;
pub mod shape;
pub mod shop;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{Failure, GenerateOutput, GenerateRequest, PipelineInfo};
use crate::hub::Downloads;
use crate::shopping::ShoppingProvider;
use crate::storage::ObjectStore;

pub use context::RunContext;
pub use desk::{DeskPipeline, PipelineConfig};
pub use models::SdModelSpec;

/// The outside services a pipeline talks to; a node opens them before the models load, and its
/// health reports on them.
#[derive(Clone)]
pub struct Services {
    /// Where uploads and generated images live.
    pub store: Arc<dyn ObjectStore>,
    /// Where offers come from.
    pub shopping: Arc<dyn ShoppingProvider>,
    /// The hub pulls of the models while they load.
    pub downloads: Arc<Downloads>,
}

/// Runs one request. The product binary uses the real pipeline; tests may drive the service with
/// their own implementation to control timing.
#[async_trait]
pub trait Pipeline: Send + Sync + 'static {
    /// Runs `request` to its output, reporting progress and honouring cancellation through `ctx`.
    async fn run(&self, request: &GenerateRequest, ctx: &RunContext) -> Result<GenerateOutput, Failure>;

    /// Models, schedulers and sizes this pipeline offers.
    fn info(&self) -> PipelineInfo;

    /// The names of the Stable Diffusion models (of `info().sd_models`) in memory now.
    fn loaded_models(&self) -> Vec<String>;
}

/// Adds the time since `since` to `stage`'s entry of the result's timings, in milliseconds.
/// With traces exported, the stage also becomes a span of the task's trace.
fn record_ms(timings: &mut std::collections::BTreeMap<String, f64>, stage: &str, since: std::time::Instant) {
    let took = since.elapsed();
    *timings.entry(stage.to_string()).or_default() += took.as_secs_f64() * 1000.0;
    crate::telemetry::past_span(stage, std::time::SystemTime::now() - took, took);
}
