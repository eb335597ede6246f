//! The training noise schedule and the numpy/torch helpers diffusers builds inference schedules with.
//!
//! Each helper reproduces the rounding of the numpy or torch call named in its comment, so that
//! integer timesteps come out identical and float ones agree to the last bit or two.

use ndarray::{ArrayView4, ArrayViewMut4, Zip};

use super::{BetaSchedule, PredictionType, TimestepSpacing};

/// `alphas_cumprod` of the training schedule, as diffusers computes it in float32.
pub(crate) fn alphas_cumprod(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
) -> Vec<f32> {
    let betas: Vec<f32> = match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
    };
    // torch.cumprod accumulates float32 products in double on the CPU.
    let mut product = 1.0_f64;
    betas
        .iter()
        .map(|&beta| {
            product *= f64::from(1.0 - beta);
            product as f32
        })
        .collect()
}

/// Noises clean `original` latents, in place, to `timestep` of the training schedule:
/// `sqrt(alpha_bar) * x + sqrt(1 - alpha_bar) * noise`, as DDIM and LCM start image-to-image.
pub(crate) fn add_training_noise(
    alphas_cumprod: &[f32],
    original: ArrayViewMut4<'_, f32>,
    noise: ArrayView4<'_, f32>,
    timestep: f32,
) {
    let alpha_prod = alphas_cumprod[timestep as usize];
    let (sqrt_alpha_prod, sqrt_one_minus) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
    Zip::from(original).and(noise).for_each(|x, &n| *x = sqrt_alpha_prod * *x + sqrt_one_minus * n);
}

/// The clean sample a prediction implies at a timestep of the training schedule, given
/// `sqrt(alpha_bar)` and `sqrt(1 - alpha_bar)` there.
pub(crate) fn training_pred_original_sample(
    prediction_type: PredictionType,
    sample: f32,
    output: f32,
    sqrt_alpha: f32,
    sqrt_beta: f32,
) -> f32 {
    match prediction_type {
        PredictionType::Epsilon => (sample - sqrt_beta * output) / sqrt_alpha,
        PredictionType::VPrediction => sqrt_alpha * sample - sqrt_beta * output,
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)`: a float32 step, each value one fused
/// multiply-add from the nearer end.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` for a negative float step: numpy fills from the difference of
/// its first two values, which can differ from `step` in the last bit.
pub(crate) fn np_arange_descending(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The inference timesteps for `spacing` as DDIM and the Euler schedulers space them, before any
/// conversion to integers or float32 (linspace values are not rounded here).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t = np_linspace(0.0, (num_train_timesteps - 1) as f64, num_inference_steps);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let step_ratio = num_train_timesteps / num_inference_steps;
            (0..num_inference_steps).rev().map(|i| (i * step_ratio) as f64 + steps_offset as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let step_ratio = num_train_timesteps as f64 / num_inference_steps as f64;
            np_arange_descending(num_train_timesteps as f64, 0.0, -step_ratio)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by training timestep.
pub(crate) fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return f64::from(fp[j]);
    }
    let slope = f64::from(fp[j + 1]) - f64::from(fp[j]);
    slope * (x - j as f64) + f64::from(fp[j])
}

/// The Karras et al. (2022) noise levels between `sigma_max` and `sigma_min`, rho = 7.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0_f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The fractional training timestep whose sigma is `sigma`, interpolating in log space
/// (diffusers' `_sigma_to_t`); `log_sigmas` is float32 as numpy holds it.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is not above `log_sigma`, clipped so `high` exists.
    let count = log_sigmas.iter().filter(|&&l| log_sigma - f64::from(l) >= 0.0).count();
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}
