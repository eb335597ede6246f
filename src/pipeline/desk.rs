//! The real pipeline: photo → look → plan → draw → store, with shopping beside the drawing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use super::control::Controls;
use super::draw::{Painter, Prompts};
use super::look::{Seen, look_at};
use super::photo::{PhotoSources, decode};
use super::plan::{Category, PipelineSettings, PromptInput};
use super::shape::SizeRule;
use super::shop::shop;
use super::{Pipeline, RunContext, Services};
use crate::core::request::{DEFAULT_GUIDANCE, DEFAULT_STEPS};
use crate::core::{Failure, FailureCode, GenerateOutput, GenerateRequest, LoraInfo, ModelInfo, PipelineInfo};
use crate::fetch::{FetchConfig, Fetcher};
use crate::inference::diffusion::lora::LoraOptions;
use crate::inference::diffusion::{SchedulerKind, StableDiffusion};
use crate::inference::vision::{Hed, Vision, VisionConfig};
use crate::inference::{ExecutionProvider, ModelOwner, Runtime, RuntimeConfig};
use crate::shopping::{ShoppingConfig, ShoppingProvider};
use crate::storage::StorageConfig;

/// Everything the pipeline loads: models, settings and the outside services it talks to.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// ONNX Runtime settings.
    pub runtime: RuntimeConfig,
    /// Vision models.
    pub vision: VisionConfig,
    /// Stable Diffusion pipeline folder in optimum's ONNX layout (the default is a tiny random-weight
    /// pipeline whose images are noise; see README for real weights).
    pub sd_model: PathBuf,
    /// Folder of LoRA adapters (`*.safetensors`, diffusers/peft or kohya format, trigger words in
    /// `<name>.json` / `<name>.txt`) that requests may name; files that do not fit the model are
    /// skipped with a warning.
    pub lora_dir: PathBuf,
    /// How many merged UNet/text-encoder session sets (one per distinct set of LoRA names and
    /// weights) are kept for reuse; each holds a copy of the models it changes. 0 merges per request.
    pub lora_cache_size: usize,
    /// Largest |weight| a request may give one LoRA adapter (negative weights down to -this work).
    pub max_lora_weight: f32,
    /// ControlNets besides those in the model folder's `controlnet/<type>/`, as (type, folder).
    pub controlnets: Vec<(String, PathBuf)>,
    /// HED soft-edge model for "softedge" control images; skipped when the file is missing.
    pub hed_model: PathBuf,
    /// Largest image side in pixels: what a request may ask for, and the bound of the size a photo's
    /// shape gives.
    pub max_side: u32,
    /// Category table and prompt templates (TOML); the built-in config/pipeline.toml when unset.
    pub pipeline_config: Option<PathBuf>,
    /// Object storage for generated images.
    pub storage: StorageConfig,
    /// Downloading users' photos.
    pub fetch: FetchConfig,
    /// Shopping offers.
    pub shopping: ShoppingConfig,
}

/// The product's pipeline over real models and services.
pub struct DeskPipeline {
    vision: ModelOwner<Vision>,
    painter: Painter,
    photos: PhotoSources,
    shopping: Arc<dyn ShoppingProvider>,
    settings: PipelineSettings,
    models: Vec<ModelInfo>,
    loras: Vec<LoraInfo>,
    max_lora_weight: f32,
    controls: Controls,
}

impl DeskPipeline {
    /// Loads every model, over the outside services given; blocking (run it off the async runtime).
    pub fn load(config: &PipelineConfig, services: Services) -> anyhow::Result<DeskPipeline> {
        let Services { store, shopping } = services;
        let runtime = Runtime::init(&config.runtime)?;
        let vision = Vision::load(&runtime, &config.vision)?;
        let diffusion = load_diffusion(&runtime, config)?;
        let hed = load_hed(&runtime, &config.hed_model)?;
        let models = model_list(&vision, &diffusion, hed.as_ref(), runtime.provider().as_str())?;
        let loras = lora_list(&diffusion);
        let settings = PipelineSettings::load(config.pipeline_config.as_deref())?;
        let controls = Controls {
            types: diffusion.control_types().into_iter().map(str::to_string).collect(),
            default: settings.control.clone(),
            hed: hed.map(|hed| ModelOwner::spawn("hed", hed)).transpose()?,
        };
        Ok(DeskPipeline {
            vision: ModelOwner::spawn("vision", vision)?,
            painter: Painter {
                size_rule: SizeRule {
                    native: diffusion.native_size().0,
                    multiple: diffusion.config().size_multiple as u32,
                    max_side: config.max_side,
                },
                default_scheduler: diffusion.default_scheduler(),
                default_steps: diffusion.defaults().num_inference_steps.unwrap_or(DEFAULT_STEPS),
                default_guidance: diffusion.defaults().guidance_scale.unwrap_or(DEFAULT_GUIDANCE),
                scheduler_max_steps: scheduler_max_steps(&diffusion),
                diffusion: ModelOwner::spawn("diffusion", diffusion)?,
                store: store.clone(),
            },
            photos: PhotoSources {
                store,
                fetcher: Fetcher::new(&config.fetch)?,
                max_image_bytes: config.fetch.max_image_bytes,
                max_image_pixels: config.vision.max_image_pixels,
            },
            shopping,
            settings,
            models,
            loras,
            max_lora_weight: config.max_lora_weight,
            controls,
        })
    }

