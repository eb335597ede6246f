//! Text-to-image and image-to-image generation: prompt encoding, the denoising loop with
//! classifier-free guidance, and VAE encoding and decoding.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use image::{GrayImage, RgbImage};
use ndarray::{Array2, Array3, Array4, ArrayView4, ArrayViewMut4, Axis, Zip, concatenate, s};

use super::DiffusionError;
use super::config::{DiffusionConfig, ModelFamily, config_error};
use super::controlnet::{
    ControlNet, ControlUnit, MAX_CONTROL_SCALE, Residuals, acts_at, control_input, is_guidance_window,
};
use super::defaults::ModelDefaults;
use super::inpaint::{InpaintMask, Inpainting, MaskedLatents, Overlay};
use super::lora::{LoraError, LoraLibrary, LoraOptions, MergedCache, MergedModels, ModelPart, RejectedLora};
use super::mask::{MAX_MASK_BLUR, fit};
use super::noise::{BatchNoise, NoiseSource};
use super::preview::{LatentPreview, PreviewDecoder, PreviewSource};
use super::schedulers::{Scheduler, SchedulerKind, img2img_start_index};
use super::tensor::ModelTensor;
use super::text_encoder::TextEncoder;
use super::tokenizer::ClipTokenizer;
use super::unet::{StepCost, Unet, UnetBuffers, UnetConditioning, UnetGraph, time_ids};
use super::vae::VaeHalf;
use super::variant::{ExportManifest, resolve_variant};
use crate::inference::{InitializerOverrides, Runtime};

/// The most denoising steps a request may ask for.
pub const MAX_STEPS: u32 = 150;

/// The most images one generation makes in a batch.
pub const MAX_BATCH: usize = 4;

/// A loaded Stable Diffusion pipeline. Running it takes `&mut` access (an ONNX Runtime session runs
/// one call at a time); the service gives it one owner thread ([`crate::inference::ModelOwner`]).
pub struct StableDiffusion {
    config: DiffusionConfig,
    runtime: Runtime,
    tokenizers: Vec<ClipTokenizer>,
    text_encoders: Vec<TextEncoder>,
    unet: Unet,
    vae_encoder: Option<VaeHalf>,
    vae_decoder: VaeHalf,
    loras: Option<Loras>,
    control: Option<Control>,
    preview_decoder: Option<PreviewDecoder>,
}

/// The residual-input UNet and the ControlNets that feed it, sorted by control type.
struct Control {
    unet: Unet,
    nets: Vec<ControlNet>,
}

/// The adapters this pipeline can apply and the merged sessions built for recent requests.
struct Loras {
    library: LoraLibrary,
    cache: MergedCache<Unet, TextEncoder>,
}

/// Sessions with merged LoRA weights, `None` where the base session serves.
type Merged = MergedModels<Unet, TextEncoder>;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// What the image should show.
    pub prompt: String,
    /// What it should not show; may be empty.
    pub negative_prompt: String,
    /// Denoising steps of the full schedule, 1..=150 (image-to-image runs about `strength` of them).
    pub num_inference_steps: u32,
    /// Classifier-free guidance weight; 1 or less disables guidance (one UNet row per step).
    pub guidance_scale: f32,
    /// Output width in pixels, a multiple of 8.
    pub width: u32,
    /// Output height in pixels, a multiple of 8.
    pub height: u32,
    /// Image-to-image: how much of the photo to re-noise, in (0, 1]; 1 ignores the photo.
    pub strength: f32,
    /// Seed of all randomness; equal parameters and seed give identical images.
    pub seed: u64,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// The photo to start from; `None` for text-to-image.
    pub init_image: Option<RgbImage>,
    /// Rescales guided predictions toward the conditional one's spread (Lin et al. 2023), in [0, 1].
    pub guidance_rescale: f32,
    /// LoRA adapters (name, weight) merged into the UNet and text encoders for this generation;
    /// weight 0 leaves an adapter out, so an all-zero list runs the base model.
    pub loras: Vec<(String, f32)>,
    /// ControlNet guidance, summed over the units; empty for none.
    pub control: Vec<ControlUnit>,
    /// Inpainting: which part of `init_image` to repaint; `None` repaints all of it.
    pub mask: Option<InpaintMask>,
}

/// Milliseconds spent in each sub-model during one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Finding or building the sessions with merged LoRA weights (0 without adapters).
    pub lora_ms: f64,
    /// Tokenizing and text encoding.
    pub text_encode_ms: f64,
    /// All UNet steps, including the scheduler arithmetic between them.
    pub unet_ms: f64,
    /// The UNet session runs alone, summed over the steps.
    pub unet_run_ms: f64,
    /// The ControlNet runs, summed over the steps and units (part of `unet_ms`).
    pub controlnet_ms: f64,
    /// Copies of samples and predictions between host and GPU memory, summed over the steps (zero
    /// on the CPU).
    pub transfer_ms: f64,
    /// UNet steps run.
    pub steps: u32,
    /// VAE encoding (image-to-image) and decoding.
    pub vae_ms: f64,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The image, `width` × `height`.
    pub image: RgbImage,
    /// Where the time went.
    pub timings: Timings,
    /// The seed it was made with.
    pub seed: u64,
    /// Inpainting: the mask as applied to the image (white repainted), `width` × `height`.
    pub mask: Option<GrayImage>,
}

/// One finished denoising step, as `on_step` sees it.
pub struct Step<'a> {
    /// Steps done, 1 to `total`.
    pub done: u32,
    /// Steps this generation runs.
    pub total: u32,
    /// The batch's latents after the step, `[batch, channels, h, w]`, in the UNet's space.
    pub latents: ArrayView4<'a, f32>,
    /// The noise level they carry when the scheduler works in sigma (`x = x0 + sigma * noise`);
    /// `None` for the variance-preserving ones.
    pub sigma: Option<f32>,
    previews: Option<PreviewSource<'a>>,
}

impl Step<'_> {
    /// A picture of the first image's latents, `width` × `height`: the model's preview decoder's
    /// when it has one, else the linear latent-to-RGB map; `None` when the latents have neither.
    /// Made only when asked for.
    pub fn preview(&mut self, width: u32, height: u32) -> Option<Result<RgbImage, DiffusionError>> {
        let first = self.latents.index_axis(Axis(0), 0);
        Some(self.previews.as_mut()?.render(first, self.sigma, width, height))
    }
}

