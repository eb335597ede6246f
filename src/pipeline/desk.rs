//! The real pipeline: photo → look → plan → draw → store, with shopping beside the drawing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;

use super::control::Controls;
use super::draw::{Images, Painter, PainterOptions, Prompts};
use super::look::{Seen, look_at};
use super::mask::mask_for;
use super::models::{Load, ModelPool, SdModelSpec};
use super::photo::{PhotoSources, decode};
use super::plan::{Brand, Category, PipelineSettings, PromptInput};
use super::shop::{Lookup, shop};
use super::{Pipeline, RunContext, Services};
use crate::core::{
    Failure, FailureCode, GenerateOutput, GenerateRequest, LoraInfo, ModelInfo, PipelineInfo, SdModelInfo,
};
use crate::fetch::{FetchConfig, Fetcher};
use crate::inference::diffusion::lora::LoraOptions;
use crate::inference::vision::{Hed, Vision, VisionConfig};
use crate::inference::{ModelOwner, Runtime, RuntimeConfig};
use crate::shopping::{ShoppingConfig, ShoppingProvider};
use crate::storage::StorageConfig;

/// Everything the pipeline loads: models, settings and the outside services it talks to.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// ONNX Runtime settings.
    pub runtime: RuntimeConfig,
    /// Vision models.
    pub vision: VisionConfig,
    /// The Stable Diffusion models requests may name, each a folder in optimum's ONNX layout; the
    /// first is the default (the default is a tiny random-weight pipeline whose images are noise;
    /// see README for real weights).
    pub sd_models: Vec<SdModelSpec>,
    /// How many Stable Diffusion models stay in memory at most; the others load when a request
    /// names them, in place of the least recently used. 0: all of them.
    pub max_loaded_models: usize,
    /// Folder of LoRA adapters (`*.safetensors`, diffusers/peft or kohya format, trigger words in
    /// `<name>.json` / `<name>.txt`) that requests may name; files that do not fit the model are
    /// skipped with a warning.
    pub lora_dir: PathBuf,
    /// How many merged UNet/text-encoder session sets (one per distinct set of LoRA names and
    /// weights) are kept for reuse; each holds a copy of the models it changes. 0 merges per request.
    pub lora_cache_size: usize,
    /// Largest |weight| a request may give one LoRA adapter (negative weights down to -this work).
    pub max_lora_weight: f32,
    /// ControlNets of the default model besides those in its folder's `controlnet/<type>/`, as
    /// (type, folder).
    pub controlnets: Vec<(String, PathBuf)>,
    /// The tiny decoder of the default model's previews, besides a folder's own `preview_decoder/`.
    pub preview_decoder: Option<PathBuf>,
    /// HED soft-edge model for "softedge" control images; skipped when the file is missing.
    pub hed_model: PathBuf,
    /// Largest image side in pixels: what a request may ask for, and the bound of the size a photo's
    /// shape gives.
    pub max_side: u32,
    /// Most images one request may ask for (`num_images`), 1 to 4.
    pub max_images: u32,
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
    painters: ModelPool<Painter>,
    sd_models: Vec<SdModelInfo>,
    photos: PhotoSources,
    shopping: Arc<dyn ShoppingProvider>,
    settings: PipelineSettings,
    models: Vec<ModelInfo>,
    max_lora_weight: f32,
    controls: Controls,
}

impl DeskPipeline {
    /// Loads every model, over the outside services given; blocking (run it off the async runtime).
    /// Each Stable Diffusion model is loaded once to be described; those past
    /// `max_loaded_models` are let go again, the default model last so that it stays.
    pub fn load(config: &PipelineConfig, services: Services) -> anyhow::Result<DeskPipeline> {
        let Services { store, shopping, .. } = services;
        let runtime = Runtime::init(&config.runtime)?;
        let provider = runtime.provider().as_str();
        let settings = PipelineSettings::load(config.pipeline_config.as_deref())?;
        let vision_config = VisionConfig { items: settings.items.clone(), ..config.vision.clone() };
        let vision = Vision::load(&runtime, &vision_config)?;
        let hed = load_hed(&runtime, &config.hed_model)?;
        let mut models = model_list(&vision, hed.as_ref(), provider);
        let controls = Controls {
            default: settings.control.clone(),
            hed: hed.map(|hed| ModelOwner::spawn("hed", hed)).transpose()?,
        };
        let names = model_names(&config.sd_models)?;
        let load = painter_loader(&runtime, config, store.clone())?;
        let painters = ModelPool::new(names.clone(), config.max_loaded_models, load.clone());
        let (mut sd_models, mut sd_files) = (Vec::new(), Vec::new());
        for (index, name) in names.iter().enumerate().rev() {
            let painter = load(index)?;
            sd_models.push(painter.describe(name, &controls));
            let id =
                if index == 0 { "stable-diffusion".to_string() } else { format!("stable-diffusion:{name}") };
            sd_files.push(painter.model_info(id, provider)?);
            if index < painters.max_loaded() {
                painters.keep(index, painter);
            }
        }
        sd_models.reverse();
        models.extend(sd_files.into_iter().rev());
        Ok(DeskPipeline {
            vision: ModelOwner::spawn("vision", vision)?,
            painters,
            sd_models,
            photos: PhotoSources {
                store,
                fetcher: Fetcher::new(&config.fetch)?,
                max_image_bytes: config.fetch.max_image_bytes,
                max_image_pixels: config.vision.max_image_pixels,
            },
            shopping,
            settings,
            models,
            max_lora_weight: config.max_lora_weight,
            controls,
        })
    }

