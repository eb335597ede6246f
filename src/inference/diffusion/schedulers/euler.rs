//! Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn),
//! as diffusers' `EulerDiscreteScheduler`.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};

use super::super::noise::NoiseSource;
use super::schedule::{karras_sigmas, sigma_to_t, training_sigmas};
use super::sigma_steps::{SigmaSteps, sigma_steps_methods};
use super::{FinalSigmasType, Scheduler, SchedulerConfig};

/// First-order ODE steps in sigma.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    final_sigmas_type: FinalSigmasType,
}

impl EulerDiscreteScheduler {
    /// An Euler scheduler for `config`, with Euler's defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> EulerDiscreteScheduler {
        EulerDiscreteScheduler {
            steps: SigmaSteps::new(config),
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let (mut timesteps, mut sigmas) = self.steps.spaced(num_inference_steps);
        let training = training_sigmas(&self.steps.alphas_cumprod);
        if self.use_karras_sigmas {
            let log_sigmas: Vec<f32> = training.iter().map(|s| s.ln()).collect();
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], num_inference_steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
        }
        let sigma_last = match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => f64::from(training[0]),
        };
        self.steps.reset(timesteps, sigmas.into_iter().chain([sigma_last]).map(|s| s as f32).collect());
    }

    sigma_steps_methods!();

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        _noise: &mut dyn NoiseSource,
    ) {
        let index = self.steps.step_index(timestep);
        let sigma = self.steps.sigmas[index];
        let dt = self.steps.sigmas[index + 1] - sigma;
        let pred_original_sample = self.steps.pred_original_sample(sigma);
        Zip::from(sample).and(model_output).for_each(|x, &output| {
            // The ODE derivative dx/dsigma, then one Euler step to the next sigma.
            let derivative = (*x - pred_original_sample(*x, output)) / sigma;
            *x += derivative * dt;
        });
        self.steps.advance(index);
    }
}