/// A generation before quantization to 8 bits, for comparing against reference tensors.
#[derive(Debug, Clone)]
pub struct Denoised {
    /// `[batch, height, width, 3]` in [0, 1] (diffusers' `output_type="np"`).
    pub image: Array4<f32>,
    /// The final latents, still multiplied by the VAE scaling factor.
    pub latents: Array4<f32>,
    /// Where the time went.
    pub timings: Timings,
    /// Inpainting: the mask as applied to the images, `width` × `height`.
    pub mask: Option<GrayImage>,
    /// How each image goes back over the photo once quantized (cropped or preserving inpainting).
    overlay: Option<Overlay>,
}

/// The text conditioning of one generation; with guidance the rows are (negative, prompt).
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// The UNet's `encoder_hidden_states`, `[rows, 77, hidden]`.
    pub prompt_embeds: Array3<f32>,
    /// SDXL: the second encoder's projected pooled output, `[rows, projection]`.
    pub pooled_prompt_embeds: Option<Array2<f32>>,
}

impl StableDiffusion {
    /// Loads the pipeline in `dir` (optimum's ONNX layout), building one session per sub-model.
    /// Without `vae_encoder/model.onnx` only text-to-image is available.
    pub fn load(runtime: &Runtime, dir: impl AsRef<Path>) -> Result<StableDiffusion, DiffusionError> {
        let dir = resolve_variant(dir.as_ref(), runtime.provider());
        let dir = dir.as_path();
        let config = DiffusionConfig::load(dir)?;
        let manifest = ExportManifest::load(dir)?;
        // Each sub-model on its own provider (`--cpu-models`), refused where its graph cannot run.
        let placed = |model: &str| -> Result<Runtime, DiffusionError> {
            let placed = runtime.for_model(model);
            manifest.check(dir, model, placed.provider())?;
            Ok(placed)
        };
        let (tokenizers, text_encoders) = load_text_encoders(&config, dir, &placed)?;
        let xl = config.family == ModelFamily::StableDiffusionXl;
        let unet = Unet::load(&placed("unet")?, dir, UnetGraph::Plain, xl, InitializerOverrides::default())?;
        let vae_encoder = if dir.join("vae_encoder/model.onnx").is_file() {
            Some(VaeHalf::encoder(&placed("vae_encoder")?, dir)?)
        } else {
            None
        };
        let vae_decoder = VaeHalf::decoder(&placed("vae_decoder")?, dir)?;
        tracing::info!(dir = %dir.display(), family = ?config.family, img2img = vae_encoder.is_some(), "diffusion pipeline loaded");
        let mut pipeline = StableDiffusion {
            config,
            runtime: runtime.clone(),
            tokenizers,
            text_encoders,
            unet,
            vae_encoder,
            vae_decoder,
            loras: None,
            control: None,
            preview_decoder: None,
        };
        for (control_type, net_dir) in bundled_controlnets(dir)? {
            pipeline.load_controlnet(&control_type, &net_dir)?;
        }
        let bundled_preview = dir.join("preview_decoder");
        if bundled_preview.is_dir() {
            pipeline.load_preview_decoder(&bundled_preview)?;
        }
        Ok(pipeline)
    }

    /// Draws previews with the TAESD-style tiny decoder in `dir` instead of the linear latent map.
    pub fn load_preview_decoder(&mut self, dir: &Path) -> Result<(), DiffusionError> {
        self.preview_decoder = Some(PreviewDecoder::load(&self.runtime.for_model("vae_decoder"), dir)?);
        tracing::info!(dir = %dir.display(), "preview decoder loaded");
        Ok(())
    }

