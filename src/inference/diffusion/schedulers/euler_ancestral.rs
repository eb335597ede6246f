//! Ancestral sampling with Euler steps, as diffusers' `EulerAncestralDiscreteScheduler`: each step
//! goes down to `sigma_down` deterministically, then adds fresh noise of `sigma_up`.

use ndarray::{Array4, ArrayView4, ArrayViewMut4, Zip};

use super::super::noise::NoiseSource;
use super::sigma_steps::{SigmaSteps, sigma_steps_methods};
use super::{Scheduler, SchedulerConfig};

/// Euler steps plus per-step noise; not reproducible without the same random stream.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    steps: SigmaSteps,
}

impl EulerAncestralDiscreteScheduler {
    /// An Euler ancestral scheduler for `config`, with its defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> EulerAncestralDiscreteScheduler {
        EulerAncestralDiscreteScheduler { steps: SigmaSteps::new(config) }
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let (timesteps, sigmas) = self.steps.spaced(num_inference_steps);
        self.steps.reset(timesteps, sigmas.into_iter().chain([0.0]).map(|s| s as f32).collect());
    }

    sigma_steps_methods!();

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let index = self.steps.step_index(timestep);
        let (sigma_from, sigma_to) = (self.steps.sigmas[index], self.steps.sigmas[index + 1]);
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;
        let pred_original_sample = self.steps.pred_original_sample(sigma_from);
        let mut fresh = Array4::zeros(sample.raw_dim());
        noise.fill(fresh.view_mut());
        Zip::from(sample).and(model_output).and(&fresh).for_each(|x, &output, &fresh| {
            let derivative = (*x - pred_original_sample(*x, output)) / sigma_from;
            *x = *x + derivative * dt + fresh * sigma_up;
        });
        self.steps.advance(index);
    }
}
