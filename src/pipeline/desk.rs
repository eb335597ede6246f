//! The real pipeline: photo → vision → plan → prompt → Stable Diffusion → store → shopping.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use image::{ImageEncoder, RgbImage};

use super::plan::{Category, PipelineSettings, PromptInput};
use super::{LoraInfo, ModelInfo, Pipeline, PipelineInfo};
use crate::fetch::{FetchConfig, FetchError, Fetcher};
use crate::inference::diffusion::lora::{LoraOptions, extract_prompt_loras};
use crate::inference::diffusion::schedulers::img2img_start_index;
use crate::inference::diffusion::{DiffusionError, GenerateParams, SchedulerKind, StableDiffusion};
use crate::inference::vision::{SceneAnalysis, Vision, VisionConfig};
use crate::inference::{Runtime, RuntimeConfig};
use crate::shopping::{ShoppingConfig, ShoppingProvider};
use crate::storage::{ObjectStore, StorageConfig};
use crate::tasks::worker::TaskContext;
use crate::tasks::{
    BoundingBox, DetectedItem, ErrorCode, LoraWeight, Recommendation, TaskError, TaskOutput, TaskRecord,
    TaskRequest,
};

/// Everything the pipeline loads: models, settings and the outside services it talks to.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineConfig {
    /// ONNX Runtime settings.
    #[command(flatten)]
    pub runtime: RuntimeConfig,
    /// Vision models.
    #[command(flatten)]
    pub vision: VisionConfig,
    /// Stable Diffusion pipeline folder in optimum's ONNX layout (the default is a tiny random-weight
    /// pipeline whose images are noise; see README for real weights).
    #[arg(long, env = "DESKGEN_SD_MODEL", default_value = "onnx/fixtures/tiny-sd15")]
    pub sd_model: PathBuf,
    /// Folder of LoRA adapters (`*.safetensors`, diffusers/peft or kohya format, trigger words in
    /// `<name>.json` / `<name>.txt`) that requests may name; files that do not fit the model are
    /// skipped with a warning.
    #[arg(long, env = "DESKGEN_LORA_DIR", default_value = "onnx/loras")]
    pub lora_dir: PathBuf,
    /// How many merged UNet/text-encoder session sets (one per distinct set of LoRA names and
    /// weights) are kept for reuse; each holds a copy of the models it changes. 0 merges per request.
    #[arg(long, env = "DESKGEN_LORA_CACHE_SIZE", default_value_t = 2)]
    pub lora_cache_size: usize,
    /// Largest |weight| a request may give one LoRA adapter (negative weights down to -this work).
    #[arg(long, env = "DESKGEN_MAX_LORA_WEIGHT", default_value_t = 2.0)]
    pub max_lora_weight: f32,
    /// Category table and prompt templates (TOML); the built-in config/pipeline.toml when unset.
    #[arg(long, env = "DESKGEN_PIPELINE_CONFIG")]
    pub pipeline_config: Option<PathBuf>,
    /// Object storage for generated images.
    #[command(flatten)]
    pub storage: StorageConfig,
    /// Downloading users' photos.
    #[command(flatten)]
    pub fetch: FetchConfig,
    /// Shopping offers.
    #[command(flatten)]
    pub shopping: ShoppingConfig,
}

