//! The draw stage: Stable Diffusion from the prompt (and the photo), then the PNG into the store.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::{ImageEncoder, RgbImage};

use super::control::Guidance;
use super::shape::{SizeRule, shape_photo};
use super::{RunContext, record_ms};
use crate::core::{Failure, FailureCode, GenerateOutput, GenerateRequest};
use crate::inference::ModelOwner;
use crate::inference::diffusion::schedulers::img2img_start_index;
use crate::inference::diffusion::{DiffusionError, GenerateParams, SchedulerKind, StableDiffusion};
use crate::storage::ObjectStore;

/// The diffusion engine and where its images go.
pub struct Painter {
    /// The loaded Stable Diffusion pipeline, on its owner thread.
    pub diffusion: ModelOwner<StableDiffusion>,
    /// The size a request gets when it names none: the model's, shaped by the photo.
    pub size_rule: SizeRule,
    /// The scheduler a request gets when it names none.
    pub default_scheduler: SchedulerKind,
    /// The steps a request gets when it sets none (filled in when it is parsed).
    pub default_steps: u32,
    /// The guidance scale a request gets when it sets none (filled in when it is parsed).
    pub default_guidance: f32,
    /// The most steps a scheduler runs on this model, for those with a bound (LCM).
    pub scheduler_max_steps: BTreeMap<String, u32>,
    /// Where generated PNGs are stored.
    pub store: Arc<dyn ObjectStore>,
}

/// The texts the diffusion model is given.
pub struct Prompts {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative: String,
}

impl Painter {
    /// Draws the image and stores it, recording the prompts, the seed and the URL in `output`. A
    /// model failure becomes a warning (the task still returns its shopping links); a failed
    /// upload, an invalid size or a cancellation fails the task.
    pub async fn draw(
        &self,
        request: &GenerateRequest,
        prompts: Prompts,
        photo: Option<RgbImage>,
        guidance: &Guidance<'_>,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<(), Failure> {
        let seed = request.seed.unwrap_or_else(rand::random);
        output.prompt_used = Some(prompts.prompt.clone());
        output.negative_prompt_used = Some(prompts.negative.clone());
        output.seed = Some(seed);
        let mode = request.resize_mode;
        let (width, height) = self.size_rule.output_size(
            photo.as_ref().map(RgbImage::dimensions),
            mode,
            request.width,
            request.height,
        );
        let photo = photo.map(|photo| shape_photo(&photo, mode, width, height));
        let control = guidance.units(photo.as_ref()).await?;
        let params = GenerateParams {
            prompt: prompts.prompt,
            negative_prompt: prompts.negative,
            num_inference_steps: request.num_inference_steps,
            guidance_scale: request.guidance_scale,
            width,
            height,
            strength: request.strength.unwrap_or(guidance.default_strength as f32),
            seed,
            scheduler: request.scheduler.unwrap_or(self.default_scheduler),
            init_image: photo,
            guidance_rescale: 0.0,
            loras: request.loras.iter().map(|l| (l.name.clone(), l.weight)).collect(),
            control,
        };
        output.control = guidance.used();
        ctx.progress("diffusion", 0, steps_to_run(&params));
        match self.generate(params, output, ctx).await {
            Ok(png) => {
                output.processed_image_url = Some(self.upload(png, output, ctx).await?);
                Ok(())
            }
            Err(DiffusionError::InvalidParams { field, reason }) => {
                Err(Failure::new(FailureCode::InvalidInput, format!("{field}: {reason}")))
            }
            Err(DiffusionError::Canceled) => {
                ctx.check()?;
                Err(Failure::canceled())
            }
            Err(e) => {
                tracing::warn!(task_id = ctx.id(), error = %e, "generation failed; falling back to shopping");
                output.warnings.push(format!("Image generation failed: {e}"));
                Ok(())
            }
        }
    }

    /// Runs the diffusion pipeline and encodes its image as PNG on the models' thread, recording
    /// the stage timings.
    async fn generate(
        &self,
        params: GenerateParams,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<Vec<u8>, DiffusionError> {
        let with_loras = !params.loras.is_empty();
        let with_control = !params.control.is_empty();
        let step_ctx = ctx.clone();
        let (generated, png, encode_ms) = self
            .diffusion
            .run(move |diffusion| {
                let generated = diffusion.generate(&params, &mut |done, total| {
                    step_ctx.progress("diffusion", done, total);
                    if step_ctx.check().is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                })?;
                let started = Instant::now();
                let png = encode_png(&generated.image);
                Ok::<_, DiffusionError>((generated, png, started.elapsed().as_secs_f64() * 1000.0))
            })
            .await
            .map_err(|e| DiffusionError::Inference { model: "pipeline", reason: e.to_string() })??;
        let timings = &mut output.timings_ms;
        if with_loras {
            timings.insert("lora".into(), generated.timings.lora_ms);
        }
        timings.insert("text_encode".into(), generated.timings.text_encode_ms);
        timings.insert("unet".into(), generated.timings.unet_ms);
        if with_control {
            timings.insert("controlnet".into(), generated.timings.controlnet_ms);
        }
        timings.insert("vae".into(), generated.timings.vae_ms);
        timings.insert("encode_png".into(), encode_ms);
        Ok(png)
    }

    async fn upload(
        &self,
        png: Vec<u8>,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<String, Failure> {
        ctx.progress("upload", 0, 1);
        let started = Instant::now();
        let key = crate::storage::new_image_key();
        let url = self.store.put_image(&key, Bytes::from(png)).await.map_err(|e| {
            tracing::warn!(task_id = ctx.id(), error = %e, "upload failed");
            Failure::new(FailureCode::S3UploadFailed, "Failed to upload image to S3.")
        })?;
        record_ms(&mut output.timings_ms, "upload", started);
        Ok(url)
    }
}

/// Denoising steps the request runs: img2img runs only the last `strength` of the schedule (at
/// least one step).
fn steps_to_run(params: &GenerateParams) -> u32 {
    let steps = params.num_inference_steps as usize;
    let to_run = match params.init_image {
        Some(_) => (steps - img2img_start_index(steps, params.strength)).max(1),
        None => steps,
    };
    to_run as u32
}

fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8)
        .expect("encoding to memory cannot fail");
    png
}