    /// Trigger words of the adapters that take part (weight not 0), each once, in request order.
    fn trigger_words(&self, request: &GenerateRequest) -> Vec<String> {
        let mut words: Vec<String> = Vec::new();
        for lora in request.loras.iter().filter(|l| l.weight != 0.0) {
            let Some(info) = self.loras.iter().find(|l| l.name == lora.name) else { continue };
            for word in &info.trigger_words {
                if !words.contains(word) {
                    words.push(word.clone());
                }
            }
        }
        words
    }

    /// The prompt from the caption, the planned categories, the user's text and trigger words.
    fn prompts(&self, request: &GenerateRequest, caption: Option<&str>, plan: &[Category]) -> Prompts {
        let categories: Vec<&Category> = plan.iter().collect();
        let triggers = self.trigger_words(request);
        let prompt = self.settings.prompt(&PromptInput {
            caption,
            categories: &categories,
            user_text: request.user_text.as_deref(),
            triggers: &triggers,
        });
        let negative =
            request.negative_prompt.clone().unwrap_or_else(|| self.settings.prompt.negative.clone());
        Prompts { prompt, negative }
    }

    /// Reads, decodes and looks at the photo, filling in what the result says of it.
    async fn see(
        &self,
        request: &GenerateRequest,
        output: &mut GenerateOutput,
        ctx: &RunContext,
    ) -> Result<Option<Seen>, Failure> {
        let Some(source) = &request.photo else { return Ok(None) };
        let bytes = self.photos.read(source, ctx, &mut output.timings_ms).await?;
        let photo = decode(bytes, self.photos.max_image_pixels, &mut output.timings_ms).await?;
        ctx.check()?;
        let seen = look_at(&self.vision, photo, ctx, &mut output.timings_ms).await?;
        output.is_desk = Some(seen.scene.is_desk);
        output.caption = Some(seen.caption.clone());
        output.detected_items = seen.detected_items();
        Ok(Some(seen))
    }
}

#[async_trait]
impl Pipeline for DeskPipeline {
    async fn run(&self, request: &GenerateRequest, ctx: &RunContext) -> Result<GenerateOutput, Failure> {
        let initial_image_url = match &request.photo {
            Some(photo) => Some(self.photos.url(photo).await?),
            None => None,
        };
        let mut output = GenerateOutput { initial_image_url, ..GenerateOutput::default() };
        let seen = self.see(request, &mut output, ctx).await?;
        ctx.check()?;
        let items = seen.as_ref().map(|s| s.scene.items.as_slice());
        let plan: Vec<Category> =
            self.settings.plan(items, request.user_text.as_deref()).into_iter().cloned().collect();
        // Runs beside the drawing; dropped (and aborted) if the task ends early.
        let per_category = request.max_items_per_category as usize;
        let shopping = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(shop(
            self.shopping.clone(),
            plan.clone(),
            per_category,
        )));
        match seen {
            Some(seen) if !seen.scene.is_desk => {
                output
                    .warnings
                    .push("The photo does not look like a desk, so no image was generated.".into());
            }
            seen => {
                let (caption, photo) = seen.map(|s| (s.caption, s.photo)).unzip();
                let prompts = self.prompts(request, caption.as_deref(), &plan);
                let guidance =
                    self.controls.guidance(request, &self.photos, ctx, &mut output.timings_ms).await?;
                self.painter.draw(request, prompts, photo, &guidance, &mut output, ctx).await?;
            }
        }
        ctx.check()?;
        ctx.progress("shopping", 0, 1);
        let shopped =
            shopping.await.map_err(|e| Failure::new(FailureCode::Internal, format!("shopping task: {e}")))?;
        output.timings_ms.insert("shopping".into(), shopped.ms);
        output.recommendations = shopped.recommendations;
        output.warnings.extend(shopped.warnings);
        Ok(output)
    }

    fn info(&self) -> PipelineInfo {
        PipelineInfo {
            models: self.models.clone(),
            schedulers: SchedulerKind::ALL.iter().map(|s| s.as_str().to_string()).collect(),
            default_scheduler: self.painter.default_scheduler.as_str().to_string(),
            default_steps: self.painter.default_steps,
            default_guidance: self.painter.default_guidance,
            scheduler_max_steps: self.painter.scheduler_max_steps.clone(),
            native_size: self.painter.size_rule.native,
            size_multiple: self.painter.size_rule.multiple,
            loras: self.loras.clone(),
            max_lora_weight: self.max_lora_weight,
            controlnets: self.controls.info(),
            default_control: self.controls.default_info(),
            negative_prompt: self.settings.prompt.negative.clone(),
            object_store: self.photos.store.kind().to_string(),
            shopping_provider: self.shopping.name().to_string(),
        }
    }
}