    /// How steps draw their previews: "decoder" (the tiny decoder, which wins), "linear" (the
    /// latent-to-RGB map) or "none" (latents neither knows).
    pub fn preview_kind(&self) -> &'static str {
        match (&self.preview_decoder, LatentPreview::of(&self.config)) {
            (Some(_), _) => "decoder",
            (None, Some(_)) => "linear",
            (None, None) => "none",
        }
    }

    /// Makes the ControlNet in `dir` (`dir/model.onnx`) available as `control_type`, replacing one
    /// of that type; the first also loads the residual-input UNet (`unet_controlnet/`). A
    /// ControlNet that does not fit the UNet is refused here, not at a request.
    pub fn load_controlnet(&mut self, control_type: &str, dir: &Path) -> Result<(), DiffusionError> {
        let xl = self.config.family == ModelFamily::StableDiffusionXl;
        let runtime = self.runtime.for_model("unet").taking_turns();
        let net = ControlNet::load(&runtime, dir, control_type, xl)?;
        let control = match self.control.take() {
            Some(control) => control,
            None => {
                let unet = Unet::load(
                    &runtime,
                    &self.config.dir,
                    UnetGraph::Residual,
                    xl,
                    InitializerOverrides::default(),
                )?;
                Control { unet, nets: Vec::new() }
            }
        };
        let control = self.control.insert(control);
        net.check_fits(&control.unet, &dir.join("model.onnx"))?;
        control.nets.retain(|n| n.control_type() != control_type);
        control.nets.push(net);
        control.nets.sort_by(|a, b| a.control_type().cmp(b.control_type()));
        tracing::info!(control_type, dir = %dir.display(), "ControlNet loaded");
        Ok(())
    }

    /// The control types requests may name, sorted.
    pub fn control_types(&self) -> Vec<&str> {
        self.control.as_ref().map_or_else(Vec::new, |c| c.nets.iter().map(ControlNet::control_type).collect())
    }

    /// Makes the adapters in `options.dir` that fit this model available to requests (replacing any
    /// loaded before); returns the files that were left out, with the reason.
    pub fn load_loras(&mut self, options: &LoraOptions) -> Result<Vec<RejectedLora>, DiffusionError> {
        let (library, rejected) = LoraLibrary::scan(options, &self.config.dir, self.config.family)?;
        for adapter in library.adapters() {
            tracing::info!(name = %adapter.name, rank = adapter.rank, targets = ?adapter.target_modules, "LoRA adapter available");
        }
        self.loras = Some(Loras { library, cache: MergedCache::new(options.cache_size) });
        Ok(rejected)
    }

    /// The adapters requests may name, if any were loaded.
    pub fn lora_library(&self) -> Option<&LoraLibrary> {
        self.loras.as_ref().map(|l| &l.library)
    }

    /// How many sets of merged sessions are cached now.
    pub fn cached_lora_sets(&self) -> usize {
        self.loras.as_ref().map_or(0, |l| l.cache.len())
    }

    /// Runs one step at the native size with the model's default guidance, so that session set-up
    /// and CUDA's cuDNN algorithm search happen before the first request (on CUDA the first run of
    /// a shape takes about a second).
    pub fn warm_up(&mut self) -> Result<Timings, DiffusionError> {
        let (width, height) = self.native_size();
        let params = GenerateParams {
            prompt: "a desk".into(),
            negative_prompt: String::new(),
            num_inference_steps: 1,
            guidance_scale: self.config.defaults.guidance_scale.unwrap_or(7.5),
            width,
            height,
            strength: 1.0,
            seed: 0,
            scheduler: self.config.default_scheduler,
            init_image: None,
            guidance_rescale: 0.0,
            loras: Vec::new(),
            control: Vec::new(),
            mask: None,
        };
        Ok(self.generate(&params, &mut |_| ControlFlow::Continue(()))?.timings)
    }

    /// The size a request gets when it sets none, as (width, height): `deskgen-defaults.json`'s
    /// `size`, else the training resolution (512² for SD 1.x, 1024² for SDXL).
    pub fn native_size(&self) -> (u32, u32) {
        let trained = (self.config.sample_size * self.config.vae_scale_factor) as u32;
        let side = self.config.defaults.size.unwrap_or(trained);
        (side, side)
    }

    /// The model's own generation defaults (`deskgen-defaults.json`).
    pub fn defaults(&self) -> ModelDefaults {
        self.config.defaults
    }

    /// The scheduler a request gets when it names none.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.config.default_scheduler
    }

    /// Everything read from the model directory's configs.
    pub fn config(&self) -> &DiffusionConfig {
        &self.config
    }

    /// Whether image-to-image is available (the directory has a VAE encoder).
    pub fn supports_img2img(&self) -> bool {
        self.vae_encoder.is_some()
    }

    /// Generates an image, calling `on_step` after every denoising step; returning
    /// `ControlFlow::Break(())` stops with [`DiffusionError::Canceled`].
    pub fn generate(
        &mut self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Generated, DiffusionError> {
        let mut images = self.generate_batch(params, 1, on_step)?;
        Ok(images.remove(0))
    }

    /// Generates `count` images (1 to [`MAX_BATCH`]) in one UNet batch, image `i` from seed
    /// `params.seed + i`: each is the image a generation of one from that seed makes. They share
    /// the timings.
    pub fn generate_batch(
        &mut self,
        params: &GenerateParams,
        count: usize,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Vec<Generated>, DiffusionError> {
        let denoised = self.denoise_batch(params, count, on_step)?;
        let overlay = denoised.overlay.as_ref();
        let images = denoised.image.axis_chunks_iter(Axis(0), 1).map(to_rgb8).map(|image| match overlay {
            Some(overlay) => overlay.apply(&image),
            None => image,
        });
        let seeds = (0..count as u64).map(|i| params.seed.wrapping_add(i));
        let (timings, mask) = (denoised.timings, denoised.mask.clone());
        Ok(images
            .zip(seeds)
            .map(|(image, seed)| Generated { image, timings, seed, mask: mask.clone() })
            .collect())
    }

    /// The float images and final latents of [`StableDiffusion::generate_batch`], one row per
    /// image, for comparing against a generation of one.
    pub fn denoise_batch(
        &mut self,
        params: &GenerateParams,
        count: usize,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Denoised, DiffusionError> {
        self.validate(params)?;
        if !(1..=MAX_BATCH).contains(&count) {
            let reason = format!("must be between 1 and {MAX_BATCH}");
            return Err(DiffusionError::InvalidParams { field: "num_images", reason });
        }
        self.denoise(params, count, &mut BatchNoise::new(params.seed, count), on_step)
    }

    /// Generates with every Gaussian draw taken from `noise` instead of the seed's stream, in the
    /// order of the module docs (`params.seed` is ignored), and returns the float image and final
    /// latents: how a run recorded elsewhere is replayed.
    pub fn generate_with_noise(
        &mut self,
        params: &GenerateParams,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Denoised, DiffusionError> {
        self.validate(params)?;
        self.denoise(params, 1, noise, on_step)
    }

    /// Encodes the prompt (and with `guided` the negative prompt first) as the UNet sees it.
    pub fn encode_prompt(
        &mut self,
        prompt: &str,
        negative_prompt: &str,
        guided: bool,
    ) -> Result<PromptEmbeddings, DiffusionError> {
        let mut encoders: Vec<&mut TextEncoder> = self.text_encoders.iter_mut().collect();
        encode_texts(&self.config, &self.tokenizers, &mut encoders, prompt, negative_prompt, guided)
    }

    fn latent_shape(&self, params: &GenerateParams, batch: usize) -> (usize, usize, usize, usize) {
        let factor = self.config.vae_scale_factor;
        (batch, self.config.latent_channels, params.height as usize / factor, params.width as usize / factor)
    }

    fn validate(&self, params: &GenerateParams) -> Result<(), DiffusionError> {
        let invalid =
            |field: &'static str, reason: String| Err(DiffusionError::InvalidParams { field, reason });
        if !(1..=MAX_STEPS).contains(&params.num_inference_steps) {
            return invalid("num_inference_steps", format!("must be between 1 and {MAX_STEPS}"));
        }
        if let Some(max) = params.scheduler.max_steps(&self.config.scheduler)
            && params.num_inference_steps as usize > max
        {
            return invalid(
                "num_inference_steps",
                format!("{} runs at most {max} steps on this model", params.scheduler),
            );
        }
        let multiple = self.config.size_multiple;
        for (field, side) in [("width", params.width), ("height", params.height)] {
            if side == 0 || !side.is_multiple_of(8) {
                return invalid(field, format!("{side} is not a positive multiple of 8"));
            }
            if !(side as usize).is_multiple_of(multiple) {
                return invalid(
                    field,
                    format!("{side} is not a multiple of {multiple}, which this model's UNet needs"),
                );
            }
        }
        if !params.guidance_scale.is_finite() || params.guidance_scale < 0.0 {
            return invalid("guidance_scale", "must be a finite number, 0 or more".into());
        }
        if !(0.0..=1.0).contains(&params.guidance_rescale) {
            return invalid("guidance_rescale", "must be between 0 and 1".into());
        }
        self.validate_control(&params.control)?;
        self.validate_mask(params)?;
        if params.init_image.is_some() {
            if !(params.strength > 0.0 && params.strength <= 1.0) {
                return invalid("strength", "must be in (0, 1]".into());
            }
            if self.vae_encoder.is_none() {
                return Err(DiffusionError::MissingFile {
                    path: self.config.dir.join("vae_encoder/model.onnx"),
                });
            }
        }
        Ok(())
    }

    fn validate_mask(&self, params: &GenerateParams) -> Result<(), DiffusionError> {
        let inpainting = params.mask.is_some() || self.config.is_inpainting();
        if inpainting && !params.control.is_empty() {
            let reason = "ControlNet guidance and inpainting cannot be combined".to_string();
            return Err(DiffusionError::InvalidParams { field: "control", reason });
        }
        if let Some(mask) = &params.mask {
            let invalid = |field: &'static str, reason: &str| {
                Err(DiffusionError::InvalidParams { field, reason: reason.to_string() })
            };
            if params.init_image.is_none() {
                return invalid("mask_image", "a mask needs a photo to repaint");
            }
            if !(0.0..=MAX_MASK_BLUR).contains(&mask.blur) {
                return Err(DiffusionError::InvalidParams {
                    field: "mask_blur",
                    reason: format!("must be between 0 and {MAX_MASK_BLUR}"),
                });
            }
        }
        if inpainting && self.vae_encoder.is_none() {
            return Err(DiffusionError::MissingFile { path: self.config.dir.join("vae_encoder/model.onnx") });
        }
        Ok(())
    }

    fn validate_control(&self, units: &[ControlUnit]) -> Result<(), DiffusionError> {
        let invalid = |reason: String| Err(DiffusionError::InvalidParams { field: "control", reason });
        let known = self.control_types();
        for unit in units {
            if !known.contains(&unit.control_type.as_str()) {
                return invalid(if known.is_empty() {
                    "this model has no ControlNet".to_string()
                } else {
                    format!(
                        "unknown control type {:?}; this model has {}",
                        unit.control_type,
                        known.join(", ")
                    )
                });
            }
            if !(0.0..=MAX_CONTROL_SCALE).contains(&unit.scale) {
                return invalid(format!("scale must be between 0 and {MAX_CONTROL_SCALE}"));
            }
            if !is_guidance_window(f64::from(unit.guidance_start), f64::from(unit.guidance_end)) {
                return invalid("guidance_start and guidance_end must satisfy 0 <= start < end <= 1".into());
            }
        }
        Ok(())
    }

    fn denoise(
        &mut self,
        params: &GenerateParams,
        batch: usize,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Denoised, DiffusionError> {
        let denoised = self.denoise_with_sessions(params, batch, noise, on_step);
        if let Some(loras) = &mut self.loras {
            loras.cache.trim();
        }
        denoised
    }

    fn denoise_with_sessions(
        &mut self,
        params: &GenerateParams,
        batch: usize,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
    ) -> Result<Denoised, DiffusionError> {
        let latent_shape = self.latent_shape(params, batch);
        let StableDiffusion {
            config,
            runtime,
            tokenizers,
            text_encoders,
            unet,
            vae_encoder,
            vae_decoder,
            loras,
            control,
            preview_decoder,
        } = self;
        let mut timings = Timings::default();
        let started = Instant::now();
        let controlled = control.is_some() && !params.control.is_empty();
        let merged = merged(loras.as_mut(), &params.loras, controlled, config, runtime, text_encoders)?;
        let mut active = Active::of(unet, text_encoders, merged);
        timings.lora_ms = elapsed_ms(started);
        let started = Instant::now();
        let guided = params.guidance_scale > 1.0;
        let embeddings = encode_texts(
            config,
            tokenizers,
            &mut active.text_encoders,
            &params.prompt,
            &params.negative_prompt,
            guided,
        )?;
        timings.text_encode_ms = elapsed_ms(started);

        let mut scheduler = params.scheduler.build(&config.scheduler);
        scheduler.set_timesteps(params.num_inference_steps as usize);
        let started = Instant::now();
        let mut initial_noise = Array4::zeros(latent_shape);
        noise.fill(initial_noise.view_mut());
        let inpainting = Inpainting::prepare(
            params.init_image.as_ref(),
            params.mask.as_ref(),
            config.is_inpainting(),
            (params.width, params.height),
        )?;
        let (mut latents, start, masked) = match &inpainting {
            Some(inpainting) => inpaint_latents(
                scheduler.as_mut(),
                vae_encoder.as_mut(),
                config,
                initial_noise,
                inpainting,
                params,
            )?,
            None => {
                let (latents, start) = initial_latents(
                    scheduler.as_mut(),
                    vae_encoder.as_mut(),
                    config,
                    initial_noise.view(),
                    params,
                )?;
                (latents, start, None)
            }
        };
        timings.vae_ms += elapsed_ms(started);

        let started = Instant::now();
        let schedule = Schedule { scheduler: scheduler.as_mut(), start, noise };
        let control = control.as_mut().filter(|_| controlled).map(|Control { unet, nets }| ControlSessions {
            unet: active.residual_unet.take().unwrap_or(unet),
            nets,
        });
        let unets = Unets { plain: active.unet, control };
        let previews = Previews { decoder: preview_decoder.as_mut(), linear: LatentPreview::of(config) };
        let steps =
            Steps { schedule, masked: masked.as_ref(), previews, unet_in_channels: config.unet_in_channels };
        let cost = run_steps(unets, embeddings, steps, &mut latents, params, on_step)?;
        timings.unet_run_ms = cost.run_ms;
        timings.controlnet_ms = cost.controlnet_ms;
        timings.transfer_ms = cost.transfer_ms;
        timings.steps = cost.steps;
        timings.unet_ms = elapsed_ms(started);

        let started = Instant::now();
        // One image at a time: the decoder's activations are the largest tensors of a generation.
        let mut decoded = Vec::with_capacity(batch);
        for row in latents.axis_chunks_iter(Axis(0), 1) {
            decoded.push(vae_decoder.decode(row.mapv(|l| l / config.vae_scaling_factor).view())?);
        }
        let views: Vec<_> = decoded.iter().map(|image| image.view()).collect();
        let decoded = ndarray::concatenate(Axis(0), &views).expect("decoded images share a shape");
        let image = decoded.permuted_axes([0, 2, 3, 1]).mapv(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0));
        timings.vae_ms += elapsed_ms(started);
        let (mask, overlay) = match inpainting {
            Some(Inpainting { shown, overlay, .. }) => (params.mask.as_ref().map(|_| shown), overlay),
            None => (None, None),
        };
        Ok(Denoised { image, latents, timings, mask, overlay })
    }
}

/// The latents before the first step and that step's index: the scaled noise (text-to-image), or
/// the encoded photo noised to where `strength` starts.
fn initial_latents(
    scheduler: &mut dyn Scheduler,
    vae_encoder: Option<&mut VaeHalf>,
    config: &DiffusionConfig,
    noise: ArrayView4<'_, f32>,
    params: &GenerateParams,
) -> Result<(Array4<f32>, usize), DiffusionError> {
    let Some(photo) = &params.init_image else {
        return Ok((noise.mapv(|n| n * scheduler.init_noise_sigma()), 0));
    };
    let encoder = vae_encoder
        .ok_or_else(|| DiffusionError::MissingFile { path: config.dir.join("vae_encoder/model.onnx") })?;
    let photo_latents = encode_photo(encoder, config, photo, params)?;
    let latents = photo_latents.broadcast(noise.raw_dim()).expect("one photo for every image").to_owned();
    let steps = params.num_inference_steps as usize;
    Ok(noised_photo(scheduler, latents, noise, steps, params.strength))
}

/// Inpainting: the latents before the first step, that step's index, and what the steps add
/// (see the module docs of `inpaint`).
fn inpaint_latents(
    scheduler: &mut dyn Scheduler,
    vae_encoder: Option<&mut VaeHalf>,
    config: &DiffusionConfig,
    noise: Array4<f32>,
    inpainting: &Inpainting,
    params: &GenerateParams,
) -> Result<(Array4<f32>, usize, Option<MaskedLatents>), DiffusionError> {
    let encoder = vae_encoder
        .ok_or_else(|| DiffusionError::MissingFile { path: config.dir.join("vae_encoder/model.onnx") })?;
    let mut encode = |pixels: Array4<f32>| -> Result<Array4<f32>, DiffusionError> {
        let mut latents = encoder.encode_mean(pixels.view(), config.latent_channels)?;
        latents.mapv_inplace(|l| l * config.vae_scaling_factor);
        Ok(latents)
    };
    let from_noise = inpainting.photo.is_none() || params.strength == 1.0;
    let blends = !config.is_inpainting();
    let photo_latents = match &inpainting.photo {
        Some(photo) if blends || !from_noise => {
            Some(encode(photo_to_pixels(photo, params.width, params.height))?)
        }
        _ => None,
    };
    let masked = if config.is_inpainting() { Some(encode(inpainting.masked_pixels())?) } else { None };
    let steps = params.num_inference_steps as usize;
    let (latents, start) = match (&photo_latents, from_noise) {
        (Some(photo), false) => {
            let latents = photo.broadcast(noise.raw_dim()).expect("one photo for every image").to_owned();
            noised_photo(scheduler, latents, noise.view(), steps, params.strength)
        }
        _ => {
            scheduler.set_begin_index(0);
            (noise.mapv(|n| n * scheduler.init_noise_sigma()), 0)
        }
    };
    let known = if blends { photo_latents.map(|photo| (photo, noise)) } else { None };
    let mask = inpainting.latent_mask(config.vae_scale_factor);
    Ok((latents, start, Some(MaskedLatents { mask, masked, known })))
}

/// Image-to-image: the photo's latents noised to the step that `strength` starts from, and that
/// step's index.
fn noised_photo(
    scheduler: &mut dyn Scheduler,
    mut latents: Array4<f32>,
    noise: ArrayView4<'_, f32>,
    steps: usize,
    strength: f32,
) -> (Array4<f32>, usize) {
    // diffusers runs nothing when steps × strength < 1; one step is more useful.
    let start = img2img_start_index(steps, strength).min(steps - 1);
    scheduler.set_begin_index(start);
    let timestep = scheduler.timesteps()[start];
    scheduler.add_noise(latents.view_mut(), noise, timestep);
    (latents, start)
}

/// The scheduler of one generation, the step it starts at and its noise source.
struct Schedule<'a> {
    scheduler: &'a mut dyn Scheduler,
    start: usize,
    noise: &'a mut dyn NoiseSource,
}

/// What the UNet steps cost.
#[derive(Default)]
struct StepsCost {
    run_ms: f64,
    controlnet_ms: f64,
    transfer_ms: f64,
    steps: u32,
}

/// The UNet of a generation, and with control the residual-input UNet and the ControlNets.
struct Unets<'a> {
    plain: &'a mut Unet,
    control: Option<ControlSessions<'a>>,
}

