//! Request validation shared by REST and gRPC: one input shape, one set of rules, one error list.

use serde::Deserialize;

use crate::inference::diffusion::lora::{check_name, extract_prompt_loras};
use crate::pipeline::PipelineInfo;
use crate::tasks::{LoraWeight, TaskRequest};

/// Defaults applied when a request leaves a field out.
pub const DEFAULT_STEPS: u32 = 50;
/// Default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE: f32 = 7.5;
/// Default img2img strength.
pub const DEFAULT_STRENGTH: f32 = 0.75;
/// Default offers per category.
pub const DEFAULT_ITEMS_PER_CATEGORY: u32 = 3;
/// Most denoising steps a request may ask for.
pub const MAX_STEPS: u32 = 150;
/// Largest guidance scale a request may ask for.
pub const MAX_GUIDANCE: f32 = 30.0;
/// Longest prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 10_000;
const WEBHOOK_EVENTS: [&str; 3] = ["start", "progress", "completed"];

/// A generation request as received, before validation (REST JSON and gRPC map onto it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateInput {
    /// Photo URL.
    pub initial_image_url: Option<String>,
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
    /// img2img strength.
    pub strength: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// Scheduler id.
    pub scheduler: Option<String>,
    /// LoRA adapters.
    pub loras: Option<Vec<LoraInput>>,
    /// Webhook target.
    pub webhook_url: Option<String>,
    /// Webhook events wanted.
    pub webhook_events: Option<Vec<String>>,
    /// Offers per category.
    pub max_items_per_category: Option<i64>,
    /// Client-chosen task id.
    pub task_id: Option<String>,
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
}

