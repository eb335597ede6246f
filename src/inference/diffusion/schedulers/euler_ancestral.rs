//! Ancestral sampling with Euler steps, as diffusers' `EulerAncestralDiscreteScheduler`: each step
//! goes down to `sigma_down` deterministically, then adds fresh noise of `sigma_up`.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};
use rand::{Rng, RngCore};
use rand_distr::StandardNormal;

use super::euler::euler_schedule;
use super::{PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, index_for_timestep};

/// Euler steps plus per-step noise; not reproducible without the same random stream.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl EulerAncestralDiscreteScheduler {
    /// An Euler ancestral scheduler for `config`, with its defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> EulerAncestralDiscreteScheduler {
        EulerAncestralDiscreteScheduler {
            alphas_cumprod: config.alphas_cumprod(),
            num_train_timesteps: config.train_steps(),
            prediction_type: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            begin_index: None,
        }
    }

    fn step_index(&mut self, timestep: f32) -> usize {
        *self.step_index.get_or_insert_with(|| {
            self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep))
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let (timesteps, sigmas) = euler_schedule(
            &self.alphas_cumprod,
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        );
        self.sigmas = sigmas.into_iter().chain([0.0]).map(|s| s as f32).collect();
        self.timesteps = timesteps;
        self.step_index = None;
        self.begin_index = None;
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        let max_sigma = self.sigmas.iter().copied().fold(0.0_f32, f32::max);
        match self.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        }
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    fn scale_model_input(&mut self, mut sample: ArrayViewMut4<'_, f32>, timestep: f32) {
        let index = self.step_index(timestep);
        let sigma = self.sigmas[index];
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.map_inplace(|x| *x /= scale);
    }

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        rng: &mut dyn RngCore,
    ) {
        let index = self.step_index(timestep);
        let (sigma_from, sigma_to) = (self.sigmas[index], self.sigmas[index + 1]);
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;
        let prediction_type = self.prediction_type;
        let c_out = -sigma_from / (sigma_from * sigma_from + 1.0).sqrt();
        let c_skip_divisor = sigma_from * sigma_from + 1.0;
        Zip::from(sample).and(model_output).for_each(|x, &output| {
            let pred_original_sample = match prediction_type {
                PredictionType::Epsilon => *x - sigma_from * output,
                PredictionType::VPrediction => output * c_out + *x / c_skip_divisor,
            };
            let derivative = (*x - pred_original_sample) / sigma_from;
            let noise: f32 = rng.sample(StandardNormal);
            *x = *x + derivative * dt + noise * sigma_up;
        });
        self.step_index = Some(index + 1);
    }

    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        let index = self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep));
        let sigma = self.sigmas[index];
        Zip::from(original).and(noise).for_each(|x, &n| *x += n * sigma);
    }
}
