//! The model directory's JSON configs, read and cross-checked before any session is built.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::DiffusionError;
use super::defaults::ModelDefaults;
use super::schedulers::{SchedulerConfig, SchedulerKind};

/// Which Stable Diffusion architecture a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x / 2.x: one CLIP text encoder.
    StableDiffusion,
    /// SDXL: two text encoders, pooled text embeddings and size conditioning.
    StableDiffusionXl,
}

impl ModelFamily {
    /// The name /info gives it: "sd" (1.x/2.x) or "sdxl".
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::StableDiffusion => "sd",
            ModelFamily::StableDiffusionXl => "sdxl",
        }
    }
}

/// What the pipeline needs to know from the model directory.
#[derive(Debug, Clone)]
pub struct DiffusionConfig {
    /// The model directory.
    pub dir: PathBuf,
    /// SD 1.x or XL (XL when `text_encoder_2/` exists).
    pub family: ModelFamily,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: SchedulerConfig,
    /// The scheduler used when a request names none: `deskgen-defaults.json`'s, else the model's
    /// own if implemented, else DPM++ 2M.
    pub default_scheduler: SchedulerKind,
    /// `deskgen-defaults.json`: the model's own generation defaults.
    pub defaults: ModelDefaults,
    /// Channels of the latent space.
    pub latent_channels: usize,
    /// Channels of the UNet's sample: the latent channels, or for an inpainting UNet those twice
    /// over plus the mask (9 for Stable Diffusion).
    pub unet_in_channels: usize,
    /// Pixels per latent along each side: 2^(VAE blocks - 1), 8 for Stable Diffusion.
    pub vae_scale_factor: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub vae_scaling_factor: f32,
    /// The UNet's training resolution, in latents.
    pub sample_size: usize,
    /// Sides must be multiples of this many pixels for the UNet's down- and up-sampling to line up.
    pub size_multiple: usize,
    /// `num_hidden_layers` of each text encoder, in order.
    pub text_encoder_layers: Vec<usize>,
    /// SDXL: use zero embeddings, not an encoded "", for an empty negative prompt.
    pub force_zeros_for_empty_prompt: bool,
}

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    force_zeros_for_empty_prompt: Option<bool>,
    requires_aesthetics_score: Option<bool>,
}

#[derive(Deserialize)]
struct UnetConfig {
    in_channels: usize,
    sample_size: usize,
    block_out_channels: Vec<usize>,
    cross_attention_dim: serde_json::Value,
    addition_embed_type: Option<String>,
    time_cond_proj_dim: Option<usize>,
}

#[derive(Deserialize)]
struct VaeConfig {
    latent_channels: usize,
    scaling_factor: f32,
    block_out_channels: Vec<usize>,
    shift_factor: Option<f32>,
    latents_mean: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TextEncoderConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
}

/// Reads and parses one JSON file, naming it in any error.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, DiffusionError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiffusionError::MissingFile { path: path.to_path_buf() },
        _ => config_error(path, e.to_string()),
    })?;
    serde_json::from_str(&text).map_err(|e| config_error(path, e.to_string()))
}

pub(crate) fn config_error(path: &Path, reason: impl Into<String>) -> DiffusionError {
    DiffusionError::Config { path: path.to_path_buf(), reason: reason.into() }
}

/// The path of a required file, or an error naming it.
pub(crate) fn required_file(dir: &Path, relative: &str) -> Result<PathBuf, DiffusionError> {
    let path = dir.join(relative);
    if path.is_file() { Ok(path) } else { Err(DiffusionError::MissingFile { path }) }
}

impl DiffusionConfig {
    /// Whether the UNet is an inpainting one (it takes the mask and the masked photo's latents).
    pub fn is_inpainting(&self) -> bool {
        self.unet_in_channels != self.latent_channels
    }

