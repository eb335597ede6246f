//! DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver, as
//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`
//! and the midpoint solver; optionally on Karras sigmas (`dpmpp_2m_karras`).

use ndarray::{Array4, ArrayView4, ArrayViewMut4, Zip};

use super::super::noise::NoiseSource;
use super::schedule::{
    interp, karras_sigmas, np_arange_descending, np_linspace, sigma_to_t, training_sigmas,
};
use super::{
    FinalSigmasType, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing, index_for_timestep,
};

/// Multistep DPM-Solver++ of order 2.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    use_karras_sigmas: bool,
    final_sigmas_type: FinalSigmasType,
    lower_order_final: bool,
    euler_at_final: bool,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
    /// How many earlier predictions the solver can use (0 or 1; order 2 needs one).
    lower_order_nums: usize,
    /// The data prediction x0 of this step and of the previous one.
    x0_pred: Option<Array4<f32>>,
    previous_x0_pred: Option<Array4<f32>>,
}

/// The VP-SDE coefficients of a sigma: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t.
fn alpha_sigma_t(sigma: f32) -> (f64, f64) {
    let sigma = f64::from(sigma);
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// The half log signal-to-noise ratio lambda = log(alpha_t) - log(sigma_t).
fn lambda(alpha_t: f64, sigma_t: f64) -> f64 {
    alpha_t.ln() - sigma_t.ln()
}

impl DpmSolverMultistepScheduler {
    /// A DPM-Solver++ 2M scheduler for `config`, on Karras sigmas when `use_karras_sigmas`.
    pub fn new(config: &SchedulerConfig, use_karras_sigmas: bool) -> DpmSolverMultistepScheduler {
        DpmSolverMultistepScheduler {
            alphas_cumprod: config.alphas_cumprod(),
            num_train_timesteps: config.train_steps(),
            prediction_type: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            use_karras_sigmas,
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            begin_index: None,
            lower_order_nums: 0,
            x0_pred: None,
            previous_x0_pred: None,
        }
    }

    /// Integer timesteps; unlike the Euler schedulers, linspace and leading split the range into
    /// one more interval than there are steps and drop the last.
    fn spaced_timesteps(&self, num_inference_steps: usize) -> Vec<f64> {
        let last_timestep = self.num_train_timesteps;
        match self.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t = np_linspace(0.0, (last_timestep - 1) as f64, num_inference_steps + 1);
                t.reverse();
                t.truncate(num_inference_steps);
                t.into_iter().map(f64::round_ties_even).collect()
            }
            TimestepSpacing::Leading => {
                let step_ratio = last_timestep / (num_inference_steps + 1);
                (1..=num_inference_steps)
                    .rev()
                    .map(|i| (i * step_ratio) as f64 + self.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let step_ratio = self.num_train_timesteps as f64 / num_inference_steps as f64;
                np_arange_descending(last_timestep as f64, 0.0, -step_ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        }
    }

    fn step_index(&mut self, timestep: f32) -> usize {
        *self.step_index.get_or_insert_with(|| {
            self.begin_index.unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep))
        })
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) {
        let mut timesteps = self.spaced_timesteps(num_inference_steps);
        let training = training_sigmas(&self.alphas_cumprod);
        let sigmas: Vec<f64> = if self.use_karras_sigmas {
            let log_sigmas: Vec<f32> = training.iter().map(|s| s.ln()).collect();
            let sigma_min = f64::from(training[0]);
            let sigma_max = f64::from(training[training.len() - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even()).collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t, &training)).collect()
        };
        let sigma_last = match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => f64::from(training[0]),
        };
        self.sigmas = sigmas.into_iter().chain([sigma_last]).map(|s| s as f32).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
        self.step_index = None;
        self.begin_index = None;
        self.lower_order_nums = 0;
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    fn scale_model_input(&mut self, _sample: ArrayViewMut4<'_, f32>, timestep: f32) {
        self.step_index(timestep);
    }

    fn step(
        &mut self,
        model_output: ArrayView4<'_, f32>,
        timestep: f32,
        sample: ArrayViewMut4<'_, f32>,
        _noise: &mut dyn NoiseSource,
    ) {
        let index = self.step_index(timestep);
        let num_steps = self.timesteps.len();
        let lower_order_final = index == num_steps - 1
            && (self.euler_at_final
                || (self.lower_order_final && num_steps < 15)
                || self.final_sigmas_type == FinalSigmasType::Zero);

        // The data prediction x0 (`convert_model_output`), kept for the next step.
        std::mem::swap(&mut self.x0_pred, &mut self.previous_x0_pred);
        let x0 = match &mut self.x0_pred {
            Some(buffer) if buffer.shape() == sample.shape() => buffer,
            slot => slot.insert(Array4::zeros(sample.raw_dim())),
        };
        let (alpha_s0, sigma_s0) = alpha_sigma_t(self.sigmas[index]);
        let (alpha_s0_f32, sigma_s0_f32) = (alpha_s0 as f32, sigma_s0 as f32);
        let prediction_type = self.prediction_type;
        Zip::from(&mut *x0).and(&sample).and(model_output).for_each(|x0, &x, &output| {
            *x0 = match prediction_type {
                PredictionType::Epsilon => (x - sigma_s0_f32 * output) / alpha_s0_f32,
                PredictionType::VPrediction => alpha_s0_f32 * x - sigma_s0_f32 * output,
            };
        });

        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[index + 1]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let sample_coeff = (sigma_t / sigma_s0) as f32;
        let d0_coeff = (alpha_t * ((-h).exp() - 1.0)) as f32;
        match &self.previous_x0_pred {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                let (alpha_s1, sigma_s1) = alpha_sigma_t(self.sigmas[index - 1]);
                let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = (h_0 / h) as f32;
                Zip::from(sample).and(&*x0).and(m1).for_each(|x, &m0, &m1| {
                    let d1 = (1.0 / r0) * (m0 - m1);
                    *x = sample_coeff * *x - d0_coeff * m0 - 0.5 * d0_coeff * d1;
                });
            }
            _ => {
                Zip::from(sample).and(&*x0).for_each(|x, &m0| *x = sample_coeff * *x - d0_coeff * m0);
            }
        }
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        self.step_index = Some(index + 1);
    }

    fn add_noise(&self, original: ArrayViewMut4<'_, f32>, noise: ArrayView4<'_, f32>, timestep: f32) {
        // As the sigma schedulers: the current step once denoising has begun (inpainting).
        let index = match (self.begin_index, self.step_index) {
            (Some(_), Some(current)) => current,
            (Some(begin), None) => begin,
            (None, _) => index_for_timestep(&self.timesteps, timestep),
        };
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[index]);
        let (alpha_t, sigma_t) = (alpha_t as f32, sigma_t as f32);
        Zip::from(original).and(noise).for_each(|x, &n| *x = alpha_t * *x + sigma_t * n);
    }
}
