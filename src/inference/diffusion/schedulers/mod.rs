//! Noise schedulers, one file each, mirroring diffusers' implementations of the same name.
//!
//! A scheduler is built from the model's `scheduler/scheduler_config.json` the way diffusers'
//! `SomeScheduler.from_config(config)` builds it: a key present in the file wins, a missing key
//! takes that scheduler's own default (DDIM defaults to "leading" spacing, the others to
//! "linspace"). Timesteps and sigmas match diffusers for the same configuration.

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod lcm;
mod schedule;
mod sigma_steps;

use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayView4, ArrayViewMut4};
use serde::Deserialize;

use super::noise::NoiseSource;

pub use ddim::DdimScheduler;
pub use dpmpp_2m::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use lcm::LcmScheduler;

/// One denoising schedule: which timesteps the UNet sees and how each prediction moves the sample.
pub trait Scheduler: Send {
    /// Builds the inference schedule for `num_inference_steps` steps and resets all state.
    fn set_timesteps(&mut self, num_inference_steps: usize);

    /// The timesteps the UNet is evaluated at, first to last.
    fn timesteps(&self) -> &[f32];

    /// The noise level of each step followed by the final one, for schedulers that work in sigma.
    fn sigmas(&self) -> Option<&[f32]>;

    /// Standard deviation of the initial noise, which text-to-image latents are scaled by.
    fn init_noise_sigma(&self) -> f32;

    /// Makes denoising start at `timesteps()[begin_index]`, as image-to-image does.
    fn set_begin_index(&mut self, begin_index: usize);

    /// Scales the UNet input for `timestep`, in place.
    fn scale_model_input(&mut self, sample: ArrayViewMut4<'_, f32>, timestep: f32);

    /// Advances `sample` from `timestep` to the next timestep given the model's prediction;
    /// ancestral and consistency steps take fresh noise from `noise`.
    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        noise: &mut dyn NoiseSource,
    );

    /// Noises clean `original` latents, in place, to the level of `timestep` (the first one
    /// denoised when image-to-image starts part-way).
    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32);
}

/// The schedulers a request can choose; serialised as their ids ("ddim", "euler", …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// DDIM, deterministic (eta = 0).
    Ddim,
    /// Euler (Karras et al. 2022, Algorithm 2 without churn).
    Euler,
    /// Euler ancestral: Euler plus fresh noise each step.
    EulerAncestral,
    /// DPM-Solver++ 2M on the model's sigmas.
    DpmPp2m,
    /// DPM-Solver++ 2M on Karras sigmas.
    DpmPp2mKarras,
    /// Latent consistency: 1 to 8 steps for LCM-distilled models and LCM-LoRA, fresh noise each
    /// step but the last.
    Lcm,
}

/// An unknown scheduler id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?}; choose one of ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm")]
pub struct UnknownScheduler(pub String);

impl SchedulerKind {
    /// Every scheduler, in the order `/info` lists them.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
    ];

    /// The request id.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The scheduler a model's config names, if it is one of ours (PNDM and others are not).
    pub fn from_config(config: &SchedulerConfig) -> Option<SchedulerKind> {
        match config.class_name.as_deref()? {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" if config.use_karras_sigmas == Some(true) => {
                Some(SchedulerKind::DpmPp2mKarras)
            }
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            "LCMScheduler" => Some(SchedulerKind::Lcm),
            _ => None,
        }
    }

    /// A fresh scheduler of this kind for `config` (call `set_timesteps` before use).
    pub fn build(self, config: &SchedulerConfig) -> Box<dyn Scheduler> {
        match self {
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)),
            SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)),
            SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)),
            SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::new(config, false)),
            SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistepScheduler::new(config, true)),
            SchedulerKind::Lcm => Box::new(LcmScheduler::new(config)),
        }
    }

    /// The most inference steps this scheduler can run on `config`: LCM picks its steps from the
    /// schedule the model was distilled on (`original_inference_steps`, 50 by default).
    pub fn max_steps(self, config: &SchedulerConfig) -> Option<usize> {
        match self {
            SchedulerKind::Lcm => Some(lcm::lcm_original_steps(config)),
            _ => None,
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<SchedulerKind, UnknownScheduler> {
        SchedulerKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownScheduler(s.to_string()))
    }
}

impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SchedulerKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        id.parse().map_err(serde::de::Error::custom)
    }
}

/// How betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in beta.
    Linear,
    /// Linear in sqrt(beta), the latent-diffusion schedule.
    ScaledLinear,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity v = alpha * noise - sigma * sample (Salimans & Ho 2022).
    VPrediction,
}

/// How inference timesteps are spread over the training ones (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from the last training timestep to 0, rounded.
    Linspace,
    /// Multiples of `num_train_timesteps / steps` from 0, plus `steps_offset`.
    Leading,
    /// Evenly down from the last training timestep.
    Trailing,
}

/// The noise level after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// Fully denoised.
    Zero,
    /// The smallest training sigma.
    SigmaMin,
}

