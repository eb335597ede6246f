//! Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn),
//! as diffusers' `EulerDiscreteScheduler`.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};
use rand::RngCore;

use super::schedule::{interp, karras_sigmas, sigma_to_t, spaced_timesteps, training_sigmas};
use super::{
    FinalSigmasType, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, index_for_timestep,
};

/// First-order ODE steps in sigma.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    use_karras_sigmas: bool,
    final_sigmas_type: FinalSigmasType,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl EulerDiscreteScheduler {
    /// An Euler scheduler for `config`, with Euler's defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> EulerDiscreteScheduler {
        EulerDiscreteScheduler {
            alphas_cumprod: config.alphas_cumprod(),
            num_train_timesteps: config.train_steps(),
            prediction_type: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            begin_index: None,
        }
    }

    /// The step index, found from the first timestep seen unless a begin index was set.
    fn step_index(&mut self, timestep: f32) -> usize {
        *self.step_index.get_or_insert_with(|| {
            self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep))
        })
    }
}

/// Euler's float32 timesteps and sigmas; shared with Euler ancestral, which spaces them the same.
pub(super) fn euler_schedule(
    alphas_cumprod: &[f32],
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> (Vec<f32>, Vec<f64>) {
    // numpy builds these in float32 (linspace is cast, not rounded).
    let timesteps: Vec<f32> =
        spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset)
            .into_iter()
            .map(|t| t as f32)
            .collect();
    let sigmas = training_sigmas(alphas_cumprod);
    let interpolated = timesteps.iter().map(|&t| interp(f64::from(t), &sigmas)).collect();
    (timesteps, interpolated)
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let (mut timesteps, mut sigmas) = euler_schedule(
            &self.alphas_cumprod,
            self.timestep_spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        );
        if self.use_karras_sigmas {
            let log_sigmas: Vec<f32> = training_sigmas(&self.alphas_cumprod).iter().map(|s| s.ln()).collect();
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], num_inference_steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
        }
        let sigma_last = match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => f64::from(training_sigmas(&self.alphas_cumprod[..1])[0]),
        };
        self.sigmas = sigmas.into_iter().chain([sigma_last]).map(|s| s as f32).collect();
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
        _rng: &mut dyn RngCore,
    ) {
        let index = self.step_index(timestep);
        let sigma = self.sigmas[index];
        let dt = self.sigmas[index + 1] - sigma;
        let prediction_type = self.prediction_type;
        let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
        let c_skip_divisor = sigma * sigma + 1.0;
        Zip::from(sample).and(model_output).for_each(|x, &output| {
            let pred_original_sample = match prediction_type {
                PredictionType::Epsilon => *x - sigma * output,
                PredictionType::VPrediction => output * c_out + *x / c_skip_divisor,
            };
            // The ODE derivative dx/dsigma, then one Euler step to the next sigma.
            let derivative = (*x - pred_original_sample) / sigma;
            *x += derivative * dt;
        });
        self.step_index = Some(index + 1);
    }

    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        let index = self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep));
        let sigma = self.sigmas[index];
        Zip::from(original).and(noise).for_each(|x, &n| *x += n * sigma);
    }
}
