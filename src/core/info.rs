//! What the loaded pipeline offers: models, schedulers, sizes and adapters, for `/info` and for
//! checking requests against.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One model the pipeline runs, as /info and `deskgen models` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetInfo {
    /// The control type requests name it by.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Whether the service makes its control image from the photo; otherwise a unit needs its
    /// own `image_url`.
    pub from_photo: bool,
}

/// The control a desk photo gets when a request says nothing of `control`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// What a request that sets none of these gets on one Stable Diffusion model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdModelDefaults {
    /// Denoising steps: the model's own default, else 50.
    pub num_inference_steps: u32,
    /// Guidance scale: the model's own default, else 7.5.
    pub guidance_scale: f32,
    /// Scheduler id.
    pub scheduler: String,
    /// Output height without a photo.
    pub height: u32,
    /// Output width without a photo.
    pub width: u32,
}

/// One Stable Diffusion model a request may name (`model`), as /info's `sd_models` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdModelInfo {
    /// The name requests use.
    pub name: String,
    /// Its architecture: "sd" (1.x/2.x) or "sdxl".
    pub variant: String,
    /// The folder it is loaded from.
    pub path: String,
    /// Native image side in pixels.
    pub native_size: u32,
    /// Image sides must be multiples of this (8, or more for deep UNets).
    pub size_multiple: u32,
    /// Scheduler ids a request may name.
    pub schedulers: Vec<String>,
    /// What a request that sets none of these gets.
    pub defaults: SdModelDefaults,
    /// The most steps a scheduler runs on this model, for those with a bound of their own (LCM).
    pub scheduler_max_steps: BTreeMap<String, u32>,
    /// LoRA adapters that fit it.
    pub loras: Vec<LoraInfo>,
    /// ControlNets it has, by type.
    pub controlnets: Vec<ControlNetInfo>,
    /// The control desk photos get by default; none when the model has no ControlNet of the
    /// configured type.
    pub default_control: Option<DefaultControl>,
    /// How its previews are drawn: "decoder" (a tiny decoder), "linear" (the latent-to-RGB map)
    /// or "none".
    pub previews: String,
    /// Whether its UNet is an inpainting one (it takes the mask and the masked photo's latents).
    #[serde(default)]
    pub inpainting: bool,
}

/// What the pipeline offers, for /info and for request defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineInfo {
    /// Models in use.
    pub models: Vec<ModelInfo>,
    /// The Stable Diffusion models requests may name; the first is the default. Never empty.
    pub sd_models: Vec<SdModelInfo>,
    /// Largest |weight| a request may give one LoRA adapter.
    pub max_lora_weight: f32,
    /// The negative prompt used when a request gives none.
    pub negative_prompt: String,
    /// Where generated images go ("file" or "s3").
    pub object_store: String,
    /// Where shopping offers come from.
    pub shopping_provider: String,
}

impl PipelineInfo {
    /// The model a request that names none gets.
    pub fn default_model(&self) -> &SdModelInfo {
        &self.sd_models[0]
    }

    /// The model `name` names, or the default one for none; `None` for an unknown name.
    pub fn sd_model(&self, name: Option<&str>) -> Option<&SdModelInfo> {
        match name {
            None => Some(self.default_model()),
            Some(name) => self.sd_models.iter().find(|m| m.name == name),
        }
    }

    /// The names of the Stable Diffusion models, default first.
    pub fn sd_model_names(&self) -> Vec<&str> {
        self.sd_models.iter().map(|m| m.name.as_str()).collect()
    }
}

/// What a worker node serves, as it announces itself to the API nodes (Redis mode) with every
/// heartbeat: API nodes that load no models check requests against it and build `/info` from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerDescription {
    /// The worker node's name (`--name`).
    pub name: String,
    /// The deskgen version it runs.
    pub version: String,
    /// The execution provider it asked for.
    pub execution_provider: String,
    /// How many tasks it runs at once.
    pub slots: usize,
    /// The largest image side a request may ask of it.
    pub max_side: u32,
    /// The most images one request may ask of it.
    pub max_images: u32,
    /// What its pipeline offers.
    pub pipeline: PipelineInfo,
    /// The Stable Diffusion models in its memory now.
    pub loaded_models: Vec<String>,
}
