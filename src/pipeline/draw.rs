//! The draw stage: Stable Diffusion from the prompt (and the photo), then the PNG into the store.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::{GrayImage, ImageEncoder, RgbImage};

use super::control::{Controls, Guidance};
use super::shape::{SizeRule, shape_photo};
use super::{RunContext, record_ms};
use crate::core::request::{DEFAULT_GUIDANCE, DEFAULT_STEPS, PREVIEW_MAX_SIDE};
use crate::core::{
    Failure, FailureCode, GenerateOutput, GenerateRequest, LoraInfo, ModelInfo, Preview, ResizeMode,
    SdModelDefaults, SdModelInfo,
};
use crate::inference::diffusion::lora::LoraOptions;
use crate::inference::diffusion::schedulers::img2img_start_index;
use crate::inference::diffusion::{
    DiffusionError, GenerateParams, InpaintMask, SchedulerKind, StableDiffusion, Step,
};
use crate::inference::{ExecutionProvider, ModelOwner, Runtime};
use crate::storage::ObjectStore;

/// What a Stable Diffusion model is loaded with besides its folder.
pub struct PainterOptions<'a> {
    /// LoRA adapters that requests may name.
    pub loras: LoraOptions,
    /// ControlNets besides those in the model folder, as (type, folder).
    pub controlnets: &'a [(String, std::path::PathBuf)],
    /// A tiny decoder for previews, replacing the folder's own.
    pub preview_decoder: Option<&'a Path>,
    /// Largest image side in pixels.
    pub max_side: u32,
}

/// One Stable Diffusion model and where its images go.
pub struct Painter {
    /// The loaded Stable Diffusion pipeline, on its owner thread.
    pub diffusion: ModelOwner<StableDiffusion>,
    /// The folder it was loaded from.
    pub dir: std::path::PathBuf,
    /// "sd" or "sdxl".
    pub variant: &'static str,
    /// The LoRA adapters that fit it.
    pub loras: Vec<LoraInfo>,
    /// The control types it has ControlNets for, sorted.
    pub control_types: Vec<String>,
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
    /// How its previews are drawn: "decoder", "linear" or "none".
    pub previews: &'static str,
    /// Whether the UNet is an inpainting one.
    pub inpainting: bool,
    /// Where generated PNGs are stored.
    pub store: Arc<dyn ObjectStore>,
}

/// The images a drawing starts from: the photo and the inpainting mask, each at the photo's size.
pub struct Images {
    /// The photo; none for text-to-image.
    pub photo: Option<RgbImage>,
    /// What to repaint of it; none repaints it all.
    pub mask: Option<InpaintMask>,
}

/// The PNGs of a drawing: the images, and the mask they were made with.
struct Drawn {
    pngs: Vec<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

/// The texts the diffusion model is given.
pub struct Prompts {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative: String,
}

impl Painter {
    /// Loads the model in `dir` with the adapters and ControlNets of `options`; on CUDA, runs it
    /// once so the first request does not pay cuDNN's algorithm search. Blocking.
    pub fn load(
        runtime: &Runtime,
        dir: &Path,
        options: &PainterOptions<'_>,
        store: Arc<dyn ObjectStore>,
    ) -> anyhow::Result<Painter> {
        let mut diffusion = StableDiffusion::load(runtime, dir)?;
        for (control_type, dir) in options.controlnets {
            diffusion.load_controlnet(control_type, dir)?;
        }
        if let Some(dir) = options.preview_decoder {
            diffusion.load_preview_decoder(dir)?;
        }
        for rejected in diffusion.load_loras(&options.loras)? {
            tracing::warn!(path = %rejected.path.display(), error = %rejected.error, "LoRA adapter skipped");
        }
        if runtime.for_model("unet").provider() == ExecutionProvider::Cuda {
            // The first run of each shape on CUDA searches cuDNN's algorithms (about a second):
            // pay it here, before health reports SERVING, not in the first request.
            let timings = diffusion.warm_up()?;
            tracing::info!(
                unet_ms = timings.unet_ms,
                vae_ms = timings.vae_ms,
                "diffusion pipeline warmed up"
            );
        }
        Ok(Painter {
            dir: diffusion.config().dir.clone(),
            variant: diffusion.config().family.as_str(),
            loras: lora_list(&diffusion),
            control_types: diffusion.control_types().into_iter().map(str::to_string).collect(),
            size_rule: SizeRule {
                native: diffusion.native_size().0,
                multiple: diffusion.config().size_multiple as u32,
                max_side: options.max_side,
            },
            default_scheduler: diffusion.default_scheduler(),
            default_steps: diffusion.defaults().num_inference_steps.unwrap_or(DEFAULT_STEPS),
            default_guidance: diffusion.defaults().guidance_scale.unwrap_or(DEFAULT_GUIDANCE),
            scheduler_max_steps: scheduler_max_steps(&diffusion),
            previews: diffusion.preview_kind(),
            inpainting: diffusion.config().is_inpainting(),
            diffusion: ModelOwner::spawn("diffusion", diffusion)?,
            store,
        })
    }