/// The residual-input UNet (merged with the generation's adapters, if any) and the ControlNets.
struct ControlSessions<'a> {
    unet: &'a mut Unet,
    nets: &'a mut [ControlNet],
}

/// A generation's control: the units with their images as model inputs, the ControlNets and the
/// residual-input UNet with its buffers.
struct Steering<'a> {
    control: ControlSessions<'a>,
    buffers: UnetBuffers,
    units: Vec<(usize, &'a ControlUnit, ModelTensor<ndarray::Ix4>)>,
}

impl<'a> Steering<'a> {
    fn new(
        control: ControlSessions<'a>,
        units: &'a [ControlUnit],
        shape: [usize; 4],
        conditioning: &UnetConditioning,
        params: &GenerateParams,
    ) -> Result<Steering<'a>, DiffusionError> {
        let buffers = control.unet.buffers(shape, shape[1], conditioning)?;
        let float_type = control.unet.float_type();
        let units = units
            .iter()
            .filter_map(|unit| {
                let net = control.nets.iter().position(|n| n.control_type() == unit.control_type)?;
                let image = control_input(&unit.image, params.width, params.height, shape[0], float_type);
                Some((net, unit, image))
            })
            .collect();
        Ok(Steering { control, buffers, units })
    }

    /// One step's prediction: the residual-input UNet on the summed residuals of the units acting
    /// at step `index` of `total`, or the plain UNet when none acts (as zero residuals would).
    fn predict(
        &mut self,
        plain: &mut Unet,
        buffers: &mut UnetBuffers,
        (timestep, index, total): (f32, usize, usize),
        conditioning: &UnetConditioning,
        cost: &mut StepsCost,
        consume: impl FnOnce(ndarray::ArrayView4<'_, f32>),
    ) -> Result<StepCost, DiffusionError> {
        match self.residuals(buffers.sample.view(), timestep, conditioning, (index, total), cost)? {
            Some(residuals) => {
                self.buffers.sample.assign(&buffers.sample);
                self.control.unet.predict(&mut self.buffers, timestep, conditioning, Some(residuals), consume)
            }
            None => plain.predict(buffers, timestep, conditioning, None, consume),
        }
    }

    /// The summed residuals of the units acting at step `index` of `total`, or `None` when none
    /// acts.
    fn residuals(
        &mut self,
        sample: ndarray::ArrayView4<'_, f32>,
        timestep: f32,
        conditioning: &UnetConditioning,
        (index, total): (usize, usize),
        cost: &mut StepsCost,
    ) -> Result<Option<Residuals>, DiffusionError> {
        let mut sums = None;
        for (net, unit, image) in &self.units {
            if unit.scale == 0.0 || !acts_at(index, total, unit.guidance_start, unit.guidance_end) {
                continue;
            }
            let net = &mut self.control.nets[*net];
            cost.controlnet_ms +=
                net.add_residuals(sample, timestep, conditioning, image, unit.scale, &mut sums)?;
        }
        Ok(sums)
    }
}