/// The HED soft-edge model, or none (with a warning) when its file is missing.
fn load_hed(runtime: &Runtime, path: &std::path::Path) -> anyhow::Result<Option<Hed>> {
    if !path.is_file() {
        tracing::warn!(path = %path.display(), "no HED model: softedge control needs an image_url");
        return Ok(None);
    }
    Ok(Some(Hed::load(runtime, path)?))
}

/// Loads Stable Diffusion with the LoRA adapters of `config.lora_dir`; on CUDA, runs it once so
/// the first request does not pay cuDNN's algorithm search.
fn load_diffusion(runtime: &Runtime, config: &PipelineConfig) -> anyhow::Result<StableDiffusion> {
    let mut diffusion = StableDiffusion::load(runtime, &config.sd_model)?;
    for (control_type, dir) in &config.controlnets {
        diffusion.load_controlnet(control_type, dir)?;
    }
    anyhow::ensure!(
        config.max_lora_weight.is_finite() && config.max_lora_weight > 0.0,
        "--max-lora-weight must be a positive number, not {}",
        config.max_lora_weight
    );
    let lora_options = LoraOptions {
        dir: config.lora_dir.clone(),
        cache_size: config.lora_cache_size,
        max_weight: config.max_lora_weight,
    };
    for rejected in diffusion.load_loras(&lora_options)? {
        tracing::warn!(path = %rejected.path.display(), error = %rejected.error, "LoRA adapter skipped");
    }
    if runtime.for_model("unet").provider() == ExecutionProvider::Cuda {
        // The first run of each shape on CUDA searches cuDNN's algorithms (about a second):
        // pay it here, before health reports SERVING, not in the first request.
        let timings = diffusion.warm_up()?;
        tracing::info!(unet_ms = timings.unet_ms, vae_ms = timings.vae_ms, "diffusion pipeline warmed up");
    }
    Ok(diffusion)
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

/// Every loaded model, as /info lists them.
fn model_list(
    vision: &Vision,
    diffusion: &StableDiffusion,
    hed: Option<&Hed>,
    provider: &str,
) -> anyhow::Result<Vec<ModelInfo>> {
    let mut models: Vec<ModelInfo> = vision
        .models()
        .into_iter()
        .chain(hed.map(|h| h.model().clone()))
        .map(|m| ModelInfo {
            id: m.id,
            path: m.path.display().to_string(),
            sha256: m.sha256,
            size_bytes: m.size_bytes,
            execution_provider: provider.to_string(),
        })
        .collect();
    let sd_dir = &diffusion.config().dir;
    models.push(ModelInfo {
        id: "stable-diffusion".into(),
        path: sd_dir.display().to_string(),
        sha256: crate::inference::sha256_file(&sd_dir.join("unet/model.onnx"))?,
        size_bytes: dir_size(sd_dir),
        execution_provider: provider.to_string(),
    });
    Ok(models)
}

/// Total size of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
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

/// The schedulers with a step bound of their own on this model, and that bound.
fn scheduler_max_steps(diffusion: &StableDiffusion) -> BTreeMap<String, u32> {
    let config = &diffusion.config().scheduler;
    let bounded =
        SchedulerKind::ALL.iter().filter_map(|kind| Some((kind.to_string(), kind.max_steps(config)?)));
    bounded.map(|(kind, max)| (kind, u32::try_from(max).unwrap_or(u32::MAX))).collect()
}
