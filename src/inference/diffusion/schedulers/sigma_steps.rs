//! What the schedulers that step in sigma share (Euler and Euler ancestral, as diffusers' two
//! `Euler*DiscreteScheduler`s): the configuration, the timesteps and sigmas, where in them
//! denoising is, and the operations that depend on nothing else.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};

use super::schedule::{interp, spaced_timesteps, training_sigmas};
use super::{PredictionType, SchedulerConfig, TimestepSpacing, index_for_timestep};

/// The `Scheduler` methods a scheduler holding its `SigmaSteps` in `self.steps` hands to them.
macro_rules! sigma_steps_methods {
    () => {
        fn timesteps(&self) -> &[f32] {
            &self.steps.timesteps
        }

        fn sigmas(&self) -> Option<&[f32]> {
            Some(&self.steps.sigmas)
        }

        fn init_noise_sigma(&self) -> f32 {
            self.steps.init_noise_sigma()
        }

        fn set_begin_index(&mut self, begin_index: usize) {
            self.steps.set_begin_index(begin_index);
        }

        fn scale_model_input(&mut self, sample: ArrayViewMut4<'_, f32>, timestep: f32) {
            self.steps.scale_model_input(sample, timestep);
        }

        fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
            self.steps.add_noise(original, noise, timestep);
        }
    };
}
pub(super) use sigma_steps_methods;

/// A sigma schedule and the position in it.
#[derive(Debug, Clone)]
pub(super) struct SigmaSteps {
    pub alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    pub timesteps: Vec<f32>,
    /// One per timestep, then the final one.
    pub sigmas: Vec<f32>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl SigmaSteps {
    /// The schedule of `config`, with the Euler schedulers' defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> SigmaSteps {
        SigmaSteps {
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

    /// The spaced float32 timesteps and their sigmas interpolated from the training sigmas (without
    /// the final sigma).
    pub fn spaced(&self, num_inference_steps: usize) -> (Vec<f32>, Vec<f64>) {
        // numpy builds these in float32 (linspace is cast, not rounded).
        let timesteps: Vec<f32> = spaced_timesteps(
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        )
        .into_iter()
        .map(|t| t as f32)
        .collect();
        let sigmas = training_sigmas(&self.alphas_cumprod);
        let interpolated = timesteps.iter().map(|&t| interp(f64::from(t), &sigmas)).collect();
        (timesteps, interpolated)
    }

    /// Installs a schedule (sigmas ending with the final one) and starts from its beginning.
    pub fn reset(&mut self, timesteps: Vec<f32>, sigmas: Vec<f32>) {
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = None;
    }

    pub fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    /// The index of the step at `timestep`: found from the first timestep seen unless a begin index
    /// was set, then advanced by [`SigmaSteps::advance`].
    pub fn step_index(&mut self, timestep: f32) -> usize {
        *self.step_index.get_or_insert_with(|| {
            self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep))
        })
    }

    /// The step whose sigma `add_noise` uses, as diffusers picks it: the schedule's current step
    /// once denoising has begun (inpainting re-noises the known latents after each step), else the
    /// begin index (image-to-image, before the first step), else the step of `timestep`.
    pub fn noise_index(&self, timestep: f32) -> usize {
        match (self.begin_index, self.step_index) {
            (Some(_), Some(current)) => current,
            (Some(begin), None) => begin,
            (None, _) => index_for_timestep(&self.timesteps, timestep),
        }
    }

    /// Moves to the step after `index`.
    pub fn advance(&mut self, index: usize) {
        self.step_index = Some(index + 1);
    }

    pub fn init_noise_sigma(&self) -> f32 {
        let max_sigma = self.sigmas.iter().copied().fold(0.0_f32, f32::max);
        match self.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        }
    }

    pub fn scale_model_input(&mut self, mut sample: ArrayViewMut4<'_, f32>, timestep: f32) {
        let index = self.step_index(timestep);
        let sigma = self.sigmas[index];
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.map_inplace(|x| *x /= scale);
    }

    pub fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        let sigma = self.sigmas[self.noise_index(timestep)];
        Zip::from(original).and(noise).for_each(|x, &n| *x += n * sigma);
    }

    /// The model's estimate of the clean sample from a sample at `sigma` and the model's output.
    pub fn pred_original_sample(&self, sigma: f32) -> impl Fn(f32, f32) -> f32 + use<> {
        let prediction_type = self.prediction_type;
        let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
        let c_skip_divisor = sigma * sigma + 1.0;
        move |x, output| match prediction_type {
            PredictionType::Epsilon => x - sigma * output,
            PredictionType::VPrediction => output * c_out + x / c_skip_divisor,
        }
    }
}