/// The product's pipeline over real models and services.
pub struct DeskPipeline {
    vision: Arc<Vision>,
    diffusion: Arc<StableDiffusion>,
    store: Arc<dyn ObjectStore>,
    fetcher: Fetcher,
    shopping: Arc<dyn ShoppingProvider>,
    settings: PipelineSettings,
    models: Vec<ModelInfo>,
    loras: Vec<LoraInfo>,
    max_lora_weight: f32,
    max_image_bytes: u64,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> TaskError {
    TaskError { code, message: message.into() }
}

/// Stage timings in milliseconds.
#[derive(Default)]
struct Stopwatch(BTreeMap<String, f64>);

impl Stopwatch {
    fn record(&mut self, stage: &str, since: Instant) {
        *self.0.entry(stage.to_string()).or_default() += since.elapsed().as_secs_f64() * 1000.0;
    }
}

impl DeskPipeline {
    /// Loads every model and the outside services; blocking (run it off the async runtime).
    pub fn load(config: &PipelineConfig, store: Arc<dyn ObjectStore>) -> anyhow::Result<DeskPipeline> {
        let runtime = Runtime::init(&config.runtime)?;
        let provider = runtime.provider().as_str().to_string();
        let vision = Vision::load(&runtime, &config.vision)?;
        let mut diffusion = StableDiffusion::load(&runtime, &config.sd_model)?;
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
        let loras = diffusion
            .lora_library()
            .map(|library| {
                library
                    .adapters()
                    .map(|a| LoraInfo {
                        name: a.name.clone(),
                        rank: a.rank as u32,
                        target_modules: a.target_modules.clone(),
                        trigger_words: a.trigger_words.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if runtime.for_model("unet").provider() == crate::inference::ExecutionProvider::Cuda {
            // The first run of each shape on CUDA searches cuDNN's algorithms (about a second):
            // pay it here, before health reports SERVING, not in the first request.
            let timings = diffusion.warm_up()?;
            tracing::info!(
                unet_ms = timings.unet_ms,
                vae_ms = timings.vae_ms,
                "diffusion pipeline warmed up"
            );
        }
        let sd_dir = diffusion.config().dir.clone();
        let settings = PipelineSettings::load(config.pipeline_config.as_deref())?;
        let shopping = crate::shopping::build(&config.shopping)?;
        let fetcher = Fetcher::new(&config.fetch)?;
        let mut models: Vec<ModelInfo> = vision
            .models()
            .into_iter()
            .map(|m| ModelInfo {
                id: m.id,
                path: m.path.display().to_string(),
                sha256: m.sha256,
                size_bytes: m.size_bytes,
                execution_provider: provider.clone(),
            })
            .collect();
        models.push(ModelInfo {
            id: "stable-diffusion".into(),
            path: sd_dir.display().to_string(),
            sha256: crate::inference::sha256_file(&sd_dir.join("unet/model.onnx"))?,
            size_bytes: dir_size(&sd_dir),
            execution_provider: provider,
        });
        Ok(DeskPipeline {
            vision: Arc::new(vision),
            diffusion: Arc::new(diffusion),
            store,
            fetcher,
            shopping,
            settings,
            models,
            loras,
            max_lora_weight: config.max_lora_weight,
            max_image_bytes: config.fetch.max_image_bytes,
        })
    }

    /// The photo's bytes: through the object store when the URL points into it, else the SSRF-safe fetcher.
    async fn fetch_photo(&self, url: &str) -> Result<Bytes, TaskError> {
        if let Some(key) = self.store.key_for_url(url) {
            return self.store.get(&key, self.max_image_bytes).await.map_err(|e| {
                fail(ErrorCode::ImageFetchFailed, format!("Cannot read the photo from storage: {e}"))
            });
        }
        let fetched = self.fetcher.fetch(url).await.map_err(|e| {
            let code = match e {
                FetchError::NotImage { .. } => ErrorCode::InvalidImage,
                _ => ErrorCode::ImageFetchFailed,
            };
            fail(code, format!("Cannot fetch the photo: {e}"))
        })?;
        Ok(fetched.bytes)
    }

    async fn look_at(
        &self,
        photo: RgbImage,
        timings: &mut Stopwatch,
        ctx: &TaskContext,
    ) -> Result<(RgbImage, SceneAnalysis, String), TaskError> {
        ctx.progress("vision", 0, 2);
        let vision = self.vision.clone();
        let started = Instant::now();
        let (photo, analysis) = tokio::task::spawn_blocking(move || {
            let analysis = vision.analyze(&photo);
            (photo, analysis)
        })
        .await
        .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let analysis =
            analysis.map_err(|e| fail(ErrorCode::ModelError, format!("Vision models failed: {e}")))?;
        timings.record("vision", started);
        ctx.check()?;
        ctx.progress("caption", 1, 2);
        let vision = self.vision.clone();
        let started = Instant::now();
        let (photo, analysis, caption) = tokio::task::spawn_blocking(move || {
            let caption = vision.caption(&photo, &analysis);
            (photo, analysis, caption)
        })
        .await
        .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let caption = caption.map_err(|e| fail(ErrorCode::ModelError, format!("Captioning failed: {e}")))?;
        timings.record("caption", started);
        Ok((photo, analysis, caption))
    }

    async fn generate(
        &self,
        params: GenerateParams,
        ctx: &TaskContext,
        timings: &mut Stopwatch,
    ) -> Result<Vec<u8>, DiffusionError> {
        let with_loras = !params.loras.is_empty();
        let diffusion = self.diffusion.clone();
        let step_ctx = ctx.clone();
        let generated = tokio::task::spawn_blocking(move || {
            diffusion.generate(&params, &mut |done, total| {
                step_ctx.progress("diffusion", done, total);
                if step_ctx.check().is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
        })
        .await
        .map_err(|e| DiffusionError::Inference { model: "pipeline", reason: e.to_string() })??;
        if with_loras {
            timings.0.insert("lora".into(), generated.timings.lora_ms);
        }
        timings.0.insert("text_encode".into(), generated.timings.text_encode_ms);
        timings.0.insert("unet".into(), generated.timings.unet_ms);
        timings.0.insert("vae".into(), generated.timings.vae_ms);
        let started = Instant::now();
        let png = encode_png(&generated.image);
        timings.record("encode_png", started);
        Ok(png)
    }

    /// The user's text without `<lora:…>` tags (none if nothing else is left) and the adapters to
    /// apply: the request's `loras`, then tags for adapters it does not name (a name in both keeps
    /// the request's weight; a tag given twice keeps the last).
    fn requested_loras(
        &self,
        prompt: Option<&str>,
        requested: &[LoraWeight],
    ) -> Result<RequestedLoras, TaskError> {
        let mut loras: Vec<(String, f32)> = requested.iter().map(|l| (l.name.clone(), l.weight)).collect();
        let Some(prompt) = prompt else { return Ok(RequestedLoras { user_text: None, loras }) };
        let tagged = extract_prompt_loras(prompt).map_err(|e| fail(ErrorCode::InvalidInput, e))?;
        for (name, weight) in tagged.loras {
            if !requested.iter().any(|l| l.name == name) {
                loras.retain(|(n, _)| *n != name);
                loras.push((name, weight));
            }
        }
        let user_text = Some(tagged.text).filter(|t| !t.trim().is_empty());
        Ok(RequestedLoras { user_text, loras })
    }

    /// Trigger words of the adapters that take part (weight not 0), each once, in request order.
    fn trigger_words(&self, loras: &[(String, f32)]) -> Vec<String> {
        let mut words: Vec<String> = Vec::new();
        for (name, _) in loras.iter().filter(|(_, w)| *w != 0.0) {
            let Some(info) = self.loras.iter().find(|l| &l.name == name) else { continue };
            for word in &info.trigger_words {
                if !words.contains(word) {
                    words.push(word.clone());
                }
            }
        }
        words
    }

    /// Runs a request whose photo (if any) is already in hand: decode, vision, plan, prompt,
    /// generation, upload, shopping. `deskgen generate` uses it for local files.
    pub async fn run_with_photo(
        &self,
        request: &TaskRequest,
        photo_bytes: Option<Bytes>,
        ctx: &TaskContext,
    ) -> Result<TaskOutput, TaskError> {
        let mut timings = Stopwatch::default();
        // `<lora:name:weight>` tags leave the text before it reaches the planner or the tokenizer.
        let RequestedLoras { user_text, loras } =
            self.requested_loras(request.prompt.as_deref(), &request.loras)?;
        let user_text = user_text.as_deref();
        let mut output =
            TaskOutput { initial_image_url: request.initial_image_url.clone(), ..TaskOutput::default() };

        let mut photo = None;
        let mut analysis = None;
        if let Some(bytes) = photo_bytes {
            let vision = self.vision.clone();
            let started = Instant::now();
            let decoded = tokio::task::spawn_blocking(move || vision.decode(&bytes))
                .await
                .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?
                .map_err(|e| fail(ErrorCode::InvalidImage, format!("The photo cannot be used: {e}")))?;
            timings.record("decode", started);
            ctx.check()?;
            let (decoded, scene, caption) = self.look_at(decoded, &mut timings, ctx).await?;
            output.is_desk = Some(scene.is_desk);
            output.caption = Some(caption);
            output.detected_items = scene
                .detections
                .iter()
                .map(|d| DetectedItem {
                    label: d.label.clone(),
                    score: d.score,
                    bbox: BoundingBox {
                        x_min: d.bbox[0],
                        y_min: d.bbox[1],
                        x_max: d.bbox[2],
                        y_max: d.bbox[3],
                    },
                })
                .collect();
            photo = Some(decoded);
            analysis = Some(scene);
        }
        ctx.check()?;

        let plan: Vec<Category> = self
            .settings
            .plan(analysis.as_ref().map(|a| a.items.as_slice()), user_text)
            .into_iter()
            .cloned()
            .collect();
        let per_category = request.max_items_per_category as usize;
        // Runs beside generation; dropped (and aborted) if the task ends early.
        let shopping = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(shop(
            self.shopping.clone(),
            plan.clone(),
            per_category,
        )));

        let is_desk = analysis.as_ref().is_none_or(|a| a.is_desk);
        if is_desk {
            let categories: Vec<&Category> = plan.iter().collect();
            let triggers = self.trigger_words(&loras);
            let prompt = self.settings.prompt(&PromptInput {
                caption: output.caption.as_deref(),
                categories: &categories,
                user_text,
                triggers: &triggers,
            });
            let negative =
                request.negative_prompt.clone().unwrap_or_else(|| self.settings.prompt.negative.clone());
            output.prompt_used = Some(prompt.clone());
            output.negative_prompt_used = Some(negative.clone());
            let (native_w, native_h) = self.diffusion.native_size();
            let seed = request.seed.unwrap_or_else(rand::random);
            output.seed = Some(seed);
            let scheduler = match &request.scheduler {
                Some(id) => {
                    id.parse::<SchedulerKind>().map_err(|e| fail(ErrorCode::InvalidInput, e.to_string()))?
                }
                None => self.diffusion.default_scheduler(),
            };
            let params = GenerateParams {
                prompt,
                negative_prompt: negative,
                num_inference_steps: request.num_inference_steps,
                guidance_scale: request.guidance_scale,
                width: request.width.unwrap_or(native_w),
                height: request.height.unwrap_or(native_h),
                strength: request.strength,
                seed,
                scheduler,
                init_image: photo,
                guidance_rescale: 0.0,
                loras,
            };
            // img2img runs only the last `strength` of the schedule (at least one step).
            let steps = request.num_inference_steps as usize;
            let to_run = match params.init_image {
                Some(_) => (steps - img2img_start_index(steps, params.strength)).max(1),
                None => steps,
            };
            ctx.progress("diffusion", 0, to_run as u32);
            match self.generate(params, ctx, &mut timings).await {
                Ok(png) => {
                    ctx.progress("upload", 0, 1);
                    let started = Instant::now();
                    let key = crate::storage::new_image_key();
                    let url = self.store.put_png(&key, Bytes::from(png)).await.map_err(|e| {
                        tracing::warn!(task_id = ctx.task_id(), error = %e, "upload failed");
                        fail(ErrorCode::S3UploadFailed, "Failed to upload image to S3.")
                    })?;
                    timings.record("upload", started);
                    output.processed_image_url = Some(url);
                }
                Err(DiffusionError::InvalidParams { field, reason }) => {
                    return Err(fail(ErrorCode::InvalidInput, format!("{field}: {reason}")));
                }
                Err(DiffusionError::Canceled) => {
                    ctx.check()?;
                    return Err(fail(ErrorCode::Canceled, "Canceled by the client."));
                }
                Err(e) => {
                    tracing::warn!(task_id = ctx.task_id(), error = %e, "generation failed; falling back to shopping");
                    output.warnings.push(format!("Image generation failed: {e}"));
                }
            }
        } else {
            output.warnings.push("The photo does not look like a desk, so no image was generated.".into());
        }
        ctx.check()?;
        ctx.progress("shopping", 0, 1);
        let (recommendations, warnings, shopping_ms) =
            shopping.await.map_err(|e| fail(ErrorCode::Internal, format!("shopping task: {e}")))?;
        timings.0.insert("shopping".into(), shopping_ms);
        output.recommendations = recommendations;
        output.warnings.extend(warnings);
        output.timings_ms = timings.0;
        Ok(output)
    }
}

/// A request's text and adapters once `<lora:…>` tags are taken out of the prompt.
struct RequestedLoras {
    /// The user's text without the tags; none if nothing else was there.
    user_text: Option<String>,
    /// (name, weight) of every adapter to apply.
    loras: Vec<(String, f32)>,
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

fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8)
        .expect("encoding to memory cannot fail");
    png
}

/// Looks up every category at once; failures become warnings. Returns the time it took in ms.
async fn shop(
    provider: Arc<dyn ShoppingProvider>,
    categories: Vec<Category>,
    per_category: usize,
) -> (Vec<Recommendation>, Vec<String>, f64) {
    let started = Instant::now();
    let lookups = categories.into_iter().map(|category| {
        let provider = provider.clone();
        async move {
            let found = provider.search(&category.query, per_category).await;
            (category, found)
        }
    });
    let mut recommendations = Vec::new();
    let mut warnings = Vec::new();
    for (category, found) in futures::future::join_all(lookups).await {
        match found {
            Ok(mut offers) => {
                offers.truncate(per_category);
                recommendations.push(Recommendation {
                    category: category.id.clone(),
                    display_name: category.display.clone(),
                    items: offers,
                });
            }
            Err(e) => warnings.push(format!("Shopping lookup for {} failed: {e}", category.display)),
        }
    }
    (recommendations, warnings, started.elapsed().as_secs_f64() * 1000.0)
}

#[async_trait]
impl Pipeline for DeskPipeline {
    async fn run(&self, task: &TaskRecord, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        let mut photo = None;
        let mut fetch_ms = None;
        if let Some(url) = &task.request.initial_image_url {
            ctx.progress("fetch", 0, 1);
            let started = Instant::now();
            photo = Some(self.fetch_photo(url).await?);
            fetch_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            ctx.check()?;
        }
        let mut output = self.run_with_photo(&task.request, photo, ctx).await?;
        if let Some(ms) = fetch_ms {
            output.timings_ms.insert("fetch".into(), ms);
        }
        Ok(output)
    }

    fn info(&self) -> PipelineInfo {
        PipelineInfo {
            models: self.models.clone(),
            schedulers: SchedulerKind::ALL.iter().map(|s| s.as_str().to_string()).collect(),
            default_scheduler: self.diffusion.default_scheduler().as_str().to_string(),
            native_size: self.diffusion.native_size().0,
            size_multiple: self.diffusion.config().size_multiple as u32,
            loras: self.loras.clone(),
            max_lora_weight: self.max_lora_weight,
            negative_prompt: self.settings.prompt.negative.clone(),
            object_store: self.store.kind().to_string(),
            shopping_provider: self.shopping.name().to_string(),
        }
    }
}