/// `scheduler/scheduler_config.json`; absent keys take the chosen scheduler's default.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class the model was saved with.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Length of the training schedule.
    pub num_train_timesteps: Option<usize>,
    /// First training beta.
    pub beta_start: Option<f64>,
    /// Last training beta.
    pub beta_end: Option<f64>,
    /// How betas grow.
    pub beta_schedule: Option<BetaSchedule>,
    /// What the UNet predicts.
    pub prediction_type: Option<PredictionType>,
    /// How inference timesteps are spread.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to "leading" timesteps.
    pub steps_offset: Option<i64>,
    /// DDIM: whether the step past the last uses alpha = 1 rather than `alphas_cumprod[0]`.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted clean sample.
    pub clip_sample: Option<bool>,
    /// DDIM: the clipping bound.
    pub clip_sample_range: Option<f64>,
    /// Euler and DPM-Solver: use Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Euler and DPM-Solver: the sigma after the last step.
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// DPM-Solver: first-order final steps when there are fewer than 15.
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: always a first-order final step.
    pub euler_at_final: Option<bool>,
    /// LCM: the length of the schedule the model was distilled on.
    pub original_inference_steps: Option<usize>,
    /// LCM: how timesteps are scaled in the consistency boundary condition.
    pub timestep_scaling: Option<f64>,
    /// Options this implementation does not have; set to a non-default value they are refused.
    #[serde(flatten)]
    pub unsupported: UnsupportedOptions,
}

/// Scheduler options diffusers has and deskgen does not implement.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UnsupportedOptions {
    trained_betas: Option<serde_json::Value>,
    thresholding: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
    interpolation_type: Option<String>,
    timestep_type: Option<String>,
    solver_type: Option<String>,
    lambda_min_clipped: Option<serde_json::Value>,
    sigma_min: Option<serde_json::Value>,
    sigma_max: Option<serde_json::Value>,
}

impl SchedulerConfig {
    /// Parses the JSON text of `scheduler_config.json`, refusing options that would silently
    /// change the schedule if ignored.
    pub fn from_json(text: &str) -> Result<SchedulerConfig, String> {
        let config: SchedulerConfig =
            serde_json::from_str(&nonfinite_as_null(text)).map_err(|e| e.to_string())?;
        let u = &config.unsupported;
        let refused = [
            ("trained_betas", u.trained_betas.as_ref().is_some_and(|v| !v.is_null())),
            ("thresholding", u.thresholding == Some(true)),
            ("rescale_betas_zero_snr", u.rescale_betas_zero_snr == Some(true)),
            ("use_exponential_sigmas", u.use_exponential_sigmas == Some(true)),
            ("use_beta_sigmas", u.use_beta_sigmas == Some(true)),
            ("use_lu_lambdas", u.use_lu_lambdas == Some(true)),
            ("interpolation_type", u.interpolation_type.as_deref().is_some_and(|t| t != "linear")),
            ("timestep_type", u.timestep_type.as_deref().is_some_and(|t| t != "discrete")),
            ("solver_type", u.solver_type.as_deref().is_some_and(|t| t != "midpoint")),
            ("sigma_min", u.sigma_min.as_ref().is_some_and(|v| !v.is_null())),
            ("sigma_max", u.sigma_max.as_ref().is_some_and(|v| !v.is_null())),
            (
                "lambda_min_clipped",
                u.lambda_min_clipped.as_ref().is_some_and(|v| v.as_f64().is_some_and(f64::is_finite)),
            ),
        ];
        match refused.iter().find(|(_, is_set)| *is_set) {
            Some((name, _)) => Err(format!("scheduler option `{name}` is not supported")),
            None => Ok(config),
        }
    }

    fn train_steps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    fn alphas_cumprod(&self) -> Vec<f32> {
        schedule::alphas_cumprod(
            self.beta_schedule.unwrap_or(BetaSchedule::Linear),
            self.beta_start.unwrap_or(0.0001),
            self.beta_end.unwrap_or(0.02),
            self.train_steps(),
        )
    }
}

/// Python's `json` writes infinite floats as bare `-Infinity` (diffusers saves
/// `lambda_min_clipped` so), which strict JSON parsers refuse; they become `null` here.
fn nonfinite_as_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            let len = match c {
                '\\' => 1 + rest[1..].chars().next().map_or(0, char::len_utf8),
                _ => c.len_utf8(),
            };
            in_string = c != '"';
            out.push_str(&rest[..len]);
            rest = &rest[len..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        in_string = c == '"';
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Where image-to-image starts in a schedule of `num_inference_steps` for `strength`, as
/// diffusers' `get_timesteps`: `steps - min(int(steps * strength), steps)`. It equals `steps`
/// (nothing left to run) when `steps * strength < 1`.
pub fn img2img_start_index(num_inference_steps: usize, strength: f32) -> usize {
    // The request's strength is a decimal like 0.7; diffusers multiplies that decimal as a
    // Python float. Widening the f32 (0.699999988…) would drop a step at exact products.
    let strength: f64 = strength.to_string().parse().unwrap_or(f64::from(strength));
    let init_timestep = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    num_inference_steps - init_timestep
}

/// The step index of `timestep` in `timesteps` the way diffusers' `index_for_timestep` picks it:
/// the second match when the value repeats, so a schedule entered mid-way does not skip a sigma.
fn index_for_timestep(timesteps: &[f32], timestep: f32) -> usize {
    let mut matches = timesteps.iter().enumerate().filter(|(_, t)| **t == timestep).map(|(i, _)| i);
    let first = matches.next();
    matches.next().or(first).unwrap_or(timesteps.len() - 1)
}
