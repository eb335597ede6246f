//! Latent consistency (Luo et al. 2023), as diffusers' `LCMScheduler`: each step predicts the clean
//! sample through the consistency boundary condition, then re-noises it to the next timestep with
//! a fresh draw (none after the last step, so one step is fully deterministic).

use ndarray::{Array4, ArrayView4, ArrayViewMut4, Zip};

use super::super::noise::NoiseSource;
use super::schedule::{add_training_noise, training_pred_original_sample};
use super::{PredictionType, Scheduler, SchedulerConfig};

/// The boundary condition's data standard deviation, fixed in diffusers.
const SIGMA_DATA: f64 = 0.5;

/// Few-step sampling for LCM-distilled models and LCM-LoRA.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    original_inference_steps: usize,
    timestep_scaling: f64,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    timesteps: Vec<f32>,
}

impl LcmScheduler {
    /// An LCM scheduler for `config`, with LCM's defaults for absent keys.
    pub fn new(config: &SchedulerConfig) -> LcmScheduler {
        let clip_sample =
            config.clip_sample.unwrap_or(false).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        LcmScheduler {
            alphas_cumprod: config.alphas_cumprod(),
            num_train_timesteps: config.train_steps(),
            original_inference_steps: lcm_original_steps(config),
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0),
            prediction_type: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip_sample,
            timesteps: Vec::new(),
        }
    }

    /// The consistency model's skip and output scalings at `timestep`.
    fn boundary_scalings(&self, timestep: f32) -> (f32, f32) {
        let scaled = f64::from(timestep) * self.timestep_scaling;
        let c_skip = SIGMA_DATA * SIGMA_DATA / (scaled * scaled + SIGMA_DATA * SIGMA_DATA);
        let c_out = scaled / (scaled * scaled + SIGMA_DATA * SIGMA_DATA).sqrt();
        (c_skip as f32, c_out as f32)
    }
}

/// The length of the schedule the model was distilled on; a request has at most this many steps.
pub(super) fn lcm_original_steps(config: &SchedulerConfig) -> usize {
    config.original_inference_steps.unwrap_or(50).clamp(1, config.train_steps())
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let original = self.original_inference_steps;
        let stride = self.num_train_timesteps / original;
        // The distillation schedule k-1, 2k-1, …, high to low; the steps take evenly spaced
        // entries of it (np.floor(np.linspace(0, len, steps, endpoint=False))).
        let distilled: Vec<usize> = (1..=original).rev().map(|i| i * stride - 1).collect();
        let steps = num_inference_steps.clamp(1, original);
        let spacing = original as f64 / steps as f64;
        self.timesteps =
            (0..steps).map(|i| distilled[(i as f64 * spacing).floor() as usize] as f32).collect();
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
        // Each timestep appears once, so a step finds its place from the timestep alone.
    }

    fn scale_model_input(&mut self, _sample: ArrayViewMut4<'_, f32>, _timestep: f32) {}

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        mut sample: ArrayViewMut4<'_, f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let index = self.timesteps.iter().position(|&t| t == timestep).unwrap_or(self.timesteps.len() - 1);
        let alpha_prod_t = self.alphas_cumprod[timestep as usize];
        let (sqrt_alpha_t, sqrt_beta_t) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let (prediction_type, clip) = (self.prediction_type, self.clip_sample);
        Zip::from(&mut sample).and(model_output).for_each(|x, &output| {
            let mut pred_original_sample =
                training_pred_original_sample(prediction_type, *x, output, sqrt_alpha_t, sqrt_beta_t);
            if let Some(range) = clip {
                pred_original_sample = pred_original_sample.clamp(-range, range);
            }
            *x = c_out * pred_original_sample + c_skip * *x;
        });
        // The timesteps never go below k - 1, so the next one always has a training alpha.
        let Some(&next) = self.timesteps.get(index + 1) else {
            return;
        };
        let alpha_prod_prev = self.alphas_cumprod[next as usize];
        let mut fresh = Array4::zeros(sample.raw_dim());
        noise.fill(fresh.view_mut());
        let (sqrt_alpha_prev, sqrt_beta_prev) = (alpha_prod_prev.sqrt(), (1.0 - alpha_prod_prev).sqrt());
        Zip::from(sample).and(&fresh).for_each(|x, &n| *x = sqrt_alpha_prev * *x + sqrt_beta_prev * n);
    }

    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        add_training_noise(&self.alphas_cumprod, original, noise, timestep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(config: &str) -> LcmScheduler {
        LcmScheduler::new(&SchedulerConfig::from_json(config).unwrap())
    }

    #[test]
    fn timesteps_are_evenly_picked_from_the_distillation_schedule() {
        let mut lcm = scheduler("{}");
        for (steps, want) in [
            (1, vec![999.0]),
            (4, vec![999.0, 759.0, 499.0, 259.0]),
            (8, vec![999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]),
        ] {
            lcm.set_timesteps(steps);
            assert_eq!(lcm.timesteps(), want, "{steps} steps");
        }
        let mut short = scheduler(r#"{"original_inference_steps": 4}"#);
        short.set_timesteps(2);
        assert_eq!(short.timesteps(), [999.0, 499.0]);
    }

    struct Ones(usize);

    impl NoiseSource for Ones {
        fn fill(&mut self, mut out: ArrayViewMut4<'_, f32>) {
            self.0 += 1;
            out.fill(1.0);
        }
    }

    #[test]
    fn every_step_but_the_last_draws_noise() {
        let mut lcm = scheduler("{}");
        lcm.set_timesteps(4);
        let mut draws = Ones(0);
        let mut sample = Array4::<f32>::zeros((1, 4, 2, 2));
        let output = Array4::<f32>::zeros((1, 4, 2, 2));
        for timestep in lcm.timesteps().to_vec() {
            lcm.step(output.view(), timestep, sample.view_mut(), &mut draws);
        }
        assert_eq!(draws.0, 3);
    }
}
