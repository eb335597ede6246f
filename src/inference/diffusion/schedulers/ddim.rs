//! DDIM (Song et al. 2020), deterministic (eta = 0), as diffusers' `DDIMScheduler`.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};

use super::super::noise::NoiseSource;
use super::schedule::{add_training_noise, spaced_timesteps, training_pred_original_sample};
use super::{PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// Denoising diffusion implicit models with eta = 0.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    clip_sample: Option<f32>,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
}

impl DdimScheduler {
    /// A DDIM scheduler for `config`, with DDIM's defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> DdimScheduler {
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_sample =
            config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            num_train_timesteps: config.train_steps(),
            prediction_type: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset.unwrap_or(0),
            clip_sample,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        }
    }

    fn alpha_prod(&self, timestep: i64) -> f64 {
        match usize::try_from(timestep) {
            Ok(t) => f64::from(self.alphas_cumprod[t]),
            Err(_) => f64::from(self.final_alpha_cumprod),
        }
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        self.num_inference_steps = num_inference_steps;
        // DDIM timesteps are integers: linspace values are rounded half to even, as numpy does.
        self.timesteps = spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        )
        .into_iter()
        .map(|t| t.round_ties_even() as f32)
        .collect();
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn set_begin_index(&mut self, _begin_index: usize) {
        // DDIM's update depends on the timestep alone.
    }

    fn scale_model_input(&mut self, _sample: ArrayViewMut4<'_, f32>, _timestep: f32) {}

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        _noise: &mut dyn NoiseSource,
    ) {
        let timestep = timestep as i64;
        // diffusers steps back by the "leading" stride whatever the spacing.
        let prev_timestep = timestep - (self.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_prod_t = self.alpha_prod(timestep);
        let alpha_prod_t_prev = self.alpha_prod(prev_timestep);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha_t, sqrt_beta_t) = (alpha_prod_t.sqrt() as f32, beta_prod_t.sqrt() as f32);
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt() as f32;
        let sqrt_beta_prev = (1.0 - alpha_prod_t_prev).sqrt() as f32;
        let prediction_type = self.prediction_type;
        let clip = self.clip_sample;
        Zip::from(sample).and(model_output).for_each(|x, &output| {
            let mut pred_original_sample =
                training_pred_original_sample(prediction_type, *x, output, sqrt_alpha_t, sqrt_beta_t);
            let pred_epsilon = match prediction_type {
                PredictionType::Epsilon => output,
                PredictionType::VPrediction => sqrt_alpha_t * output + sqrt_beta_t * *x,
            };
            if let Some(range) = clip {
                pred_original_sample = pred_original_sample.clamp(-range, range);
            }
            // Formula (12) of the DDIM paper with sigma_t = 0.
            *x = sqrt_alpha_prev * pred_original_sample + sqrt_beta_prev * pred_epsilon;
        });
    }

    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        add_training_noise(&self.alphas_cumprod, original, noise, timestep);
    }
}
