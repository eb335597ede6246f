//! The validated generation request, as the queue stores it and the pipeline runs it.

use serde::{Deserialize, Serialize};

use crate::inference::diffusion::SchedulerKind;

/// Defaults applied when a request leaves a field out.
pub const DEFAULT_STEPS: u32 = 50;
/// Default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE: f32 = 7.5;
/// Default img2img strength.
pub const DEFAULT_STRENGTH: f32 = 0.75;
/// Default offers per category.
pub const DEFAULT_ITEMS_PER_CATEGORY: u32 = 3;

/// Images a request gets when it sets no `num_images`.
pub const DEFAULT_IMAGES: u32 = 1;
/// Denoising steps between previews when a request sets no `preview_every`.
pub const DEFAULT_PREVIEW_EVERY: u32 = 5;
/// Most denoising steps a request may ask for.
pub const MAX_STEPS: u32 = crate::inference::diffusion::MAX_STEPS;
/// Largest guidance scale a request may ask for.
pub const MAX_GUIDANCE: f32 = 30.0;
/// Longest prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 10_000;
/// Webhook events a request may ask for.
pub const WEBHOOK_EVENTS: [&str; 3] = ["start", "progress", "completed"];
/// Most ControlNet units one request may have.
pub const MAX_CONTROL_UNITS: usize = 4;
/// A control unit's scale when the request gives none.
pub const DEFAULT_CONTROL_SCALE: f64 = 1.0;
/// Canny thresholds when a unit gives none (controlnet_aux's defaults).
pub const DEFAULT_CANNY_THRESHOLDS: (f64, f64) = (100.0, 200.0);
/// The control type whose images the service makes from the photo itself.
pub const CANNY: &str = "canny";

/// Where the photo a task starts from is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PhotoSource {
    /// An http(s) or s3 URL; one that points into the service's object store is read from it.
    Url(String),
    /// An object the service stored itself, under this key of its object store.
    Stored {
        /// The object's key.
        key: String,
    },
}

/// Inpainting: which part of the photo to repaint and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskRequest {
    /// Where the mask comes from.
    pub source: MaskSource,
    /// Gaussian blur radius applied to the mask at the output's size, in pixels; 0 for none.
    pub blur: f32,
    /// Generate only the masked region grown by this many pixels, then paste it back.
    pub padding_crop: Option<u32>,
    /// Put the photo's pixels back outside the mask in the final image.
    pub preserve_unmasked: bool,
}

/// Where an inpainting mask comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// A mask image (white repaints, black keeps), by URL or stored by the service.
    Image(PhotoSource),
    /// Made from what the detector saw: these items' boxes are kept, the rest repainted.
    Keep(Vec<String>),
    /// Made from what the detector saw: only these items' boxes are repainted.
    Repaint(Vec<String>),
}

/// How the photo is shaped to the generated image (see `pipeline::shape`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// The photo's aspect ratio at the model's native area; the default.
    #[default]
    Fit,
    /// The native square (or `width`×`height`), the photo scaled to cover it and centre-cropped.
    Crop,
    /// The native square, the whole photo inside it and its edge pixels extended into the rest.
    Fill,
    /// The native square, the photo scaled to it on each axis alone.
    Stretch,
}

impl ResizeMode {
    /// Every mode, in the order /info lists them.
    pub const ALL: [ResizeMode; 4] =
        [ResizeMode::Fit, ResizeMode::Crop, ResizeMode::Fill, ResizeMode::Stretch];

    /// The mode's name in requests.
    pub fn as_str(self) -> &'static str {
        match self {
            ResizeMode::Fit => "fit",
            ResizeMode::Crop => "crop",
            ResizeMode::Fill => "fill",
            ResizeMode::Stretch => "stretch",
        }
    }

    /// The mode named `name`, if any.
    pub fn parse(name: &str) -> Option<ResizeMode> {
        ResizeMode::ALL.into_iter().find(|mode| mode.as_str() == name)
    }
}

/// How soon a task runs: a worker takes the highest level that waits, within a bound that lets the
/// lower levels run too (see `tasks::schedule`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Ahead of everything else.
    High,
    /// The default.
    #[default]
    Normal,
    /// After the others.
    Low,
}

