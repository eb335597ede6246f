//! Inpainting as diffusers' `StableDiffusion[XL]InpaintPipeline` does it, for both kinds of UNet:
//! - a 9-channel inpainting UNet takes the noisy latents, the mask and the masked photo's latents
//!   concatenated along the channels, every step;
//! - an ordinary 4-channel UNet denoises the whole image, and after each step the photo's latents,
//!   noised to the next step's level, replace the latents where the mask keeps (the last step
//!   blends in the clean photo latents).
//!
//! The mask is stretched to the photo, blurred (`blur`, PIL's `GaussianBlur` radius), fitted to
//! the generation's size as the photo is, and binarized at one half; the latent mask samples it
//! every 8 pixels (torch's nearest interpolation). At strength 1 the latents start from pure noise
//! (`noise × init_noise_sigma`), below it from the photo's latents noised to where `strength`
//! starts. A 9-channel model asked for plain text-to-image or image-to-image repaints everything:
//! a white mask over the photo (or over a blank image).

use image::{GrayImage, RgbImage};
use ndarray::{Array4, ArrayViewMut4, Axis, Zip, s};

use super::DiffusionError;
use super::mask::{Region, crop_region, fit, gaussian_blur, overlay, repaints_anything, stretch};
use super::schedulers::Scheduler;

/// Which part of the photo to repaint, and how.
#[derive(Debug, Clone)]
pub struct InpaintMask {
    /// White repaints, black keeps, grey repaints from 128 up; any size (stretched to the photo).
    pub image: GrayImage,
    /// Radius of the Gaussian blur applied to the mask at the photo's size; 0 for none.
    pub blur: f32,
    /// Generate only the rectangle around the masked region, grown by this many pixels (of the
    /// photo fitted to the generation's size) and scaled up to the generation's size, then paste it
    /// back; `None` generates the whole image.
    pub padding_crop: Option<u32>,
    /// Put the photo's own pixels back wherever the mask keeps (softly along a blurred edge).
    pub preserve_unmasked: bool,
}

/// A generation's inpainting inputs at its size.
pub(crate) struct Inpainting {
    /// The photo the UNet repaints (the masked region scaled up when cropping); `None` for a
    /// 9-channel model asked for text-to-image.
    pub photo: Option<RgbImage>,
    /// The soft mask the UNet sees, binarized when used.
    pub mask: GrayImage,
    /// How the result goes back over the photo, when it does.
    pub overlay: Option<Overlay>,
    /// The mask as applied to the whole result, for showing to the client.
    pub shown: GrayImage,
}

/// Pasting a generation back over the photo: the region it was made for (scaled down into place),
/// then the photo's pixels where the mask keeps.
#[derive(Debug, Clone)]
pub(crate) struct Overlay {
    photo: RgbImage,
    mask: GrayImage,
    region: Option<Region>,
}

impl Overlay {
    /// The final image from a generation `generated` at the generation's size.
    pub(crate) fn apply(&self, generated: &RgbImage) -> RgbImage {
        let placed;
        let generated = match self.region {
            Some(region) => {
                let scaled = stretch(generated, region.width(), region.height());
                let mut canvas = self.photo.clone();
                image::imageops::replace(&mut canvas, &scaled, i64::from(region.x1), i64::from(region.y1));
                placed = canvas;
                &placed
            }
            None => generated,
        };
        overlay(generated, &self.photo, &self.mask)
    }
}

impl Inpainting {
    /// The inputs for a generation of `width` × `height` from `photo` and `mask`; `None` when
    /// neither a mask nor a 9-channel UNet asks for inpainting.
    pub(crate) fn prepare(
        photo: Option<&RgbImage>,
        mask: Option<&InpaintMask>,
        inpainting_unet: bool,
        (width, height): (u32, u32),
    ) -> Result<Option<Inpainting>, DiffusionError> {
        let Some(mask) = mask else {
            if !inpainting_unet {
                return Ok(None);
            }
            let white = GrayImage::from_pixel(width, height, image::Luma([255]));
            let photo = photo.map(|p| fit(p, width, height));
            return Ok(Some(Inpainting { photo, mask: white.clone(), overlay: None, shown: white }));
        };
        let Some(photo) = photo else {
            let reason = "a mask needs a photo to repaint".to_string();
            return Err(DiffusionError::InvalidParams { field: "mask_image", reason });
        };
        let aligned = stretch(&mask.image, photo.width(), photo.height());
        let soft = fit(&gaussian_blur(&aligned, mask.blur), width, height);
        if !repaints_anything(&soft) {
            let reason = "nothing to repaint: the mask is black everywhere".to_string();
            return Err(DiffusionError::InvalidParams { field: "mask_image", reason });
        }
        let fitted = fit(photo, width, height);
        let region = mask.padding_crop.and_then(|pad| crop_region(&soft, width, height, pad));
        let (generation_photo, generation_mask) = match region {
            Some(r) => {
                let cropped =
                    image::imageops::crop_imm(&fitted, r.x1, r.y1, r.width(), r.height()).to_image();
                let cropped_mask =
                    image::imageops::crop_imm(&soft, r.x1, r.y1, r.width(), r.height()).to_image();
                (stretch(&cropped, width, height), stretch(&cropped_mask, width, height))
            }
            None => (fitted.clone(), soft.clone()),
        };
        let overlay = (mask.preserve_unmasked || region.is_some()).then(|| Overlay {
            photo: fitted,
            mask: soft.clone(),
            region,
        });
        Ok(Some(Inpainting { photo: Some(generation_photo), mask: generation_mask, overlay, shown: soft }))
    }