/// Where the steps' previews come from: the model's tiny decoder when it has one, else the linear
/// latent map.
struct Previews<'a> {
    decoder: Option<&'a mut PreviewDecoder>,
    linear: Option<LatentPreview>,
}

/// What the denoising loop runs besides the UNets: the schedule, inpainting's additions and the
/// previews.
struct Steps<'a> {
    schedule: Schedule<'a>,
    masked: Option<&'a MaskedLatents>,
    previews: Previews<'a>,
    unet_in_channels: usize,
}

/// The denoising loop: one UNet prediction (both guidance rows at once) and one scheduler step per
/// timestep from `schedule.start`, reporting each finished step to `on_step`.
fn run_steps(
    unets: Unets<'_>,
    embeddings: PromptEmbeddings,
    steps: Steps<'_>,
    latents: &mut Array4<f32>,
    params: &GenerateParams,
    on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<()>,
) -> Result<StepsCost, DiffusionError> {
    let Steps { schedule, masked, mut previews, unet_in_channels } = steps;
    let Schedule { scheduler, start, noise } = schedule;
    let (batch, channels, latent_h, latent_w) = latents.dim();
    let rows = batch * if params.guidance_scale > 1.0 { 2 } else { 1 };
    let added = embeddings.pooled_prompt_embeds.map(|pooled| {
        (repeat_rows(pooled, batch), time_ids(params.height as usize, params.width as usize, rows))
    });
    let Unets { plain: unet, control } = unets;
    let conditioning = unet.conditioning(repeat_rows(embeddings.prompt_embeds, batch), added);
    let shape = [rows, channels, latent_h, latent_w];
    let mut buffers = unet.buffers(shape, unet_in_channels, &conditioning)?;
    if let Some(masked) = masked {
        masked.fill_unet_extras(buffers.sample.view_mut(), channels);
    }
    let mut steering = match control {
        Some(control) => Some(Steering::new(control, &params.control, shape, &conditioning, params)?),
        None => None,
    };
    let mut noise_pred = Array4::<f32>::zeros(latents.raw_dim());
    let run = scheduler.timesteps()[start..].to_vec();
    let mut cost = StepsCost::default();
    for (done, &timestep) in run.iter().enumerate() {
        for (index, mut row) in buffers.sample.outer_iter_mut().enumerate() {
            row.slice_mut(s![..channels, .., ..]).assign(&latents.index_axis(Axis(0), index % batch));
        }
        scheduler.scale_model_input(buffers.sample.slice_mut(s![.., ..channels, .., ..]), timestep);
        let consume = |prediction: ndarray::ArrayView4<'_, f32>| {
            guide(prediction, noise_pred.view_mut(), params.guidance_scale, params.guidance_rescale);
        };
        let step = match &mut steering {
            Some(s) => {
                s.predict(unet, &mut buffers, (timestep, done, run.len()), &conditioning, &mut cost, consume)?
            }
            None => unet.predict(&mut buffers, timestep, &conditioning, None, consume)?,
        };
        cost.run_ms += step.run_ms;
        cost.transfer_ms += step.transfer_ms;
        cost.steps += 1;
        scheduler.step(noise_pred.view(), timestep, latents.view_mut(), noise);
        if let Some(masked) = masked {
            masked.blend_known(scheduler, latents, &run, done);
        }
        if unet.is_half() {
            // diffusers casts each step's result back to the model's float16.
            latents.mapv_inplace(|l| half::f16::from_f32(l).to_f32());
        }
        let sigma = scheduler.sigmas().and_then(|sigmas| sigmas.get(start + done + 1).copied());
        let source = match previews.decoder.as_deref_mut() {
            Some(decoder) => Some(PreviewSource::Decoder(decoder)),
            None => previews.linear.map(PreviewSource::Linear),
        };
        let step = Step {
            done: done as u32 + 1,
            total: run.len() as u32,
            latents: latents.view(),
            sigma,
            previews: source,
        };
        if on_step(step).is_break() {
            return Err(DiffusionError::Canceled);
        }
    }
    Ok(cost)
}