impl Priority {
    /// Every level, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The level's name in requests.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The level named `name`, if any.
    pub fn parse(name: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|level| level.as_str() == name)
    }

    /// Where the level stands: 0 for high, then 1 and 2.
    pub fn rank(self) -> usize {
        self as usize
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

/// One ControlNet unit of a request, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// The control type, one of /info's `controlnets`.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Multiplies the ControlNet's residuals, in [0, 2].
    pub scale: f64,
    /// The share of the steps after which the unit starts acting, in [0, 1).
    pub guidance_start: f64,
    /// The share of the steps after which it stops, in (0, 1], above `guidance_start`.
    pub guidance_end: f64,
    /// A control image of its own; none means the service makes it from the photo (canny).
    pub image_url: Option<String>,
    /// Canny's lower hysteresis threshold.
    pub low_threshold: f64,
    /// Canny's upper hysteresis threshold.
    pub high_threshold: f64,
}

/// A generation request after its one parse: every default filled in, `<lora:…>` tags taken out
/// of the prompt and merged into `loras`, the scheduler resolved.
///
/// The stored JSON keeps the names earlier versions wrote, so records survive an upgrade, and
/// leaves out what is unset (none, or an empty list), which reads back as unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Photo to start from; none means text-to-image.
    #[serde(rename = "initial_image_url", default, skip_serializing_if = "Option::is_none")]
    pub photo: Option<PhotoSource>,
    /// The user's text as sent, `<lora:…>` tags and all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The user's text without `<lora:…>` tags, as the planner and the prompt template see it;
    /// none when absent or nothing else was there. Records from before it existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_text: Option<String>,
    /// Negative prompt; none means the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// The Stable Diffusion model (a name from /info's `sd_models`); none means the default one.
    /// Records from before it existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The W3C `traceparent` of the span that accepted it, when traces are exported: the worker's
    /// spans join that trace. Records from before it existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Images to draw, in one batch, from seeds `seed`, `seed + 1`, … Records from before it
    /// existed read as one.
    #[serde(default = "one_image")]
    pub num_images: u32,
    /// Denoising steps between previews for those who watch the task with previews on; 0 makes
    /// none. Records from before it existed read as the default.
    #[serde(default = "previews_every_five")]
    pub preview_every: u32,
    /// How soon the task runs. Records from before it existed read as normal.
    #[serde(default)]
    pub priority: Priority,
    /// Denoising steps.
    pub num_inference_steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// Output height in pixels; none means the size rule's (see `resize_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Output width in pixels; none means the size rule's (see `resize_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// How the photo is shaped to the output. Records from before it existed read as `fit`.
    #[serde(default)]
    pub resize_mode: ResizeMode,
    /// img2img strength in (0, 1]; none means the default: 1 with a mask, the desk control's when
    /// that applies, else 0.75.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// Seed; none means pick one at random when the task runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Scheduler; none means the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
    /// LoRA adapters to apply: the request's `loras`, then prompt tags for adapters it does not name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraWeight>,
    /// ControlNet guidance: none means the pipeline's default for desk photos, empty means none.
    /// Records from before it existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Vec<ControlRequest>>,
    /// Inpainting: what to repaint of the photo; none repaints all of it. Records from before it
    /// existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskRequest>,
    /// Where to POST the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Which webhook events to send (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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

/// A small picture of the image being drawn, made between denoising steps for those who watch;
/// never stored and never in a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// Denoising steps done when it was made.
    pub step: u32,
    /// Denoising steps the stage has.
    pub steps: u32,
    /// The picture as JPEG, its longer side at most [`PREVIEW_MAX_SIDE`] pixels.
    pub jpeg: bytes::Bytes,
}

/// Longest side of a preview in pixels (which is otherwise half the image's size).
pub const PREVIEW_MAX_SIDE: u32 = 256;

fn one_image() -> u32 {
    DEFAULT_IMAGES
}

fn previews_every_five() -> u32 {
    DEFAULT_PREVIEW_EVERY
}

#[cfg(test)]
impl GenerateRequest {
    /// A text-to-image request for "a desk", 20 steps, the other fields at their defaults.
    pub(crate) fn a_desk(seed: u64) -> GenerateRequest {
        GenerateRequest {
            photo: None,
            prompt: Some("a desk".into()),
            user_text: Some("a desk".into()),
            negative_prompt: None,
            model: None,
            trace: None,
            num_images: DEFAULT_IMAGES,
            preview_every: DEFAULT_PREVIEW_EVERY,
            priority: Priority::Normal,
            num_inference_steps: 20,
            guidance_scale: DEFAULT_GUIDANCE,
            height: None,
            width: None,
            resize_mode: ResizeMode::Fit,
            strength: None,
            seed: Some(seed),
            scheduler: None,
            loras: Vec::new(),
            control: None,
            mask: None,
            webhook_url: None,
            webhook_events: Vec::new(),
            max_items_per_category: DEFAULT_ITEMS_PER_CATEGORY,
        }
    }
}
