//! The one parse of a generation request, shared by REST, gRPC and the CLI: one input shape, one
//! set of rules, one error list, and a [`GenerateRequest`] with everything resolved.

use serde::Deserialize;

use super::info::{PipelineInfo, SdModelInfo};
use super::request::{
    CANNY, ControlRequest, DEFAULT_CANNY_THRESHOLDS, DEFAULT_CONTROL_SCALE, DEFAULT_IMAGES,
    DEFAULT_ITEMS_PER_CATEGORY, DEFAULT_PREVIEW_EVERY, GenerateRequest, LoraWeight, MAX_CONTROL_UNITS,
    MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_STEPS, MaskRequest, MaskSource, PhotoSource, Priority, ResizeMode,
    WEBHOOK_EVENTS,
};
use crate::inference::diffusion::lora::{check_name, extract_prompt_loras};
use crate::inference::diffusion::mask::MAX_MASK_BLUR;
use crate::inference::diffusion::{MAX_CONTROL_SCALE, SchedulerKind, is_guidance_window};

/// A generation request as received, before validation (REST JSON and gRPC map onto it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateInput {
    /// Photo URL.
    pub initial_image_url: Option<String>,
    /// The photo itself in a JSON body, base64 or a `data:image/…;base64,` URL; the transport
    /// decodes and stores it before validation, which sees it as `stored_photo`.
    pub initial_image: Option<String>,
    /// User text.
    pub prompt: Option<String>,
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub num_inference_steps: Option<i64>,
    /// Guidance scale.
    pub guidance_scale: Option<f64>,
    /// Output height.
    pub height: Option<i64>,
    /// Output width.
    pub width: Option<i64>,
    /// How the photo is shaped to the output: fit, crop, fill or stretch.
    pub resize_mode: Option<String>,
    /// img2img strength.
    pub strength: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// Scheduler id.
    pub scheduler: Option<String>,
    /// Stable Diffusion model, by name (the default one when absent).
    pub model: Option<String>,
    /// Images to draw (default 1).
    pub num_images: Option<i64>,
    /// Denoising steps between previews for watchers (default 5, 0 = none).
    pub preview_every: Option<i64>,
    /// How soon the task runs: high, normal (default) or low.
    pub priority: Option<String>,
    /// LoRA adapters.
    pub loras: Option<Vec<LoraInput>>,
    /// ControlNet units; `[]` turns control off, absent means the pipeline's default.
    pub control: Option<Vec<ControlInput>>,
    /// Inpainting mask URL (white repaints, black keeps).
    pub mask_image_url: Option<String>,
    /// The mask itself in a JSON body, base64 or a data URL; the transport decodes, checks and
    /// stores it before validation, which sees it as `stored_mask`.
    pub mask_image: Option<String>,
    /// Items whose boxes are kept while the rest is repainted.
    pub keep: Option<Vec<String>>,
    /// Items whose boxes alone are repainted.
    pub repaint: Option<Vec<String>>,
    /// Put the photo's pixels back outside the mask.
    pub preserve_unmasked: Option<bool>,
    /// Gaussian blur radius of the mask, in output pixels.
    pub mask_blur: Option<f64>,
    /// Generate only the masked region grown by this many pixels.
    pub padding_mask_crop: Option<i64>,
    /// Webhook target.
    pub webhook_url: Option<String>,
    /// Webhook events wanted.
    pub webhook_events: Option<Vec<String>>,
    /// Offers per category.
    pub max_items_per_category: Option<i64>,
    /// Client-chosen task id.
    pub task_id: Option<String>,
    /// The key of a photo the transport handed in as bytes (an inline photo, the CLI's file), to be
    /// stored there; never read from a request body.
    #[serde(skip)]
    pub stored_photo: Option<String>,
    /// The key of a mask the transport handed in as bytes and stored; never read from a body.
    #[serde(skip)]
    pub stored_mask: Option<String>,
}

/// A LoRA entry as received.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraInput {
    /// Adapter name.
    pub name: String,
    /// Merge weight (default 1).
    pub weight: Option<f64>,
}

/// A ControlNet unit as received.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlInput {
    /// Control type.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Residual scale (default 1).
    pub scale: Option<f64>,
    /// Window start (default 0).
    pub guidance_start: Option<f64>,
    /// Window end (default 1).
    pub guidance_end: Option<f64>,
    /// A control image of its own.
    pub image_url: Option<String>,
    /// Canny's lower threshold (default 100).
    pub low_threshold: Option<f64>,
    /// Canny's upper threshold (default 200).
    pub high_threshold: Option<f64>,
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The request field.
    pub field: &'static str,
    /// What is wrong, as a sentence for people.
    pub description: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// `prompt` was present but blank (the product spec's 400).
    EmptyPrompt,
    /// Other rules (422 INVALID_INPUT).
    Rules(Vec<Violation>),
}

/// Limits a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest image side in pixels.
    pub max_side: u32,
    /// Most images one request may ask for.
    pub max_images: u32,
}

