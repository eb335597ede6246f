//! Stable Diffusion 1.x and XL on ONNX Runtime, from a model directory in optimum's export layout
//! (`model_index.json`, `scheduler/`, `tokenizer/`, `text_encoder/`, `unet/`, `vae_encoder/`,
//! `vae_decoder/`, and for XL `tokenizer_2/` and `text_encoder_2/`).
//!
//! The pipeline follows diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` and their
//! image-to-image variants step for step, so the same ONNX files, prompt and initial noise give
//! the same image as optimum's ONNX Runtime pipelines (see `tests/diffusion.rs`).
//!
//! # Randomness
//! A generation is a pure function of its parameters and `seed`. The random stream is
//! `ChaCha8Rng::seed_from_u64(seed)` (rand_chacha), read as float32 standard normals
//! (`rand_distr::StandardNormal`) in C order:
//! 1. first the initial noise, shaped like the latents `[1, C, height / 8, width / 8]`;
//! 2. then one latent-shaped draw per step for the schedulers that add fresh noise: Euler
//!    ancestral every step, LCM every step but the last.
//!
//! [`StableDiffusion::generate_with_noise`] takes these draws from any [`NoiseSource`] instead,
//! which is how the tests replay diffusers' own draws.
//!
//! The initial noise is used as diffusers uses the `latents=` argument (text-to-image: multiplied
//! by the scheduler's `init_noise_sigma`) or its single noise draw (image-to-image: added to the
//! encoded photo at the first timestep run). Image-to-image encodes the photo to the mean of the
//! VAE's latent distribution, so it draws nothing for the encoder.

mod config;
mod controlnet;
mod defaults;
mod inpaint;
pub mod lora;
pub mod mask;
mod noise;
mod pipeline;
mod preview;
pub mod schedulers;
mod tensor;
mod text_encoder;
mod tokenizer;
mod unet;
mod vae;
mod variant;

use std::path::PathBuf;

use crate::inference::RuntimeError;

pub use config::{DiffusionConfig, ModelFamily};
pub use controlnet::{ControlUnit, MAX_CONTROL_SCALE, is_guidance_window};
pub use defaults::{DEFAULTS_FILE, ModelDefaults};
pub use inpaint::InpaintMask;
pub use noise::{BatchNoise, NoiseSource, SeededNoise};
pub use pipeline::{
    Denoised, GenerateParams, Generated, MAX_BATCH, MAX_STEPS, PromptEmbeddings, StableDiffusion, Step,
    Timings,
};
pub use preview::{LatentPreview, PreviewDecoder};
pub use schedulers::{Scheduler, SchedulerKind, UnknownScheduler};
pub use tokenizer::ClipTokenizer;
pub use variant::{MANIFEST, resolve_variant};

/// Everything that can go wrong loading or running a diffusion pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// ONNX Runtime could not be used or refused a model file.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A file the pipeline needs is not in the model directory.
    #[error("model file {} is missing", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A config file is malformed, inconsistent with another, or asks for something unsupported.
    #[error("invalid model config {}: {reason}", path.display())]
    Config {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be loaded or could not encode a prompt.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A sub-model failed while running or returned something unexpected.
    #[error("{model} failed: {reason}")]
    Inference {
        /// Which sub-model: text_encoder, unet, vae_encoder, …
        model: &'static str,
        /// ONNX Runtime's message or what was wrong with the output.
        reason: String,
    },
    /// A generation parameter is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidParams {
        /// The parameter's name as requests spell it.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
    /// A LoRA adapter could not be read, does not fit the model, or was asked for wrongly.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// The progress callback asked to stop.
    #[error("generation canceled")]
    Canceled,
}