/// The ControlNets shipped beside the pipeline: `controlnet/<type>/model.onnx`, by type.
fn bundled_controlnets(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, DiffusionError> {
    let root = dir.join("controlnet");
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(Vec::new()) };
    let mut nets = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| config_error(&root, e.to_string()))?.path();
        if path.join("model.onnx").is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            nets.push((name.to_string(), path));
        }
    }
    nets.sort();
    Ok(nets)
}

/// The tokenizers and text encoders in `dir`: one pair, or SDXL's two, each session on the runtime
/// `placed` gives it.
fn load_text_encoders(
    config: &DiffusionConfig,
    dir: &Path,
    placed: &dyn Fn(&str) -> Result<Runtime, DiffusionError>,
) -> Result<(Vec<ClipTokenizer>, Vec<TextEncoder>), DiffusionError> {
    // SDXL conditions on the penultimate layer of both encoders (`hidden_states[-2]`).
    let penultimate = |layers: usize| format!("hidden_states.{}", layers.saturating_sub(1));
    let parts = if config.family == ModelFamily::StableDiffusionXl {
        vec![
            ("tokenizer", "text_encoder", penultimate(config.text_encoder_layers[0]), None),
            (
                "tokenizer_2",
                "text_encoder_2",
                penultimate(config.text_encoder_layers[1]),
                Some("text_embeds"),
            ),
        ]
    } else {
        vec![("tokenizer", "text_encoder", "last_hidden_state".to_string(), None)]
    };
    let mut tokenizers = Vec::new();
    let mut encoders = Vec::new();
    for (tokenizer, encoder, hidden, pooled) in parts {
        tokenizers.push(ClipTokenizer::from_dir(&dir.join(tokenizer))?);
        let runtime = placed(encoder)?;
        encoders.push(TextEncoder::load(&runtime, dir, encoder, hidden, pooled.map(str::to_string))?);
    }
    if tokenizers.iter().any(|t| t.max_length() != tokenizers[0].max_length()) {
        return Err(DiffusionError::Config {
            path: dir.join("tokenizer_2/tokenizer_config.json"),
            reason: "both tokenizers must have the same model_max_length".into(),
        });
    }
    Ok((tokenizers, encoders))
}

