//! What the loaded pipeline offers: models, schedulers, sizes and adapters, for `/info` and for
//! checking requests against.

use std::collections::BTreeMap;

use serde::Serialize;

/// One model the pipeline runs, as /info and `deskgen models` report it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Stable id, e.g. "detector".
    pub id: String,
    /// File or folder it was loaded from.
    pub path: String,
    /// sha256 of the file (of model.onnx for folders).
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Execution provider it runs on.
    pub execution_provider: String,
}

/// One LoRA adapter as /info describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraInfo {
    /// The name requests use (`loras[].name`, `<lora:name:weight>`).
    pub name: String,
    /// Its largest rank.
    pub rank: u32,
    /// Module kinds it changes, prefixed by sub-model (`unet.to_q`, `text_encoder.q_proj`).
    pub target_modules: Vec<String>,
    /// Words that invoke it; added to the prompt's `{triggers}` when it is used.
    pub trigger_words: Vec<String>,
}

/// A ControlNet a request may name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlNetInfo {
    /// The control type requests name it by.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Whether the service makes its control image from the photo; otherwise a unit needs its
    /// own `image_url`.
    pub from_photo: bool,
}

/// The control a desk photo gets when a request says nothing of `control`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefaultControl {
    /// The control type.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Its scale.
    pub scale: f64,
    /// Its guidance window's start.
    pub guidance_start: f64,
    /// Its guidance window's end.
    pub guidance_end: f64,
    /// The img2img strength it comes with, when the request sets none.
    pub strength: f64,
}

/// What the pipeline offers, for /info and for request defaults.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineInfo {
    /// Models in use.
    pub models: Vec<ModelInfo>,
    /// Scheduler ids a request may name.
    pub schedulers: Vec<String>,
    /// The scheduler used when a request names none.
    pub default_scheduler: String,
    /// The steps a request gets when it sets none: the model's own default, else 50.
    pub default_steps: u32,
    /// The guidance scale a request gets when it sets none: the model's own default, else 7.5.
    pub default_guidance: f32,
    /// The most steps a scheduler runs on this model, for those with a bound of their own (LCM).
    pub scheduler_max_steps: BTreeMap<String, u32>,
    /// The diffusion model's native image side in pixels.
    pub native_size: u32,
    /// Image sides must be multiples of this (8, or more for deep UNets).
    pub size_multiple: u32,
    /// LoRA adapters a request may name.
    pub loras: Vec<LoraInfo>,
    /// ControlNets a request may name, by type.
    pub controlnets: Vec<ControlNetInfo>,
    /// The control desk photos get by default; none when the model has no ControlNet of the
    /// configured type.
    pub default_control: Option<DefaultControl>,
    /// Largest |weight| a request may give one LoRA adapter.
    pub max_lora_weight: f32,
    /// The negative prompt used when a request gives none.
    pub negative_prompt: String,
    /// Where generated images go ("file" or "s3").
    pub object_store: String,
    /// Where shopping offers come from.
    pub shopping_provider: String,
}