    /// The model as /info's `sd_models` lists it, named `name`.
    pub fn describe(&self, name: &str, controls: &Controls) -> SdModelInfo {
        let native = self.size_rule.native;
        SdModelInfo {
            name: name.to_string(),
            variant: self.variant.to_string(),
            path: self.dir.display().to_string(),
            native_size: native,
            size_multiple: self.size_rule.multiple,
            schedulers: SchedulerKind::ALL.iter().map(|s| s.as_str().to_string()).collect(),
            defaults: SdModelDefaults {
                num_inference_steps: self.default_steps,
                guidance_scale: self.default_guidance,
                scheduler: self.default_scheduler.as_str().to_string(),
                height: native,
                width: native,
            },
            scheduler_max_steps: self.scheduler_max_steps.clone(),
            loras: self.loras.clone(),
            controlnets: controls.info(&self.control_types),
            default_control: controls.default_info(&self.control_types),
            previews: self.previews.to_string(),
            inpainting: self.inpainting,
        }
    }

    /// The model's folder as the /info model list shows it, with the sha256 of its UNet.
    pub fn model_info(&self, id: String, provider: &str) -> anyhow::Result<ModelInfo> {
        Ok(ModelInfo {
            id,
            path: self.dir.display().to_string(),
            sha256: crate::inference::sha256_file(&self.dir.join("unet/model.onnx"))?,
            size_bytes: dir_size(&self.dir),
            execution_provider: provider.to_string(),
        })
    }