/// Checks `input` and fills in defaults; the task id is the client's, if it chose one.
pub fn validate(
    input: GenerateInput,
    limits: &Limits,
    info: &PipelineInfo,
) -> Result<(Option<String>, GenerateRequest), Invalid> {
    if input.prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
        return Err(Invalid::EmptyPrompt);
    }
    let mut rules = Rules::default();
    if let Some(prompt) = &input.prompt {
        rules.text("prompt", prompt);
    }
    if let Some(negative) = &input.negative_prompt {
        rules.text("negative_prompt", negative);
    }
    let photo = rules.photo(input.initial_image_url, input.stored_photo, input.prompt.is_some());
    let model = rules.model(input.model.as_deref(), info);
    let preview_every = input.preview_every.unwrap_or(i64::from(DEFAULT_PREVIEW_EVERY));
    if !(0..=i64::from(MAX_STEPS)).contains(&preview_every) {
        rules.bad("preview_every", format!("preview_every must be between 0 and {MAX_STEPS}."));
    }
    let priority = input.priority.as_deref().map_or_else(Priority::default, |p| rules.priority(p));
    let num_images = input.num_images.unwrap_or(i64::from(DEFAULT_IMAGES));
    if !(1..=i64::from(limits.max_images)).contains(&num_images) {
        rules.bad("num_images", format!("num_images must be between 1 and {}.", limits.max_images));
    }
    let steps = input.num_inference_steps.unwrap_or(i64::from(model.defaults.num_inference_steps));
    if !(1..=i64::from(MAX_STEPS)).contains(&steps) {
        rules.bad("num_inference_steps", format!("num_inference_steps must be between 1 and {MAX_STEPS}."));
    }
    let guidance = input.guidance_scale.unwrap_or(f64::from(model.defaults.guidance_scale));
    rules.guidance(guidance);
    let multiple = model.size_multiple.max(8);
    let height = rules.side("height", input.height, multiple, limits.max_side);
    let width = rules.side("width", input.width, multiple, limits.max_side);
    let resize_mode = input.resize_mode.as_deref().map_or_else(ResizeMode::default, |m| rules.resize_mode(m));
    if let Some(strength) = input.strength {
        rules.strength(strength);
    }
    let scheduler = input.scheduler.as_deref().and_then(|name| rules.scheduler(name, model));
    rules.steps_for_scheduler(
        steps,
        scheduler.map_or(model.defaults.scheduler.as_str(), |s| s.as_str()),
        model,
    );
    let adapters = Adapters { model, max_weight: info.max_lora_weight };
    let (user_text, loras) = rules.loras(input.prompt.as_deref(), input.loras.unwrap_or_default(), &adapters);
    let control = input.control.map(|units| rules.control(units, photo.is_some(), model));
    let masking = Masking {
        url: input.mask_image_url,
        stored: input.stored_mask,
        keep: input.keep,
        repaint: input.repaint,
        preserve_unmasked: input.preserve_unmasked,
        blur: input.mask_blur,
        padding_crop: input.padding_mask_crop,
    };
    let mask = rules.mask(masking, photo.is_some());
    if mask.is_some() && control.as_ref().is_some_and(|units| !units.is_empty()) {
        rules.bad("control", "ControlNet guidance and a mask cannot be combined; send control: [].".into());
    }
    let webhook_events = input.webhook_events.unwrap_or_default();
    rules.webhook(input.webhook_url.as_deref(), &webhook_events);
    let per_category = input.max_items_per_category.unwrap_or(i64::from(DEFAULT_ITEMS_PER_CATEGORY));
    if !(1..=10).contains(&per_category) {
        rules.bad("max_items_per_category", "max_items_per_category must be between 1 and 10.".into());
    }
    if let Some(id) = &input.task_id {
        rules.task_id(id);
    }
    rules.finish()?;
    let request = GenerateRequest {
        photo,
        prompt: input.prompt,
        user_text,
        negative_prompt: input.negative_prompt,
        model: input.model,
        trace: None,
        num_images: num_images as u32,
        preview_every: preview_every as u32,
        priority,
        num_inference_steps: steps as u32,
        guidance_scale: guidance as f32,
        height,
        width,
        resize_mode,
        strength: input.strength.map(|s| s as f32),
        seed: input.seed,
        scheduler,
        loras,
        control,
        mask,
        webhook_url: input.webhook_url,
        webhook_events,
        max_items_per_category: per_category as u32,
    };
    Ok((input.task_id, request))
}

/// A request's inpainting fields as received.
struct Masking {
    url: Option<String>,
    stored: Option<String>,
    keep: Option<Vec<String>>,
    repaint: Option<Vec<String>>,
    preserve_unmasked: Option<bool>,
    blur: Option<f64>,
    padding_crop: Option<i64>,
}

/// The most item names `keep` or `repaint` may list.
const MAX_MASK_ITEMS: usize = 32;

/// The adapters a request may name and the bound of their weights.
struct Adapters<'a> {
    model: &'a SdModelInfo,
    max_weight: f32,
}

/// The broken rules found so far.
#[derive(Default)]
struct Rules(Vec<Violation>);

impl Rules {
    fn bad(&mut self, field: &'static str, description: String) {
        self.0.push(Violation { field, description });
    }

    fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() { Ok(()) } else { Err(Invalid::Rules(self.0)) }
    }

    fn text(&mut self, field: &'static str, text: &str) {
        if text.chars().count() > MAX_PROMPT_CHARS {
            self.bad(field, format!("{field} must be at most {MAX_PROMPT_CHARS} characters."));
        }
        if text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')) {
            self.bad(field, format!("{field} must not contain control characters."));
        }
    }

    fn url(&mut self, field: &'static str, url: &str, schemes: &[&str]) {
        match reqwest::Url::parse(url) {
            Ok(parsed)
                if url.len() <= 2048 && schemes.contains(&parsed.scheme()) && parsed.host_str().is_some() => {
            }
            Ok(_) | Err(_) => {
                self.bad(field, format!("{field} must be an absolute {} URL.", schemes.join(" or ")))
            }
        }
    }

    /// The photo from a URL or an object already stored; a request needs a photo, a prompt or both.
    fn photo(
        &mut self,
        url: Option<String>,
        stored: Option<String>,
        has_prompt: bool,
    ) -> Option<PhotoSource> {
        let url = url.filter(|u| !u.trim().is_empty());
        if let Some(url) = &url {
            self.url("initial_image_url", url, &["https", "http", "s3"]);
        }
        match (url, stored) {
            (Some(_), Some(_)) => {
                self.bad("initial_image_url", "Give the photo as a URL or as a file, not both.".into());
                None
            }
            (Some(url), None) => Some(PhotoSource::Url(url)),
            (None, Some(key)) => Some(PhotoSource::Stored { key }),
            (None, None) => {
                if !has_prompt {
                    self.bad("initial_image_url", "Provide initial_image_url, prompt, or both.".into());
                }
                None
            }
        }
    }

    /// The mask from one of its four fields, and how to use it; the options need a mask and a
    /// mask needs a photo.
    fn mask(&mut self, m: Masking, has_photo: bool) -> Option<MaskRequest> {
        const MASK_FIELDS: &str = "mask_image_url, mask_image, keep or repaint";
        let url = m.url.filter(|u| !u.trim().is_empty());
        if let Some(url) = &url {
            self.url("mask_image_url", url, &["https", "http", "s3"]);
        }
        let mut sources = Vec::new();
        if let Some(url) = url {
            sources.push(("mask_image_url", MaskSource::Image(PhotoSource::Url(url))));
        }
        if let Some(key) = m.stored {
            sources.push(("mask_image", MaskSource::Image(PhotoSource::Stored { key })));
        }
        for (field, items, make) in [
            ("keep", m.keep, MaskSource::Keep as fn(Vec<String>) -> MaskSource),
            ("repaint", m.repaint, MaskSource::Repaint),
        ] {
            let Some(items) = items else { continue };
            if items.is_empty() || items.len() > MAX_MASK_ITEMS {
                self.bad(field, format!("{field} must list 1 to {MAX_MASK_ITEMS} item names."));
            } else if items.iter().any(|i| i.trim().is_empty() || i.chars().count() > 64) {
                self.bad(field, format!("{field} item names must be 1 to 64 characters."));
            }
            sources.push((field, make(items.iter().map(|i| i.trim().to_lowercase()).collect())));
        }
        let blur = m.blur.unwrap_or(0.0);
        if !(blur.is_finite() && (0.0..=f64::from(MAX_MASK_BLUR)).contains(&blur)) {
            self.bad("mask_blur", format!("mask_blur must be between 0 and {MAX_MASK_BLUR}."));
        }
        let padding_crop = m.padding_crop.and_then(|pad| {
            if (0..=4096).contains(&pad) {
                Some(pad as u32)
            } else {
                self.bad("padding_mask_crop", "padding_mask_crop must be between 0 and 4096.".into());
                None
            }
        });
        let optioned = [
            ("preserve_unmasked", m.preserve_unmasked.is_some()),
            ("mask_blur", m.blur.is_some()),
            ("padding_mask_crop", m.padding_crop.is_some()),
        ];
        if sources.len() > 1 {
            let given: Vec<&str> = sources.iter().map(|(field, _)| *field).collect();
            self.bad(sources[1].0, format!("Give one mask, not {}.", given.join(" and ")));
            return None;
        }
        let Some((field, source)) = sources.pop() else {
            for (field, given) in optioned {
                if given {
                    self.bad(field, format!("{field} needs a mask: send {MASK_FIELDS}."));
                }
            }
            return None;
        };
        if !has_photo {
            self.bad(
                field,
                format!("{field} needs a photo to repaint: send initial_image_url or initial_image."),
            );
        }
        Some(MaskRequest {
            source,
            blur: blur as f32,
            padding_crop,
            preserve_unmasked: m.preserve_unmasked.unwrap_or(false),
        })
    }

    fn resize_mode(&mut self, name: &str) -> ResizeMode {
        ResizeMode::parse(name).unwrap_or_else(|| {
            let known: Vec<&str> = ResizeMode::ALL.iter().map(|m| m.as_str()).collect();
            self.bad("resize_mode", format!("resize_mode must be one of {}.", known.join(", ")));
            ResizeMode::default()
        })
    }

    fn priority(&mut self, name: &str) -> Priority {
        Priority::parse(name).unwrap_or_else(|| {
            let known: Vec<&str> = Priority::ALL.iter().map(|p| p.as_str()).collect();
            self.bad("priority", format!("priority must be one of {}.", known.join(", ")));
            Priority::default()
        })
    }

    fn strength(&mut self, strength: f64) {
        if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
            self.bad("strength", "strength must be greater than 0 and at most 1.".into());
        }
    }

    fn guidance(&mut self, guidance: f64) {
        if !guidance.is_finite() {
            self.bad("guidance_scale", "Guidance scale must be a finite number.".into());
        } else if guidance < 0.0 {
            self.bad("guidance_scale", "Guidance scale cannot be negative.".into());
        } else if guidance > f64::from(MAX_GUIDANCE) {
            self.bad("guidance_scale", format!("Guidance scale must be at most {MAX_GUIDANCE}."));
        }
    }

    fn side(&mut self, field: &'static str, value: Option<i64>, multiple: u32, max_side: u32) -> Option<u32> {
        let side = value?;
        if side < 64 || side > i64::from(max_side) || side % i64::from(multiple) != 0 {
            self.bad(field, format!("{field} must be a multiple of {multiple} between 64 and {max_side}."));
            return None;
        }
        Some(side as u32)
    }

    /// The model `name` names, or the default one; an unknown name is a broken rule (and the
    /// default model stands in for the other checks).
    fn model<'a>(&mut self, name: Option<&str>, info: &'a PipelineInfo) -> &'a SdModelInfo {
        if let Some(model) = info.sd_model(name) {
            return model;
        }
        let known = info.sd_model_names().join(", ");
        self.bad("model", format!("Unknown model '{}'; choose one of: {known}.", name.unwrap_or_default()));
        info.default_model()
    }

    /// Schedulers that run at most so many steps on this model (LCM: the distillation schedule).
    fn steps_for_scheduler(&mut self, steps: i64, scheduler: &str, model: &SdModelInfo) {
        if let Some(&max) = model.scheduler_max_steps.get(scheduler)
            && steps > i64::from(max)
        {
            self.bad(
                "num_inference_steps",
                format!(
                    "num_inference_steps must be at most {max} with the {scheduler} scheduler on this model."
                ),
            );
        }
    }

    /// The scheduler `name` names, when the model offers it.
    fn scheduler(&mut self, name: &str, model: &SdModelInfo) -> Option<SchedulerKind> {
        let offered = model.schedulers.iter().any(|s| s == name);
        match name.parse::<SchedulerKind>() {
            Ok(kind) if offered => Some(kind),
            Ok(_) | Err(_) => {
                let known = model.schedulers.join(", ");
                self.bad("scheduler", format!("Unknown scheduler '{name}'; choose one of: {known}."));
                None
            }
        }
    }

    /// The user's text without `<lora:…>` tags (none if nothing else is left) and the adapters to
    /// apply: the request's `loras`, then tags for adapters it does not name (a name in both keeps
    /// the request's weight; a tag given twice keeps the last).
    fn loras(
        &mut self,
        prompt: Option<&str>,
        requested: Vec<LoraInput>,
        adapters: &Adapters<'_>,
    ) -> (Option<String>, Vec<LoraWeight>) {
        let mut loras = Vec::new();
        for lora in requested {
            let weight = lora.weight.unwrap_or(1.0);
            self.lora("loras", &lora.name, weight, adapters);
            loras.push(LoraWeight { name: lora.name, weight: weight as f32 });
        }
        let Some(prompt) = prompt else { return (None, loras) };
        let tagged = match extract_prompt_loras(prompt) {
            Ok(tagged) => tagged,
            Err(reason) => {
                self.bad("prompt", format!("{reason}."));
                return (Some(prompt.to_string()), loras);
            }
        };
        let named = loras.len();
        for (name, weight) in tagged.loras {
            self.lora("prompt", &name, f64::from(weight), adapters);
            if !loras[..named].iter().any(|l| l.name == name) {
                loras.retain(|l| l.name != name);
                loras.push(LoraWeight { name, weight });
            }
        }
        (Some(tagged.text).filter(|t| !t.trim().is_empty()), loras)
    }

    fn lora(&mut self, field: &'static str, name: &str, weight: f64, adapters: &Adapters<'_>) {
        let (loras, max) = (&adapters.model.loras, adapters.max_weight);
        if let Err(reason) = check_name(name) {
            self.bad(field, format!("{reason}."));
        } else if !loras.iter().any(|l| l.name == name) {
            let known: Vec<&str> = loras.iter().map(|l| l.name.as_str()).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            self.bad(field, format!("Unknown LoRA '{name}'; known: {known}."));
        } else if !weight.is_finite() || weight.abs() > f64::from(max) {
            self.bad(field, format!("LoRA '{name}' weight must be between -{max} and {max}."));
        }
    }

    /// The units with their defaults filled in; each is checked against the ControlNets the
    /// pipeline has and must have a control image: its own, or canny's made from the photo.
    fn control(
        &mut self,
        units: Vec<ControlInput>,
        has_photo: bool,
        model: &SdModelInfo,
    ) -> Vec<ControlRequest> {
        if units.len() > MAX_CONTROL_UNITS {
            self.bad("control", format!("control may have at most {MAX_CONTROL_UNITS} units."));
        }
        units.into_iter().map(|unit| self.control_unit(unit, has_photo, model)).collect()
    }

    fn control_unit(&mut self, unit: ControlInput, has_photo: bool, model: &SdModelInfo) -> ControlRequest {
        let name = unit.control_type.as_str();
        match model.controlnets.iter().find(|c| c.control_type == name) {
            None if model.controlnets.is_empty() => {
                self.bad("control", "This model has no ControlNet; send control: [] or leave it out.".into())
            }
            None => {
                let known: Vec<&str> = model.controlnets.iter().map(|c| c.control_type.as_str()).collect();
                self.bad("control", format!("Unknown control type '{name}'; known: {}.", known.join(", ")));
            }
            Some(net) if unit.image_url.is_none() && !(net.from_photo && has_photo) => {
                let why = if net.from_photo { "a photo or an image_url" } else { "an image_url" };
                self.bad("control", format!("Control '{name}' needs {why} to make its control image from."));
            }
            Some(_) => {}
        }
        if let Some(url) = &unit.image_url {
            self.url("control", url, &["https", "http", "s3"]);
        }
        let scale = unit.scale.unwrap_or(DEFAULT_CONTROL_SCALE);
        if !(0.0..=f64::from(MAX_CONTROL_SCALE)).contains(&scale) {
            self.bad("control", format!("Control scale must be between 0 and {MAX_CONTROL_SCALE}."));
        }
        let (start, end) = (unit.guidance_start.unwrap_or(0.0), unit.guidance_end.unwrap_or(1.0));
        if !is_guidance_window(start, end) {
            self.bad("control", "Control guidance_start and guidance_end need 0 <= start < end <= 1.".into());
        }
        let (default_low, default_high) = DEFAULT_CANNY_THRESHOLDS;
        let low = unit.low_threshold.unwrap_or(default_low);
        let high = unit.high_threshold.unwrap_or(default_high);
        if name != CANNY && (unit.low_threshold.is_some() || unit.high_threshold.is_some()) {
            self.bad("control", "low_threshold and high_threshold are for canny only.".into());
        } else if !((0.0..=1000.0).contains(&low) && (0.0..=1000.0).contains(&high) && low <= high) {
            self.bad("control", "Canny thresholds need 0 <= low_threshold <= high_threshold <= 1000.".into());
        }
        ControlRequest {
            control_type: unit.control_type,
            scale,
            guidance_start: start,
            guidance_end: end,
            image_url: unit.image_url,
            low_threshold: low,
            high_threshold: high,
        }
    }

    fn webhook(&mut self, url: Option<&str>, events: &[String]) {
        if let Some(url) = url {
            self.url("webhook_url", url, &["https", "http"]);
        }
        if let Some(unknown) = events.iter().find(|e| !WEBHOOK_EVENTS.contains(&e.as_str())) {
            self.bad(
                "webhook_events",
                format!("Unknown webhook event '{unknown}'; use start, progress or completed."),
            );
        }
    }

    fn task_id(&mut self, id: &str) {
        let ok = (1..=128).contains(&id.len())
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.bad(
                "task_id",
                "task_id must be 1 to 128 characters of A-Z, a-z, 0-9, '-', '_' or '.'.".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::{DEFAULT_GUIDANCE, DEFAULT_STEPS};
    use crate::core::{ControlNetInfo, LoraInfo, SdModelDefaults};

    fn model() -> SdModelInfo {
        SdModelInfo {
            name: "tiny".into(),
            variant: "sd".into(),
            path: "models/tiny".into(),
            native_size: 256,
            size_multiple: 16,
            schedulers: vec!["ddim".into(), "euler".into()],
            defaults: SdModelDefaults {
                num_inference_steps: DEFAULT_STEPS,
                guidance_scale: DEFAULT_GUIDANCE,
                scheduler: "ddim".into(),
                height: 256,
                width: 256,
            },
            scheduler_max_steps: [("lcm".to_string(), 50)].into(),
            loras: ["cozy", "neon"]
                .map(|name| LoraInfo {
                    name: name.into(),
                    rank: 4,
                    target_modules: vec![],
                    trigger_words: vec![],
                })
                .to_vec(),
            controlnets: vec![
                ControlNetInfo { control_type: "canny".into(), from_photo: true },
                ControlNetInfo { control_type: "softedge".into(), from_photo: false },
            ],
            default_control: None,
            previews: "linear".into(),
            inpainting: false,
        }
    }

    const LIMITS: Limits = Limits { max_side: 1024, max_images: 4 };

    fn info() -> PipelineInfo {
        with_models(vec![model()])
    }

    fn with_models(sd_models: Vec<SdModelInfo>) -> PipelineInfo {
        PipelineInfo {
            models: vec![],
            sd_models,
            max_lora_weight: 2.0,
            negative_prompt: "blurry".into(),
            object_store: "file".into(),
            shopping_provider: "catalog".into(),
        }
    }

    fn parse(json: serde_json::Value) -> Result<(Option<String>, GenerateRequest), Invalid> {
        validate(serde_json::from_value(json).unwrap(), &LIMITS, &info())
    }

    fn ok(json: serde_json::Value) -> GenerateRequest {
        parse(json).expect("valid").1
    }

    /// The fields the request broke, in the order the rules run.
    fn broken(json: serde_json::Value) -> Vec<&'static str> {
        match parse(json) {
            Err(Invalid::Rules(violations)) => violations.iter().map(|v| v.field).collect(),
            other => panic!("expected broken rules, got {other:?}"),
        }
    }

    /// The descriptions of the broken rules.
    fn reasons(json: serde_json::Value) -> Vec<String> {
        match parse(json) {
            Err(Invalid::Rules(violations)) => violations.into_iter().map(|v| v.description).collect(),
            other => panic!("expected broken rules, got {other:?}"),
        }
    }

    #[test]
    fn a_mask_comes_from_one_field_needs_a_photo_and_carries_its_options() {
        let photo = "https://example.com/desk.jpg";
        let request = ok(serde_json::json!({"initial_image_url": photo, "keep": [" Laptop", "tv"],
            "preserve_unmasked": true, "mask_blur": 4, "padding_mask_crop": 16}));
        let mask = request.mask.expect("a mask");
        assert_eq!(mask.source, MaskSource::Keep(vec!["laptop".into(), "tv".into()]));
        assert_eq!((mask.blur, mask.padding_crop, mask.preserve_unmasked), (4.0, Some(16), true));
        let by_url = ok(
            serde_json::json!({"initial_image_url": photo, "mask_image_url": "https://example.com/m.png"}),
        );
        assert_eq!(
            by_url.mask.map(|m| (m.source, m.blur, m.padding_crop, m.preserve_unmasked)),
            Some((MaskSource::Image(PhotoSource::Url("https://example.com/m.png".into())), 0.0, None, false))
        );
        assert_eq!(ok(serde_json::json!({"initial_image_url": photo})).mask, None);

        assert_eq!(broken(serde_json::json!({"prompt": "a desk", "repaint": ["lamp"]})), ["repaint"]);
        assert_eq!(
            broken(serde_json::json!({"initial_image_url": photo, "keep": ["a"], "repaint": ["b"]})),
            ["repaint"]
        );
        assert_eq!(broken(serde_json::json!({"initial_image_url": photo, "keep": []})), ["keep"]);
        assert_eq!(
            broken(serde_json::json!({"initial_image_url": photo, "mask_image_url": "file:///m.png"})),
            ["mask_image_url"]
        );
        assert_eq!(
            broken(
                serde_json::json!({"initial_image_url": photo, "preserve_unmasked": true, "mask_blur": 2})
            ),
            ["preserve_unmasked", "mask_blur"]
        );
        assert_eq!(
            broken(serde_json::json!({"initial_image_url": photo, "keep": ["a"], "mask_blur": 65,
                "padding_mask_crop": -1})),
            ["mask_blur", "padding_mask_crop"]
        );
        assert_eq!(
            broken(
                serde_json::json!({"initial_image_url": photo, "keep": ["a"], "control": [{"type": "canny"}]})
            ),
            ["control"]
        );
        assert!(
            ok(serde_json::json!({"initial_image_url": photo, "keep": ["a"], "control": []})).mask.is_some()
        );
    }

    #[test]
    fn control_units_get_defaults_and_empty_turns_control_off() {
        let photo = "https://example.com/desk.jpg";
        let request = ok(serde_json::json!({"initial_image_url": photo, "control": [{"type": "canny"}]}));
        let unit = &request.control.expect("control given")[0];
        assert_eq!((unit.scale, unit.guidance_start, unit.guidance_end), (1.0, 0.0, 1.0));
        assert_eq!(
            (unit.low_threshold, unit.high_threshold, unit.image_url.as_deref()),
            (100.0, 200.0, None)
        );
        let off = ok(serde_json::json!({"initial_image_url": photo, "control": []}));
        assert_eq!(off.control, Some(vec![]));
        let own = ok(serde_json::json!({"prompt": "a desk", "control": [
            {"type": "softedge", "scale": 0.5, "guidance_end": 0.6, "image_url": "https://example.com/edges.png"}
        ]}));
        assert_eq!(own.control.unwrap()[0].guidance_end, 0.6);
    }

    #[test]
    fn bad_control_units_say_what_is_wrong() {
        let photo = "https://example.com/desk.jpg";
        let unknown =
            reasons(serde_json::json!({"initial_image_url": photo, "control": [{"type": "depth"}]}));
        assert_eq!(unknown, ["Unknown control type 'depth'; known: canny, softedge."]);
        let no_image =
            reasons(serde_json::json!({"initial_image_url": photo, "control": [{"type": "softedge"}]}));
        assert_eq!(no_image, ["Control 'softedge' needs an image_url to make its control image from."]);
        let no_photo = reasons(serde_json::json!({"prompt": "a desk", "control": [{"type": "canny"}]}));
        assert_eq!(
            no_photo,
            ["Control 'canny' needs a photo or an image_url to make its control image from."]
        );
        let fields = broken(serde_json::json!({"initial_image_url": photo, "control": [
            {"type": "canny", "scale": 3.0},
            {"type": "canny", "guidance_start": 0.5, "guidance_end": 0.5},
            {"type": "canny", "low_threshold": 300, "high_threshold": 200},
            {"type": "softedge", "image_url": "ftp://x/y.png", "low_threshold": 10},
            {"type": "canny"}
        ]}));
        assert_eq!(fields, ["control"; 6]);
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let request = ok(serde_json::json!({"prompt": "a desk"}));
        assert_eq!(request.num_inference_steps, DEFAULT_STEPS);
        assert_eq!(request.guidance_scale, DEFAULT_GUIDANCE);
        assert_eq!((request.strength, request.control.clone()), (None, None));
        assert_eq!(request.max_items_per_category, DEFAULT_ITEMS_PER_CATEGORY);
        assert_eq!((request.width, request.height, request.scheduler), (None, None, None));
        assert_eq!(request.user_text.as_deref(), Some("a desk"));
    }

    #[test]
    fn lcm_steps_are_capped_where_the_request_is_read() {
        let info =
            with_models(vec![SdModelInfo { schedulers: vec!["ddim".into(), "lcm".into()], ..model() }]);
        let parse = |json| validate(serde_json::from_value(json).unwrap(), &LIMITS, &info);
        let fields = |json| match parse(json) {
            Err(Invalid::Rules(violations)) => {
                violations.iter().map(|v| (v.field, v.description.clone())).collect()
            }
            other => panic!("expected broken rules, got {other:?}"),
        };
        let broken: Vec<(&str, String)> =
            fields(serde_json::json!({"prompt": "d", "scheduler": "lcm", "num_inference_steps": 51}));
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].0, "num_inference_steps");
        assert!(broken[0].1.contains("at most 50 with the lcm scheduler"), "{}", broken[0].1);
        assert!(
            parse(serde_json::json!({"prompt": "d", "scheduler": "lcm", "num_inference_steps": 50})).is_ok()
        );
        assert!(
            parse(serde_json::json!({"prompt": "d", "num_inference_steps": 51})).is_ok(),
            "ddim has no cap"
        );
        let mut lcm_model = info.clone();
        lcm_model.sd_models[0].defaults.scheduler = "lcm".into();
        let by_default = validate(
            serde_json::from_value(serde_json::json!({"prompt": "d", "num_inference_steps": 60})).unwrap(),
            &LIMITS,
            &lcm_model,
        );
        assert!(matches!(by_default, Err(Invalid::Rules(_))), "the model's default scheduler counts too");
    }

    #[test]
    fn a_few_step_model_s_defaults_fill_steps_and_guidance() {
        let mut turbo = info();
        turbo.sd_models[0].defaults.num_inference_steps = 1;
        turbo.sd_models[0].defaults.guidance_scale = 0.0;
        let parse = |json| validate(serde_json::from_value(json).unwrap(), &LIMITS, &turbo);
        let (_, request) = parse(serde_json::json!({"prompt": "a desk"})).unwrap();
        assert_eq!((request.num_inference_steps, request.guidance_scale), (1, 0.0));
        let (_, request) =
            parse(serde_json::json!({"prompt": "a desk", "num_inference_steps": 4, "guidance_scale": 1.5}))
                .unwrap();
        assert_eq!((request.num_inference_steps, request.guidance_scale), (4, 1.5));
    }

    #[test]
    fn a_named_model_brings_its_own_rules_and_an_unknown_one_is_refused() {
        let turbo = SdModelInfo {
            name: "turbo".into(),
            size_multiple: 8,
            defaults: SdModelDefaults { num_inference_steps: 1, guidance_scale: 0.0, ..model().defaults },
            loras: vec![],
            ..model()
        };
        let info = with_models(vec![model(), turbo]);
        let parse = |json| validate(serde_json::from_value(json).unwrap(), &LIMITS, &info);
        let (_, request) =
            parse(serde_json::json!({"prompt": "a desk", "model": "turbo", "width": 264})).unwrap();
        assert_eq!(request.model.as_deref(), Some("turbo"));
        assert_eq!((request.num_inference_steps, request.guidance_scale), (1, 0.0));
        let (_, request) = parse(serde_json::json!({"prompt": "a desk"})).unwrap();
        assert_eq!((request.model, request.num_inference_steps), (None, DEFAULT_STEPS));
        let violations = match parse(
            serde_json::json!({"prompt": "a desk", "model": "turbo", "loras": [{"name": "cozy"}]}),
        ) {
            Err(Invalid::Rules(v)) => v,
            other => panic!("expected broken rules, got {other:?}"),
        };
        assert_eq!(violations[0].field, "loras", "cozy fits the default model only");
        let violations = match parse(serde_json::json!({"prompt": "a desk", "model": "sdxl"})) {
            Err(Invalid::Rules(v)) => v,
            other => panic!("expected broken rules, got {other:?}"),
        };
        assert_eq!(violations.len(), 1);
        assert_eq!(
            (violations[0].field, violations[0].description.as_str()),
            ("model", "Unknown model 'sdxl'; choose one of: tiny, turbo.")
        );
    }

    #[test]
    fn preview_every_is_zero_to_the_step_limit() {
        assert_eq!(ok(serde_json::json!({"prompt": "a desk"})).preview_every, 5);
        assert_eq!(ok(serde_json::json!({"prompt": "a desk", "preview_every": 0})).preview_every, 0);
        assert_eq!(broken(serde_json::json!({"prompt": "a desk", "preview_every": -1})), ["preview_every"]);
        assert_eq!(broken(serde_json::json!({"prompt": "a desk", "preview_every": 151})), ["preview_every"]);
    }

    #[test]
    fn num_images_is_one_to_the_limit() {
        assert_eq!(ok(serde_json::json!({"prompt": "a desk"})).num_images, 1);
        assert_eq!(ok(serde_json::json!({"prompt": "a desk", "num_images": 4})).num_images, 4);
        assert_eq!(broken(serde_json::json!({"prompt": "a desk", "num_images": 5})), ["num_images"]);
        assert_eq!(
            reasons(serde_json::json!({"prompt": "a desk", "num_images": 0})),
            ["num_images must be between 1 and 4."]
        );
    }

    #[test]
    fn a_blank_prompt_is_its_own_error() {
        assert_eq!(
            parse(serde_json::json!({"prompt": "  ", "num_inference_steps": 0})).unwrap_err(),
            Invalid::EmptyPrompt
        );
    }

    #[test]
    fn texts_are_bounded_and_printable() {
        let long = "a".repeat(MAX_PROMPT_CHARS + 1);
        assert_eq!(broken(serde_json::json!({"prompt": long})), ["prompt"]);
        assert_eq!(
            broken(serde_json::json!({"prompt": "desk", "negative_prompt": "a\u{7}b"})),
            ["negative_prompt"]
        );
        ok(serde_json::json!({"prompt": "line one\nline two\ttabbed"}));
    }

    #[test]
    fn a_request_needs_a_photo_or_a_prompt() {
        assert_eq!(broken(serde_json::json!({})), ["initial_image_url"]);
        let request = ok(serde_json::json!({"initial_image_url": "s3://bucket/desk.jpg"}));
        assert_eq!(request.photo, Some(PhotoSource::Url("s3://bucket/desk.jpg".into())));
        assert_eq!(
            broken(serde_json::json!({"initial_image_url": "file:///etc/passwd"})),
            ["initial_image_url"]
        );
    }

    #[test]
    fn a_stored_photo_stands_for_the_url_but_not_beside_it() {
        let input =
            GenerateInput { stored_photo: Some("images/uploads/a.jpg".into()), ..GenerateInput::default() };
        let (_, request) = validate(input, &LIMITS, &info()).unwrap();
        assert_eq!(request.photo, Some(PhotoSource::Stored { key: "images/uploads/a.jpg".into() }));
        let both = GenerateInput {
            initial_image_url: Some("https://example.com/desk.jpg".into()),
            stored_photo: Some("images/uploads/a.jpg".into()),
            ..GenerateInput::default()
        };
        assert!(matches!(validate(both, &LIMITS, &info()), Err(Invalid::Rules(_))));
    }

    #[test]
    fn numbers_stay_in_range() {
        assert_eq!(
            broken(serde_json::json!({"prompt": "d", "num_inference_steps": MAX_STEPS + 1})),
            ["num_inference_steps"]
        );
        assert_eq!(broken(serde_json::json!({"prompt": "d", "guidance_scale": -1.0})), ["guidance_scale"]);
        assert_eq!(broken(serde_json::json!({"prompt": "d", "guidance_scale": 30.5})), ["guidance_scale"]);
        assert_eq!(broken(serde_json::json!({"prompt": "d", "strength": 0.0})), ["strength"]);
        assert_eq!(
            broken(serde_json::json!({"prompt": "d", "max_items_per_category": 11})),
            ["max_items_per_category"]
        );
    }

    #[test]
    fn sides_are_multiples_of_the_unets_step_within_the_limit() {
        let request = ok(serde_json::json!({"prompt": "d", "width": 352, "height": 176}));
        assert_eq!((request.width, request.height), (Some(352), Some(176)));
        assert_eq!(
            broken(serde_json::json!({"prompt": "d", "width": 360, "height": 1040})),
            ["height", "width"]
        );
    }

    #[test]
    fn the_scheduler_is_resolved_once_among_those_offered() {
        let request = ok(serde_json::json!({"prompt": "d", "scheduler": "euler"}));
        assert_eq!(request.scheduler, Some(SchedulerKind::Euler));
        // Known to the engine, but this pipeline does not offer it.
        assert_eq!(broken(serde_json::json!({"prompt": "d", "scheduler": "dpmpp_2m"})), ["scheduler"]);
        assert_eq!(broken(serde_json::json!({"prompt": "d", "scheduler": "plms"})), ["scheduler"]);
    }

    #[test]
    fn prompt_tags_leave_the_text_and_join_the_requested_adapters() {
        let request = ok(serde_json::json!({
            "prompt": "<lora:neon:0.5> a desk <lora:cozy:1.5> <lora:neon:0.7>",
            "loras": [{"name": "cozy", "weight": 0.3}],
        }));
        assert_eq!(
            request.user_text.as_deref().map(str::split_whitespace).map(Vec::from_iter),
            Some(vec!["a", "desk"])
        );
        let loras: Vec<(&str, f32)> = request.loras.iter().map(|l| (l.name.as_str(), l.weight)).collect();
        // The request's weight wins over a tag; of two tags the last wins.
        assert_eq!(loras, [("cozy", 0.3), ("neon", 0.7)]);
        let tags_only = ok(serde_json::json!({"prompt": "<lora:cozy:1>"}));
        assert_eq!(tags_only.user_text, None);
        assert_eq!(tags_only.prompt.as_deref(), Some("<lora:cozy:1>"));
    }

    #[test]
    fn adapters_must_be_known_and_weighted_within_the_limit() {
        assert_eq!(broken(serde_json::json!({"prompt": "d", "loras": [{"name": "../x"}]})), ["loras"]);
        assert_eq!(broken(serde_json::json!({"prompt": "d", "loras": [{"name": "retro"}]})), ["loras"]);
        assert_eq!(
            broken(serde_json::json!({"prompt": "d", "loras": [{"name": "cozy", "weight": 2.5}]})),
            ["loras"]
        );
        assert_eq!(broken(serde_json::json!({"prompt": "d <lora:retro:1>"})), ["prompt"]);
        assert_eq!(broken(serde_json::json!({"prompt": "d <lora:cozy:x>"})), ["prompt"]);
    }

    #[test]
    fn webhooks_need_an_http_url_and_known_events() {
        assert_eq!(
            broken(serde_json::json!({"prompt": "d", "webhook_url": "ftp://example.com/h"})),
            ["webhook_url"]
        );
        assert_eq!(
            broken(
                serde_json::json!({"prompt": "d", "webhook_url": "https://example.com/h", "webhook_events": ["done"]})
            ),
            ["webhook_events"]
        );
    }

    #[test]
    fn a_chosen_task_id_is_short_and_plain() {
        let (task_id, _) = parse(serde_json::json!({"prompt": "d", "task_id": "desk-1_a.b"})).unwrap();
        assert_eq!(task_id.as_deref(), Some("desk-1_a.b"));
        assert_eq!(broken(serde_json::json!({"prompt": "d", "task_id": "a/b"})), ["task_id"]);
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let fields = broken(
            serde_json::json!({"prompt": "d", "num_inference_steps": 0, "strength": 2.0, "task_id": ""}),
        );
        assert_eq!(fields, ["num_inference_steps", "strength", "task_id"]);
    }

    #[test]
    fn records_written_before_the_resolved_fields_still_read() {
        let old = serde_json::json!({
            "initial_image_url": "https://example.com/desk.jpg", "prompt": "a desk", "negative_prompt": null,
            "num_inference_steps": 20, "guidance_scale": 7.5, "height": null, "width": null, "strength": 0.75,
            "seed": 1, "scheduler": "euler", "loras": [], "webhook_url": null, "webhook_events": [],
            "max_items_per_category": 3,
        });
        let request: GenerateRequest = serde_json::from_value(old).unwrap();
        assert_eq!(request.photo, Some(PhotoSource::Url("https://example.com/desk.jpg".into())));
        assert_eq!(request.scheduler, Some(SchedulerKind::Euler));
        let back = serde_json::to_value(&request).unwrap();
        assert_eq!(back["initial_image_url"], "https://example.com/desk.jpg");
        assert_eq!(back["scheduler"], "euler");
        // Unset fields are left out, and read back as unset.
        assert!(back.get("negative_prompt").is_none() && back.get("loras").is_none());
        assert_eq!(serde_json::from_value::<GenerateRequest>(back).unwrap(), request);
    }
}