    /// Reads every config of the model directory `dir` and checks that they fit together.
    pub fn load(dir: &Path) -> Result<DiffusionConfig, DiffusionError> {
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        if index.requires_aesthetics_score == Some(true) {
            return Err(config_error(
                &index_path,
                "SDXL refiner models (requires_aesthetics_score) are not supported",
            ));
        }
        let family = if dir.join("text_encoder_2").is_dir() {
            ModelFamily::StableDiffusionXl
        } else {
            ModelFamily::StableDiffusion
        };

        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_text = std::fs::read_to_string(&scheduler_path)
            .map_err(|_| DiffusionError::MissingFile { path: scheduler_path.clone() })?;
        let scheduler = SchedulerConfig::from_json(&scheduler_text)
            .map_err(|reason| config_error(&scheduler_path, reason))?;

        let unet_path = dir.join("unet/config.json");
        let unet: UnetConfig = read_json(&unet_path)?;
        let vae_path = dir.join("vae_decoder/config.json");
        let vae: VaeConfig = read_json(&vae_path)?;
        if vae.shift_factor.is_some() || vae.latents_mean.as_ref().is_some_and(|m| !m.is_null()) {
            return Err(config_error(&vae_path, "VAEs with shift_factor or latents_mean are not supported"));
        }

        let mut encoders = vec!["text_encoder"];
        if family == ModelFamily::StableDiffusionXl {
            encoders.push("text_encoder_2");
        }
        let encoder_configs = encoders
            .iter()
            .map(|name| read_json::<TextEncoderConfig>(&dir.join(name).join("config.json")))
            .collect::<Result<Vec<_>, _>>()?;

        let text_width: usize = encoder_configs.iter().map(|c| c.hidden_size).sum();
        check_unet(&unet_path, &unet, &vae, text_width, family, index.class_name.as_deref())?;

        let vae_scale_factor = 1 << (vae.block_out_channels.len() - 1);
        let size_multiple = vae_scale_factor << (unet.block_out_channels.len() - 1);
        let defaults = ModelDefaults::load(dir, size_multiple)?;
        let default_scheduler = defaults
            .scheduler
            .or_else(|| SchedulerKind::from_config(&scheduler))
            .unwrap_or(SchedulerKind::DpmPp2m);
        Ok(DiffusionConfig {
            dir: dir.to_path_buf(),
            family,
            scheduler,
            default_scheduler,
            defaults,
            latent_channels: vae.latent_channels,
            unet_in_channels: unet.in_channels,
            vae_scale_factor,
            vae_scaling_factor: vae.scaling_factor,
            sample_size: unet.sample_size,
            size_multiple,
            text_encoder_layers: encoder_configs.iter().map(|c| c.num_hidden_layers).collect(),
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
        })
    }
}

/// Checks that the UNet in `path` fits the VAE, the text encoders (`text_width` wide) and the family.
fn check_unet(
    path: &Path,
    unet: &UnetConfig,
    vae: &VaeConfig,
    text_width: usize,
    family: ModelFamily,
    class_name: Option<&str>,
) -> Result<(), DiffusionError> {
    if unet.in_channels != vae.latent_channels && unet.in_channels != 2 * vae.latent_channels + 1 {
        return Err(config_error(
            path,
            format!(
                "in_channels {} fits neither the VAE's latent_channels {} (vae_decoder/config.json) \
                 nor an inpainting UNet's {}",
                unet.in_channels,
                vae.latent_channels,
                2 * vae.latent_channels + 1
            ),
        ));
    }
    if unet.cross_attention_dim.as_u64() != Some(text_width as u64) {
        return Err(config_error(
            path,
            format!(
                "cross_attention_dim {} does not match the text encoders' hidden size {text_width}",
                unet.cross_attention_dim
            ),
        ));
    }
    let wants_text_time = family == ModelFamily::StableDiffusionXl;
    if (unet.addition_embed_type.as_deref() == Some("text_time")) != wants_text_time {
        return Err(config_error(
            path,
            format!(
                "addition_embed_type {:?} does not fit a {} pipeline",
                unet.addition_embed_type,
                class_name.unwrap_or("Stable Diffusion")
            ),
        ));
    }
    if unet.time_cond_proj_dim.is_some() {
        return Err(config_error(path, "guidance-distilled UNets (time_cond_proj_dim) are not supported"));
    }
    if vae.block_out_channels.is_empty() || unet.block_out_channels.is_empty() {
        return Err(config_error(path, "block_out_channels is empty"));
    }
    Ok(())
}