/// The sessions one generation runs: merged ones where its adapters change a model, else the base.
struct Active<'a> {
    unet: &'a mut Unet,
    text_encoders: Vec<&'a mut TextEncoder>,
    /// The merged residual-input UNet of a controlled generation with adapters.
    residual_unet: Option<&'a mut Unet>,
}

impl<'a> Active<'a> {
    fn of(
        unet: &'a mut Unet,
        text_encoders: &'a mut [TextEncoder],
        merged: Option<&'a mut Merged>,
    ) -> Active<'a> {
        let Some(MergedModels { unet: merged_unet, text_encoders: merged_encoders, residual_unet }) = merged
        else {
            return Active { unet, text_encoders: text_encoders.iter_mut().collect(), residual_unet: None };
        };
        let mut merged_encoders = merged_encoders.iter_mut();
        Active {
            unet: merged_unet.as_mut().unwrap_or(unet),
            residual_unet: residual_unet.as_mut(),
            text_encoders: text_encoders
                .iter_mut()
                .map(|base| merged_encoders.next().and_then(Option::as_mut).unwrap_or(base))
                .collect(),
        }
    }
}

/// The merged sessions for `requested`, or `None` when no adapter with a non-zero weight is asked
/// for (the base sessions serve, at no cost).
fn merged<'a>(
    loras: Option<&'a mut Loras>,
    requested: &[(String, f32)],
    controlled: bool,
    config: &DiffusionConfig,
    runtime: &Runtime,
    base_encoders: &[TextEncoder],
) -> Result<Option<&'a mut Merged>, DiffusionError> {
    let Some((first, _)) = requested.first() else { return Ok(None) };
    let Loras { library, cache } =
        loras.ok_or_else(|| LoraError::Unknown { name: first.clone(), known: Vec::new() })?;
    let set = library.resolve(requested)?;
    if set.is_empty() {
        return Ok(None);
    }
    let (merged, hit) = cache.get_or_build(&set, || {
        let mut overrides = library.overrides(&set)?;
        let dir = &config.dir;
        let xl = config.family == ModelFamily::StableDiffusionXl;
        let build_error = |part: ModelPart| {
            move |e: DiffusionError| LoraError::Merge { part: part.as_str(), reason: e.to_string() }
        };
        let unet = match overrides.remove(&ModelPart::Unet) {
            Some(values) => Some(
                Unet::load(&runtime.for_model("unet"), dir, UnetGraph::Plain, xl, values)
                    .map_err(build_error(ModelPart::Unet))?,
            ),
            None => None,
        };
        let mut text_encoders = Vec::new();
        for (encoder, part) in base_encoders.iter().zip([ModelPart::TextEncoder, ModelPart::TextEncoder2]) {
            text_encoders.push(match overrides.remove(&part) {
                Some(values) => Some(
                    encoder
                        .with_initializers(&runtime.for_model(part.as_str()), dir, values)
                        .map_err(build_error(part))?,
                ),
                None => None,
            });
        }
        Ok(MergedModels { unet, text_encoders, residual_unet: None })
    })?;
    if controlled && merged.residual_unet.is_none() {
        let xl = config.family == ModelFamily::StableDiffusionXl;
        if let Some(values) = library.residual_unet_overrides(&set)? {
            let unet = Unet::load(
                &runtime.for_model("unet").taking_turns(),
                &config.dir,
                UnetGraph::Residual,
                xl,
                values,
            )
            .map_err(|e| LoraError::Merge { part: "unet_controlnet", reason: e.to_string() })?;
            merged.residual_unet = Some(unet);
        }
    }
    tracing::debug!(loras = ?requested, cache_hit = hit, "LoRA sessions ready");
    Ok(Some(merged))
}