    /// The binarized mask at latent resolution, `[1, 1, height / factor, width / factor]`.
    pub(crate) fn latent_mask(&self, factor: usize) -> Array4<f32> {
        let (w, h) = (self.mask.width() as usize / factor, self.mask.height() as usize / factor);
        Array4::from_shape_fn((1, 1, h, w), |(_, _, y, x)| {
            binary(self.mask.get_pixel((x * factor) as u32, (y * factor) as u32)[0])
        })
    }

    /// The VAE encoder's input for the masked photo: the photo in [-1, 1] where the binarized
    /// mask keeps, 0 where it repaints (all 0 without a photo).
    pub(crate) fn masked_pixels(&self) -> Array4<f32> {
        let (w, h) = (self.mask.width() as usize, self.mask.height() as usize);
        Array4::from_shape_fn((1, 3, h, w), |(_, c, y, x)| {
            let keep = 1.0 - binary(self.mask.get_pixel(x as u32, y as u32)[0]);
            match &self.photo {
                Some(photo) => (f32::from(photo.get_pixel(x as u32, y as u32)[c]) / 255.0 * 2.0 - 1.0) * keep,
                None => 0.0,
            }
        })
    }
}

/// A mask value binarized as diffusers does (`value / 255 >= 0.5`).
fn binary(value: u8) -> f32 {
    if value >= 128 { 1.0 } else { 0.0 }
}

/// What the denoising loop of an inpainting generation adds to a plain one.
pub(crate) struct MaskedLatents {
    /// The binarized mask at latent resolution, `[1, 1, h, w]`.
    pub mask: Array4<f32>,
    /// A 9-channel UNet: the masked photo's latents `[1, C, h, w]`, fed beside the mask.
    pub masked: Option<Array4<f32>>,
    /// A 4-channel UNet: the photo's latents and the batch's initial noise, blended back where the
    /// mask keeps after each step.
    pub known: Option<(Array4<f32>, Array4<f32>)>,
}

impl MaskedLatents {
    /// Writes the mask and masked latents into channels `C..` of every row of a 9-channel UNet's
    /// sample (once per generation: the steps rewrite only the first `C` channels).
    pub(crate) fn fill_unet_extras(&self, mut sample: ArrayViewMut4<'_, f32>, latent_channels: usize) {
        let Some(masked) = &self.masked else { return };
        for mut row in sample.outer_iter_mut() {
            row.slice_mut(s![latent_channels..latent_channels + 1, .., ..])
                .assign(&self.mask.index_axis(Axis(0), 0));
            row.slice_mut(s![latent_channels + 1.., .., ..]).assign(&masked.index_axis(Axis(0), 0));
        }
    }

    /// A 4-channel UNet after step `done` (0-based) of `run`: the photo's latents, noised to the
    /// next timestep unless this was the last, where the mask keeps.
    pub(crate) fn blend_known(
        &self,
        scheduler: &dyn Scheduler,
        latents: &mut Array4<f32>,
        run: &[f32],
        done: usize,
    ) {
        let Some((known, noise)) = &self.known else { return };
        let mut proper = known.broadcast(latents.raw_dim()).expect("one photo for every image").to_owned();
        if let Some(&next) = run.get(done + 1) {
            scheduler.add_noise(proper.view_mut(), noise.view(), next);
        }
        let mask = self.mask.index_axis(Axis(0), 0).index_axis_move(Axis(0), 0);
        for (mut image, proper) in latents.outer_iter_mut().zip(proper.outer_iter()) {
            for (mut channel, proper) in image.outer_iter_mut().zip(proper.outer_iter()) {
                Zip::from(&mut channel)
                    .and(&proper)
                    .and(&mask)
                    .for_each(|l, &p, &m| *l = (1.0 - m) * p + m * *l);
            }
        }
    }
}