    /// The index of the model `request` names (the default one when it names none).
    fn model_index(&self, request: &GenerateRequest) -> Result<usize, Failure> {
        let Some(name) = &request.model else { return Ok(0) };
        self.painters.index(name).ok_or_else(|| {
            let known = self.painters.names().join(", ");
            let reason = format!("model: '{name}' is not served here; this node serves {known}.");
            Failure::new(FailureCode::InvalidInput, reason)
        })
    }

    /// The model at `index`, loaded first (and reported as the "load_model" stage) when it is out
    /// of memory.
    async fn painter(&self, index: usize, ctx: &RunContext) -> anyhow::Result<Arc<Painter>> {
        let name = &self.painters.names()[index];
        if !self.painters.loaded().contains(name) {
            ctx.progress("load_model", 0, 1);
        }
        self.painters.get(index).await.with_context(|| format!("loading model {name}"))
    }

    /// Trigger words of the adapters that take part (weight not 0), each once, in request order.
    fn trigger_words(request: &GenerateRequest, loras: &[LoraInfo]) -> Vec<String> {
        let mut words: Vec<String> = Vec::new();
        for lora in request.loras.iter().filter(|l| l.weight != 0.0) {
            let Some(info) = loras.iter().find(|l| l.name == lora.name) else { continue };
            for word in &info.trigger_words {
                if !words.contains(word) {
                    words.push(word.clone());
                }
            }
        }
        words
    }