    /// Draws the image and stores it, recording the prompts, the seed and the URL in `output`. A
    /// model failure becomes a warning (the task still returns its shopping links); a failed
    /// upload, an invalid size or a cancellation fails the task.
    pub async fn draw(
        &self,
        request: &GenerateRequest,
        prompts: Prompts,
        images: Images,
        guidance: &Guidance<'_>,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<(), Failure> {
        let seed = request.seed.unwrap_or_else(rand::random);
        output.prompt_used = Some(prompts.prompt.clone());
        output.negative_prompt_used = Some(prompts.negative.clone());
        output.seed = Some(seed);
        let mode = request.resize_mode;
        let Images { photo, mask } = images;
        let (width, height) = self.size_rule.output_size(
            photo.as_ref().map(RgbImage::dimensions),
            mode,
            request.width,
            request.height,
        );
        let photo = photo.map(|photo| shape_photo(&photo, mode, width, height));
        let mask =
            mask.map(|mask| InpaintMask { image: shape_mask(&mask.image, mode, width, height), ..mask });
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
            mask,
        };
        output.control = guidance.used();
        ctx.progress("diffusion", 0, steps_to_run(&params));
        let batch = Batch { count: request.num_images as usize, preview_every: request.preview_every };
        match self.generate(params, batch, output, ctx).await {
            Ok(Drawn { pngs, mask }) => {
                let urls = self.upload(pngs, output, ctx).await?;
                output.processed_image_url = urls.first().cloned();
                output.processed_image_urls = urls;
                if let Some(mask) = mask {
                    output.mask_url = Some(self.upload_mask(mask, output, ctx).await?);
                }
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

    /// Runs the diffusion pipeline for `count` images in one batch and encodes them as PNGs on the
    /// models' thread, recording the stage timings.
    async fn generate(
        &self,
        params: GenerateParams,
        batch: Batch,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<Drawn, DiffusionError> {
        let with_loras = !params.loras.is_empty();
        let with_control = !params.control.is_empty();
        let step_ctx = ctx.clone();
        let (generated, drawn, encode_ms) = self
            .diffusion
            .run(move |diffusion| {
                let (width, height) = (params.width, params.height);
                let mut failed_preview = false;
                let generated = diffusion.generate_batch(&params, batch.count, &mut |mut step| {
                    step_ctx.progress("diffusion", step.done, step.total);
                    if batch.preview_every > 0
                        && step.done % batch.preview_every == 0
                        && !failed_preview
                        && step_ctx.previews_wanted()
                    {
                        match preview_of(&mut step, width, height) {
                            Some(Ok(preview)) => {
                                step_ctx.preview(preview);
                                metrics::counter!("deskgen_previews_total").increment(1);
                            }
                            Some(Err(e)) => {
                                // The image matters, not its previews: stop making them.
                                tracing::warn!(task_id = step_ctx.id(), error = %e, "preview failed");
                                failed_preview = true;
                            }
                            None => {}
                        }
                    }
                    if step_ctx.check().is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                })?;
                let started = Instant::now();
                let pngs = generated.iter().map(|g| encode_png(&g.image)).collect::<Vec<_>>();
                let mask = generated[0].mask.as_ref().map(encode_gray_png);
                let drawn = Drawn { pngs, mask };
                Ok::<_, DiffusionError>((generated, drawn, started.elapsed().as_secs_f64() * 1000.0))
            })
            .await
            .map_err(|e| DiffusionError::Inference { model: "pipeline", reason: e.to_string() })??;
        let stages = generated[0].timings;
        let timings = &mut output.timings_ms;
        if with_loras {
            timings.insert("lora".into(), stages.lora_ms);
        }
        timings.insert("text_encode".into(), stages.text_encode_ms);
        timings.insert("unet".into(), stages.unet_ms);
        if with_control {
            timings.insert("controlnet".into(), stages.controlnet_ms);
        }
        timings.insert("vae".into(), stages.vae_ms);
        timings.insert("encode_png".into(), encode_ms);
        let ms = |ms: f64| std::time::Duration::from_secs_f64(ms / 1000.0);
        let merge = if with_loras { Some(("lora", ms(stages.lora_ms))) } else { None };
        let spans: Vec<(&str, std::time::Duration)> = merge
            .into_iter()
            .chain([
                ("text_encode", ms(stages.text_encode_ms)),
                // ControlNet runs inside the loop, step by step with the UNet.
                ("unet", ms(stages.unet_ms + stages.controlnet_ms)),
                ("vae", ms(stages.vae_ms)),
                ("encode_png", ms(encode_ms)),
            ])
            .collect();
        crate::telemetry::back_to_back(&spans, std::time::SystemTime::now());
        Ok(drawn)
    }

    /// Stores the mask beside the first image (`<image key>` with `-mask.png`) and returns its URL.
    async fn upload_mask(
        &self,
        png: Vec<u8>,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<String, Failure> {
        let first = output.processed_image_url.as_deref().and_then(|url| self.store.key_for_url(url));
        let key = match first {
            Some(key) => format!("{}-mask.png", key.trim_end_matches(".png")),
            None => crate::storage::new_image_key().replace(".png", "-mask.png"),
        };
        self.store.put_image(&key, Bytes::from(png)).await.map_err(|e| {
            tracing::warn!(task_id = ctx.id(), error = %e, "mask upload failed");
            Failure::new(FailureCode::S3UploadFailed, "Failed to upload the mask to S3.")
        })
    }

    /// Stores the PNGs in order, each under a key of its own, and returns their URLs.
    async fn upload(
        &self,
        pngs: Vec<Vec<u8>>,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<Vec<String>, Failure> {
        let started = Instant::now();
        let total = pngs.len() as u32;
        let mut urls = Vec::with_capacity(pngs.len());
        for (done, png) in pngs.into_iter().enumerate() {
            ctx.progress("upload", done as u32, total);
            let key = crate::storage::new_image_key();
            let url = self.store.put_image(&key, Bytes::from(png)).await.map_err(|e| {
                tracing::warn!(task_id = ctx.id(), error = %e, "upload failed");
                Failure::new(FailureCode::S3UploadFailed, "Failed to upload image to S3.")
            })?;
            urls.push(url);
        }
        record_ms(&mut output.timings_ms, "upload", started);
        Ok(urls)
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

/// What one generation draws: how many images, and the steps between previews (0: none).
#[derive(Debug, Clone, Copy)]
struct Batch {
    count: usize,
    preview_every: u32,
}

/// The JPEG preview of a step's first image, for a generation of `width` × `height`; `None` when
/// the model's latents have no preview.
pub fn preview_of(step: &mut Step<'_>, width: u32, height: u32) -> Option<Result<Preview, DiffusionError>> {
    let (width, height) = preview_size(width, height);
    let picture = step.preview(width, height)?;
    Some(picture.map(|picture| Preview { step: step.done, steps: step.total, jpeg: encode_jpeg(&picture) }))
}

/// A preview's size: half the image's, and smaller still where that would make its longer side
/// more than [`PREVIEW_MAX_SIDE`]; the shape is kept.
fn preview_size(width: u32, height: u32) -> (u32, u32) {
    let longer = u64::from(width.max(height)).max(1);
    let target = (longer / 2).clamp(1, u64::from(PREVIEW_MAX_SIDE));
    let scale = |side: u32| ((u64::from(side) * target) / longer).max(1) as u32;
    (scale(width), scale(height))
}

fn encode_jpeg(image: &RgbImage) -> bytes::Bytes {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(image)
        .expect("encoding to memory cannot fail");
    bytes::Bytes::from(jpeg)
}

fn encode_gray_png(image: &GrayImage) -> Vec<u8> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::L8)
        .expect("encoding to memory cannot fail");
    png
}

/// A mask shaped to the output as the photo is (it lines up with the shaped photo after).
fn shape_mask(mask: &GrayImage, mode: ResizeMode, width: u32, height: u32) -> GrayImage {
    let rgb = image::DynamicImage::ImageLuma8(mask.clone()).to_rgb8();
    let shaped = shape_photo(&rgb, mode, width, height);
    GrayImage::from_fn(width, height, |x, y| image::Luma([shaped.get_pixel(x, y)[0]]))
}

fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8)
        .expect("encoding to memory cannot fail");
    png
}

/// The adapters a request may name, as /info lists them.
fn lora_list(diffusion: &StableDiffusion) -> Vec<LoraInfo> {
    let Some(library) = diffusion.lora_library() else { return Vec::new() };
    library
        .adapters()
        .map(|a| LoraInfo {
            name: a.name.clone(),
            rank: a.rank as u32,
            target_modules: a.target_modules.clone(),
            trigger_words: a.trigger_words.clone(),
        })
        .collect()
}

/// The schedulers with a step bound of their own on this model, and that bound.
fn scheduler_max_steps(diffusion: &StableDiffusion) -> BTreeMap<String, u32> {
    let config = &diffusion.config().scheduler;
    let bounded =
        SchedulerKind::ALL.iter().filter_map(|kind| Some((kind.to_string(), kind.max_steps(config)?)));
    bounded.map(|(kind, max)| (kind, u32::try_from(max).unwrap_or(u32::MAX))).collect()
}

/// Total size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_size(&entry.path()),
            _ => entry.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_half_the_image_and_at_most_256_on_the_longer_side() {
        assert_eq!(preview_size(256, 256), (128, 128));
        assert_eq!(preview_size(320, 192), (160, 96));
        assert_eq!(preview_size(512, 512), (256, 256));
        assert_eq!(preview_size(1024, 768), (256, 192));
        assert_eq!(preview_size(1, 1), (1, 1));
    }
}