/// The text conditioning from `encoders` (one per tokenizer); with `guided` the negative prompt's
/// row comes first.
fn encode_texts(
    config: &DiffusionConfig,
    tokenizers: &[ClipTokenizer],
    encoders: &mut [&mut TextEncoder],
    prompt: &str,
    negative_prompt: &str,
    guided: bool,
) -> Result<PromptEmbeddings, DiffusionError> {
    let xl = config.family == ModelFamily::StableDiffusionXl;
    // SDXL was trained with zeroed embeddings standing in for "no negative prompt".
    let zero_negative = guided && xl && negative_prompt.is_empty() && config.force_zeros_for_empty_prompt;
    let texts: &[&str] = if guided && !zero_negative { &[negative_prompt, prompt] } else { &[prompt] };
    let mut hidden_states = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for (tokenizer, encoder) in tokenizers.iter().zip(encoders.iter_mut()) {
        let mut input_ids = Array2::zeros((texts.len(), tokenizer.max_length()));
        for (mut row, text) in input_ids.outer_iter_mut().zip(texts) {
            row.assign(&ndarray::Array1::from(tokenizer.encode(text)?));
        }
        let (hidden, encoder_pooled) = encoder.encode(&input_ids)?;
        hidden_states.push(hidden);
        pooled = encoder_pooled.or(pooled);
    }
    let views: Vec<_> = hidden_states.iter().map(|h| h.view()).collect();
    // Concatenating along the last axis leaves that axis outermost in memory; sessions take C
    // order only.
    let mut prompt_embeds = concatenate(Axis(2), &views)
        .map_err(|e| DiffusionError::Inference { model: "text_encoder", reason: e.to_string() })?
        .as_standard_layout()
        .into_owned();
    if zero_negative {
        prompt_embeds = prepend_zero_row(prompt_embeds);
        pooled = pooled.map(prepend_zero_row);
    }
    Ok(PromptEmbeddings { prompt_embeds, pooled_prompt_embeds: pooled })
}

/// Image-to-image: the photo's latents, scaled as the UNet expects them.
fn encode_photo(
    encoder: &mut VaeHalf,
    config: &DiffusionConfig,
    photo: &RgbImage,
    params: &GenerateParams,
) -> Result<Array4<f32>, DiffusionError> {
    let pixels = photo_to_pixels(photo, params.width, params.height);
    let mut latents = encoder.encode_mean(pixels.view(), config.latent_channels)?;
    latents.mapv_inplace(|l| l * config.vae_scaling_factor);
    Ok(latents)
}

/// Classifier-free guidance of a `[rows, C, h, w]` prediction into `noise_pred` `[batch, C, h, w]`:
/// for each image, `uncond + scale * (cond - uncond)`, then optionally `rescale_noise_cfg`. With
/// guidance the rows are the batch's unconditional ones, then its conditional ones; without, the
/// batch's conditional ones.
fn guide(prediction: ArrayView4<'_, f32>, mut noise_pred: ArrayViewMut4<'_, f32>, scale: f32, rescale: f32) {
    let batch = noise_pred.dim().0;
    if prediction.shape()[0] == batch {
        noise_pred.assign(&prediction);
        return;
    }
    for (image, mut out) in noise_pred.outer_iter_mut().enumerate() {
        let (uncond, cond) =
            (prediction.index_axis(Axis(0), image), prediction.index_axis(Axis(0), batch + image));
        Zip::from(&mut out).and(&uncond).and(&cond).for_each(|n, &u, &c| *n = u + scale * (c - u));
        if rescale > 0.0 {
            // Lin et al. 2023, section 3.4: match the guided prediction's std to the conditional one's.
            let factor = (std_dev(cond.iter()) / std_dev(out.iter())) as f32;
            out.mapv_inplace(|n| rescale * (n * factor) + (1.0 - rescale) * n);
        }
    }
}

/// Each row of `rows` repeated `times` times in place: `[a, b]` → `[a, a, b, b]` for 2, which puts
/// a batch's unconditional rows before its conditional ones.
fn repeat_rows<D: ndarray::RemoveAxis>(rows: ndarray::Array<f32, D>, times: usize) -> ndarray::Array<f32, D> {
    if times == 1 {
        return rows;
    }
    let order: Vec<usize> =
        (0..rows.len_of(Axis(0))).flat_map(|row| std::iter::repeat_n(row, times)).collect();
    rows.select(Axis(0), &order)
}

/// torch.std: the unbiased standard deviation.
fn std_dev<'a>(values: impl ExactSizeIterator<Item = &'a f32> + Clone) -> f64 {
    let n = values.len() as f64;
    let mean = values.clone().map(|&v| f64::from(v)).sum::<f64>() / n;
    (values.map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// `embeds` with a zero row in front (the negative prompt's place).
fn prepend_zero_row<D: ndarray::RemoveAxis>(embeds: ndarray::Array<f32, D>) -> ndarray::Array<f32, D> {
    let mut shape = embeds.raw_dim();
    shape[0] += 1;
    let mut padded = ndarray::Array::zeros(shape);
    padded.slice_axis_mut(Axis(0), ndarray::Slice::from(1..)).assign(&embeds);
    padded
}

/// The photo as the VAE encoder's input `[1, 3, height, width]` in [-1, 1]: scaled to cover the
/// requested size (Lanczos), centre-cropped, `x / 255 * 2 - 1`.
fn photo_to_pixels(photo: &RgbImage, width: u32, height: u32) -> Array4<f32> {
    let photo = fit(photo, width, height);
    Array4::from_shape_fn((1, 3, height as usize, width as usize), |(_, c, y, x)| {
        f32::from(photo.get_pixel(x as u32, y as u32)[c]) / 255.0 * 2.0 - 1.0
    })
}

/// `[1, H, W, 3]` in [0, 1] to 8-bit RGB, rounding half to even like numpy.
/// The first image of `[batch, height, width, 3]` floats, as 8-bit RGB.
fn to_rgb8(image: ArrayView4<'_, f32>) -> RgbImage {
    let (_, height, width, _) = image.dim();
    let bytes = image.slice(s![0, .., .., ..]).iter().map(|&v| (v * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(width as u32, height as u32, bytes).unwrap_or_default()
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