    /// The prompt from the caption, the planned categories, the user's text and the trigger words
    /// of the painter's adapters.
    fn prompts(
        &self,
        request: &GenerateRequest,
        painter: &Painter,
        caption: Option<&str>,
        plan: &[Category],
    ) -> Prompts {
        let categories: Vec<&Category> = plan.iter().collect();
        let triggers = DeskPipeline::trigger_words(request, &painter.loras);
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
        let mut seen = look_at(&self.vision, photo, ctx, &mut output.timings_ms).await?;
        seen.caption = seen.caption_with_brands(&self.settings);
        output.is_desk = Some(seen.scene.is_desk);
        output.caption = Some(seen.caption.clone());
        output.detected_items = seen.detected_items();
        output.detected_text = seen.detected_text(&self.settings);
        output.warnings.extend(seen.warnings.iter().cloned());
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
        let model = self.model_index(request)?;
        let mut output = GenerateOutput { initial_image_url, ..GenerateOutput::default() };
        let seen = self.see(request, &mut output, ctx).await?;
        ctx.check()?;
        let items = seen.as_ref().map(|s| s.scene.items.as_slice());
        let brands: Vec<&Brand> = seen
            .as_ref()
            .map(|s| s.brands(&self.settings).into_iter().map(|(b, _)| b).collect())
            .unwrap_or_default();
        let planned: Vec<Lookup> = self
            .settings
            .plan_with_reasons(items, request.user_text.as_deref())
            .into_iter()
            .map(|(category, reason)| {
                let mut queries = vec![self.settings.branded_query(category, &brands)];
                if queries[0] != category.query {
                    queries.push(category.query.clone());
                }
                Lookup { category: category.clone(), reason, queries }
            })
            .collect();
        let plan: Vec<Category> = planned.iter().map(|lookup| lookup.category.clone()).collect();
        // Runs beside the drawing; dropped (and aborted) if the task ends early.
        let per_category = request.max_items_per_category as usize;
        let shopping = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(shop(
            self.shopping.clone(),
            planned,
            per_category,
        )));
        match seen {
            Some(seen) if !seen.scene.is_desk => {
                output
                    .warnings
                    .push("The photo does not look like a desk, so no image was generated.".into());
            }
            seen => match self.painter(model, ctx).await {
                Ok(painter) => {
                    let mask = match (&request.mask, &seen) {
                        (Some(mask), Some(seen)) => {
                            Some(mask_for(mask, seen, &self.photos, ctx, &mut output).await?)
                        }
                        _ => None,
                    };
                    let (caption, photo) = seen.map(|s| (s.caption, s.photo)).unzip();
                    let prompts = self.prompts(request, &painter, caption.as_deref(), &plan);
                    let types = &painter.control_types;
                    let guidance = self
                        .controls
                        .guidance(request, types, &self.photos, ctx, &mut output.timings_ms)
                        .await?;
                    let images = Images { photo, mask };
                    painter.draw(request, prompts, images, &guidance, &mut output, ctx).await?;
                }
                Err(e) => {
                    tracing::warn!(task_id = ctx.id(), error = %format!("{e:#}"), "no model to draw with; falling back to shopping");
                    output.warnings.push(format!("Image generation failed: {e:#}"));
                }
            },
        }
        ctx.check()?;
        ctx.progress("shopping", 0, 1);
        let shopped =
            shopping.await.map_err(|e| Failure::new(FailureCode::Internal, format!("shopping task: {e}")))?;
        output.timings_ms.insert("shopping".into(), shopped.ms);
        crate::telemetry::past_span(
            "shopping",
            shopped.started,
            Duration::from_secs_f64(shopped.ms / 1000.0),
        );
        output.recommendations = shopped.recommendations;
        output.warnings.extend(shopped.warnings);
        Ok(output)
    }

    fn info(&self) -> PipelineInfo {
        PipelineInfo {
            models: self.models.clone(),
            sd_models: self.sd_models.clone(),
            max_lora_weight: self.max_lora_weight,
            negative_prompt: self.settings.prompt.negative.clone(),
            object_store: self.photos.store.kind().to_string(),
            shopping_provider: self.shopping.name().to_string(),
        }
    }

    fn loaded_models(&self) -> Vec<String> {
        self.painters.loaded()
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

/// The names of the `--sd-model`s, which must differ.
fn model_names(specs: &[SdModelSpec]) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(!specs.is_empty(), "no --sd-model given");
    let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
    if let Some((i, name)) = names.iter().enumerate().find(|(i, name)| names[..*i].contains(name)) {
        anyhow::bail!(
            "two --sd-model entries are named {name} ({} and {}); name them apart as NAME=DIR",
            specs[names.iter().position(|n| n == name).expect("seen")].source.display(),
            specs[i].source.display()
        );
    }
    Ok(names)
}

/// Loads the model at an index of `config.sd_models` (its hub models already pulled to folders)
/// with the adapters of `config.lora_dir`; the default model also gets `config.controlnets` and
/// `config.preview_decoder`.
fn painter_loader(
    runtime: &Runtime,
    config: &PipelineConfig,
    store: Arc<dyn crate::storage::ObjectStore>,
) -> anyhow::Result<Load<Painter>> {
    anyhow::ensure!(
        config.max_lora_weight.is_finite() && config.max_lora_weight > 0.0,
        "--max-lora-weight must be a positive number, not {}",
        config.max_lora_weight
    );
    let runtime = runtime.clone();
    let specs = config.sd_models.clone();
    let loras = LoraOptions {
        dir: config.lora_dir.clone(),
        cache_size: config.lora_cache_size,
        max_weight: config.max_lora_weight,
    };
    let (controlnets, max_side) = (config.controlnets.clone(), config.max_side);
    let preview_decoder = config.preview_decoder.clone();
    Ok(Arc::new(move |index| {
        let spec = &specs[index];
        let options = PainterOptions {
            loras: loras.clone(),
            controlnets: if index == 0 { &controlnets } else { &[] },
            preview_decoder: if index == 0 { preview_decoder.as_deref() } else { None },
            max_side,
        };
        Painter::load(&runtime, &spec.source, &options, store.clone())
            .with_context(|| format!("loading model {} from {}", spec.name, spec.source.display()))
    }))
}

/// The vision and HED models, as /info lists them.
fn model_list(vision: &Vision, hed: Option<&Hed>, provider: &str) -> Vec<ModelInfo> {
    vision
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
        .collect()
}
