//! The VAE halves: the encoder maps pixels to the latent distribution, the decoder latents to
//! pixels. Both run unscaled latents; the pipeline applies the scaling factor.

use std::path::Path;

use ndarray::{Array4, ArrayView4, Ix4, s};
use ort::session::Session;

use super::DiffusionError;
use super::config::{config_error, required_file};
use super::tensor::{FloatType, ModelTensor, inference_error, output_f32};
use crate::inference::Runtime;

/// A VAE half: which sub-model, its session and its input and output names.
pub(crate) struct VaeHalf {
    session: Session,
    model: &'static str,
    input: &'static str,
    output: &'static str,
    float_type: FloatType,
}

impl VaeHalf {
    /// `vae_encoder/model.onnx`: `sample` (pixels in [-1, 1]) → `latent_parameters` (mean ‖ logvar).
    pub(crate) fn encoder(runtime: &Runtime, dir: &Path) -> Result<VaeHalf, DiffusionError> {
        VaeHalf::load(runtime, dir, "vae_encoder", "sample", "latent_parameters")
    }

    /// `vae_decoder/model.onnx`: `latent_sample` → `sample` (pixels in about [-1, 1]).
    pub(crate) fn decoder(runtime: &Runtime, dir: &Path) -> Result<VaeHalf, DiffusionError> {
        VaeHalf::load(runtime, dir, "vae_decoder", "latent_sample", "sample")
    }

    /// A TAESD-style tiny decoder for previews: `dir/model.onnx`, or an optimum export's
    /// `dir/vae_decoder/model.onnx`; `latent_sample` (the UNet's latents as they are: such decoders
    /// have no scaling factor) → `sample` in [-1, 1].
    pub(crate) fn preview_decoder(runtime: &Runtime, dir: &Path) -> Result<VaeHalf, DiffusionError> {
        let file = if dir.join("vae_decoder/model.onnx").is_file() {
            "vae_decoder/model.onnx"
        } else {
            "model.onnx"
        };
        VaeHalf::load_file(runtime, dir, file, "preview_decoder", "latent_sample", "sample")
    }

    fn load(
        runtime: &Runtime,
        dir: &Path,
        model: &'static str,
        input: &'static str,
        output: &'static str,
    ) -> Result<VaeHalf, DiffusionError> {
        VaeHalf::load_file(runtime, dir, &format!("{model}/model.onnx"), model, input, output)
    }

    fn load_file(
        runtime: &Runtime,
        dir: &Path,
        file: &str,
        model: &'static str,
        input: &'static str,
        output: &'static str,
    ) -> Result<VaeHalf, DiffusionError> {
        let path = required_file(dir, file)?;
        let session = runtime.session(&path)?;
        if !session.outputs().iter().any(|o| o.name() == output) {
            return Err(config_error(&path, format!("the model has no output named {output:?}")));
        }
        let float_type =
            FloatType::of_input(&session, input, model).map_err(|e| config_error(&path, e.to_string()))?;
        Ok(VaeHalf { session, model, input, output, float_type })
    }

    fn run(&mut self, input: ArrayView4<'_, f32>) -> Result<Array4<f32>, DiffusionError> {
        let fail = inference_error(self.model);
        let input = ModelTensor::new(self.float_type, input.to_owned());
        let outputs =
            self.session.run(ort::inputs![self.input => input.input().map_err(&fail)?]).map_err(&fail)?;
        output_f32(&outputs[self.output], self.model)?
            .into_owned()
            .into_dimensionality::<Ix4>()
            .map_err(|e| DiffusionError::Inference { model: self.model, reason: e.to_string() })
    }

    /// The mean of the latent distribution of `pixels` `[1, 3, H, W]`, unscaled.
    pub(crate) fn encode_mean(
        &mut self,
        pixels: ArrayView4<'_, f32>,
        latent_channels: usize,
    ) -> Result<Array4<f32>, DiffusionError> {
        let parameters = self.run(pixels)?;
        if parameters.shape()[1] != 2 * latent_channels {
            return Err(DiffusionError::Inference {
                model: self.model,
                reason: format!(
                    "latent_parameters has {} channels, expected {}",
                    parameters.shape()[1],
                    2 * latent_channels
                ),
            });
        }
        Ok(parameters.slice(s![.., ..latent_channels, .., ..]).to_owned())
    }

    /// Pixels `[1, 3, H, W]` for unscaled `latents`.
    pub(crate) fn decode(&mut self, latents: ArrayView4<'_, f32>) -> Result<Array4<f32>, DiffusionError> {
        self.run(latents)
    }
}