/// Checks `input` and fills in defaults; the task id is the client's, if it chose one.
pub fn validate(
    input: GenerateInput,
    limits: &Limits,
    info: &PipelineInfo,
) -> Result<(Option<String>, TaskRequest), Invalid> {
    let mut v = Vec::new();
    let mut bad = |field: &'static str, description: String| v.push(Violation { field, description });

    if let Some(prompt) = &input.prompt {
        if prompt.trim().is_empty() {
            return Err(Invalid::EmptyPrompt);
        }
        check_text(&mut bad, "prompt", prompt);
    }
    if let Some(negative) = &input.negative_prompt {
        check_text(&mut bad, "negative_prompt", negative);
    }
    let image_url = input.initial_image_url.filter(|u| !u.trim().is_empty());
    if image_url.is_none() && input.prompt.is_none() {
        bad("initial_image_url", "Provide initial_image_url, prompt, or both.".into());
    }
    if let Some(url) = &image_url {
        check_url(&mut bad, "initial_image_url", url, &["https", "http", "s3"]);
    }
    let steps = input.num_inference_steps.unwrap_or(i64::from(DEFAULT_STEPS));
    if !(1..=i64::from(MAX_STEPS)).contains(&steps) {
        bad("num_inference_steps", format!("num_inference_steps must be between 1 and {MAX_STEPS}."));
    }
    let guidance = input.guidance_scale.unwrap_or(f64::from(DEFAULT_GUIDANCE));
    if !guidance.is_finite() {
        bad("guidance_scale", "Guidance scale must be a finite number.".into());
    } else if guidance < 0.0 {
        bad("guidance_scale", "Guidance scale cannot be negative.".into());
    } else if guidance > f64::from(MAX_GUIDANCE) {
        bad("guidance_scale", format!("Guidance scale must be at most {MAX_GUIDANCE}."));
    }
    let multiple = i64::from(info.size_multiple.max(8));
    for (field, value) in [("height", input.height), ("width", input.width)] {
        if let Some(side) = value
            && (side < 64 || side > i64::from(limits.max_side) || side % multiple != 0)
        {
            bad(
                field,
                format!("{field} must be a multiple of {multiple} between 64 and {}.", limits.max_side),
            );
        }
    }
    let strength = input.strength.unwrap_or(f64::from(DEFAULT_STRENGTH));
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        bad("strength", "strength must be greater than 0 and at most 1.".into());
    }
    if let Some(name) = &input.scheduler
        && !info.schedulers.iter().any(|s| s == name)
    {
        bad(
            "scheduler",
            format!("Unknown scheduler '{name}'; choose one of: {}.", info.schedulers.join(", ")),
        );
    }
    let mut loras = Vec::new();
    let mut check_lora = |field: &'static str, name: &str, weight: f64| {
        let max = info.max_lora_weight;
        if let Err(reason) = check_name(name) {
            bad(field, format!("{reason}."));
        } else if !info.loras.iter().any(|l| l.name == name) {
            let known: Vec<&str> = info.loras.iter().map(|l| l.name.as_str()).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            bad(field, format!("Unknown LoRA '{name}'; known: {known}."));
        } else if !weight.is_finite() || weight.abs() > f64::from(max) {
            bad(field, format!("LoRA '{name}' weight must be between -{max} and {max}."));
        }
    };
    for lora in input.loras.unwrap_or_default() {
        let weight = lora.weight.unwrap_or(1.0);
        check_lora("loras", &lora.name, weight);
        loras.push(LoraWeight { name: lora.name, weight: weight as f32 });
    }
    // `<lora:name:weight>` in the prompt: checked here, taken out of the text by the pipeline.
    match input.prompt.as_deref().map(extract_prompt_loras) {
        Some(Ok(tagged)) => {
            for (name, weight) in &tagged.loras {
                check_lora("prompt", name, f64::from(*weight));
            }
        }
        Some(Err(reason)) => bad("prompt", format!("{reason}.")),
        None => {}
    }
    if let Some(url) = &input.webhook_url {
        check_url(&mut bad, "webhook_url", url, &["https", "http"]);
    }
    let events = input.webhook_events.unwrap_or_default();
    if let Some(unknown) = events.iter().find(|e| !WEBHOOK_EVENTS.contains(&e.as_str())) {
        bad(
            "webhook_events",
            format!("Unknown webhook event '{unknown}'; use start, progress or completed."),
        );
    }
    let per_category = input.max_items_per_category.unwrap_or(i64::from(DEFAULT_ITEMS_PER_CATEGORY));
    if !(1..=10).contains(&per_category) {
        bad("max_items_per_category", "max_items_per_category must be between 1 and 10.".into());
    }
    let task_id = match input.task_id {
        Some(id) => {
            let ok = (1..=128).contains(&id.len())
                && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                bad(
                    "task_id",
                    "task_id must be 1 to 128 characters of A-Z, a-z, 0-9, '-', '_' or '.'.".into(),
                );
            }
            Some(id)
        }
        None => None,
    };
    if !v.is_empty() {
        return Err(Invalid::Rules(v));
    }
    let side = |value: Option<i64>| value.map(|s| s as u32);
    Ok((
        task_id,
        TaskRequest {
            initial_image_url: image_url,
            prompt: input.prompt,
            negative_prompt: input.negative_prompt,
            num_inference_steps: steps as u32,
            guidance_scale: guidance as f32,
            height: side(input.height),
            width: side(input.width),
            strength: strength as f32,
            seed: input.seed,
            scheduler: input.scheduler,
            loras,
            webhook_url: input.webhook_url,
            webhook_events: events,
            max_items_per_category: per_category as u32,
        },
    ))
}

fn check_text(bad: &mut impl FnMut(&'static str, String), field: &'static str, text: &str) {
    if text.chars().count() > MAX_PROMPT_CHARS {
        bad(field, format!("{field} must be at most {MAX_PROMPT_CHARS} characters."));
    }
    if text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')) {
        bad(field, format!("{field} must not contain control characters."));
    }
}

fn check_url(bad: &mut impl FnMut(&'static str, String), field: &'static str, url: &str, schemes: &[&str]) {
    match reqwest::Url::parse(url) {
        Ok(parsed)
            if url.len() <= 2048 && schemes.contains(&parsed.scheme()) && parsed.host_str().is_some() => {}
        Ok(_) | Err(_) => bad(field, format!("{field} must be an absolute {} URL.", schemes.join(" or "))),
    }
}
