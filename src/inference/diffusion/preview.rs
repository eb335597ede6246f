//! Step previews without the VAE. With a TAESD-style tiny decoder (`preview_decoder/` beside the
//! model, or one given at load) the latents are decoded by it. Without one, each latent channel
//! contributes a fixed colour, so a linear map of the four channels gives a rough RGB picture at a
//! cost of a few multiplications per latent pixel; the factors are the published per-family
//! approximations (as A1111's "Approx cheap" and ComfyUI's latent previews use). Other latent
//! layouts get no preview.

use image::RgbImage;
use image::imageops::FilterType;
use std::path::Path;

use ndarray::{Array4, ArrayView3, ArrayView4, Axis};

use super::DiffusionError;
use super::config::{DiffusionConfig, ModelFamily};
use super::vae::VaeHalf;
use crate::inference::Runtime;

/// A TAESD-style tiny decoder: `dir/model.onnx` (or an optimum export's `dir/vae_decoder/`),
/// `latent_sample` → `sample`.
pub struct PreviewDecoder {
    half: VaeHalf,
}

impl PreviewDecoder {
    /// Loads the decoder in `dir`.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<PreviewDecoder, DiffusionError> {
        Ok(PreviewDecoder { half: VaeHalf::preview_decoder(runtime, dir)? })
    }

    /// Pixels `[batch, 3, 8h, 8w]` in [-1, 1] for latents `[batch, 4, h, w]` in the UNet's space.
    pub fn decode(&mut self, latents: ArrayView4<'_, f32>) -> Result<Array4<f32>, DiffusionError> {
        self.half.decode(latents)
    }
}

/// How a model's previews are drawn.
pub(crate) enum PreviewSource<'a> {
    /// The linear latent-to-RGB map.
    Linear(LatentPreview),
    /// The model's tiny decoder.
    Decoder(&'a mut PreviewDecoder),
}

impl PreviewSource<'_> {
    /// The picture of one image's latents `[4, h, w]` at `sigma`'s noise level, `width` × `height`.
    pub(crate) fn render(
        &mut self,
        latents: ArrayView3<'_, f32>,
        sigma: Option<f32>,
        width: u32,
        height: u32,
    ) -> Result<RgbImage, DiffusionError> {
        match self {
            PreviewSource::Linear(linear) => Ok(linear.render(latents, sigma, width, height)),
            PreviewSource::Decoder(decoder) => {
                let scale = unit_variance(sigma);
                let decoded = decoder.decode(latents.mapv(|l| l * scale).insert_axis(Axis(0)).view())?;
                let (_, _, rows, cols) = decoded.dim();
                let image = RgbImage::from_fn(cols as u32, rows as u32, |x, y| {
                    image::Rgb(std::array::from_fn(|c| to_u8(decoded[[0, c, y as usize, x as usize]])))
                });
                Ok(image::imageops::resize(&image, width.max(1), height.max(1), FilterType::Triangle))
            }
        }
    }
}

/// What a sample at `sigma`'s noise level is multiplied by to have unit variance again.
fn unit_variance(sigma: Option<f32>) -> f32 {
    sigma.map_or(1.0, |s| 1.0 / (s * s + 1.0).sqrt())
}

/// A value in [-1, 1] as an 8-bit channel.
fn to_u8(value: f32) -> u8 {
    (((value + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// RGB contribution of each of SD 1.x / 2.x's four latent channels.
const SD_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// RGB contribution of each of SDXL's four latent channels.
const SDXL_FACTORS: [[f32; 3]; 4] = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
];

/// Turns one image's latents into a small RGB picture.
#[derive(Debug, Clone, Copy)]
pub struct LatentPreview {
    factors: [[f32; 3]; 4],
}

impl LatentPreview {
    /// The preview for a model's latents; `None` when they do not have SD's four channels.
    pub fn of(config: &DiffusionConfig) -> Option<LatentPreview> {
        if config.latent_channels != 4 {
            return None;
        }
        let factors = match config.family {
            ModelFamily::StableDiffusion => SD_FACTORS,
            ModelFamily::StableDiffusionXl => SDXL_FACTORS,
        };
        Some(LatentPreview { factors })
    }

    /// The picture of `latents` (`[4, h, w]`, in the UNet's space) at `sigma`'s noise level (the
    /// sigma schedulers' samples are scaled back to unit variance first), resized to
    /// `width` × `height`.
    pub fn render(
        &self,
        latents: ArrayView3<'_, f32>,
        sigma: Option<f32>,
        width: u32,
        height: u32,
    ) -> RgbImage {
        let scale = unit_variance(sigma);
        let (_, rows, cols) = latents.dim();
        let small = RgbImage::from_fn(cols as u32, rows as u32, |x, y| {
            let mut rgb = [0.0f32; 3];
            for (channel, factors) in self.factors.iter().enumerate() {
                let value = latents[[channel, y as usize, x as usize]] * scale;
                for (sum, factor) in rgb.iter_mut().zip(factors) {
                    *sum += value * factor;
                }
            }
            image::Rgb(rgb.map(to_u8))
        });
        image::imageops::resize(&small, width.max(1), height.max(1), FilterType::Triangle)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;

    fn preview() -> LatentPreview {
        LatentPreview { factors: SD_FACTORS }
    }

    #[test]
    fn zero_latents_are_mid_grey_and_the_size_is_the_asked_one() {
        let picture = preview().render(Array3::zeros((4, 8, 16)).view(), None, 64, 32);
        assert_eq!(picture.dimensions(), (64, 32));
        assert!(picture.pixels().all(|p| p.0 == [128, 128, 128]));
    }

    #[test]
    fn each_channel_pushes_its_own_colour() {
        let mut latents = Array3::zeros((4, 2, 2));
        latents.index_axis_mut(ndarray::Axis(0), 3).fill(1.0);
        // The fourth channel is mostly blue-negative: a yellowish picture.
        let picture = preview().render(latents.view(), None, 2, 2);
        let [r, g, b] = picture.get_pixel(0, 0).0;
        assert!(r > b && g > b, "{r} {g} {b}");
    }

    #[test]
    fn sigma_samples_are_scaled_back_to_unit_variance() {
        let latents = Array3::from_elem((4, 2, 2), 10.0f32);
        let noisy = preview().render(latents.view(), Some(9.95), 2, 2);
        let clean = preview().render(Array3::from_elem((4, 2, 2), 1.0f32).view(), None, 2, 2);
        let diff = noisy.as_raw().iter().zip(clean.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(diff <= 1, "{diff}");
    }
}
