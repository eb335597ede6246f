//! Ancestral sampling with Euler steps, as diffusers' `EulerAncestralDiscreteScheduler`: each step
//! goes down to `sigma_down` deterministically, then adds fresh noise of `sigma_up`.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};
use rand::{Rng, RngCore};
use rand_distr::StandardNormal;

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
        rng: &mut dyn RngCore,
    ) {
        let index = self.steps.step_index(timestep);
        let (sigma_from, sigma_to) = (self.steps.sigmas[index], self.steps.sigmas[index + 1]);
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;
        let pred_original_sample = self.steps.pred_original_sample(sigma_from);
        Zip::from(sample).and(model_output).for_each(|x, &output| {
            let derivative = (*x - pred_original_sample(*x, output)) / sigma_from;
            let noise: f32 = rng.sample(StandardNormal);
            *x = *x + derivative * dt + noise * sigma_up;
        });
        self.steps.advance(index);
    }
}
