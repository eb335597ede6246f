//! CLIP text encoders: token ids in, per-token hidden states (and for SDXL's second encoder the
//! projected pooled embedding) out.

use std::path::Path;

use ndarray::{Array2, Array3, Ix2, Ix3};
use ort::session::Session;
use ort::value::TensorRef;

use super::DiffusionError;
use super::config::{config_error, required_file};
use super::tensor::{inference_error, output_f32};
use crate::inference::{InitializerOverrides, Runtime};

/// One text encoder session and the outputs the pipeline reads from it.
pub(crate) struct TextEncoder {
    session: Session,
    model: &'static str,
    hidden_output: String,
    pooled_output: Option<String>,
}

impl TextEncoder {
    /// Loads `dir/<model>/model.onnx`, reading `hidden_output` (and `pooled_output` if given),
    /// both of which must exist.
    pub(crate) fn load(
        runtime: &Runtime,
        dir: &Path,
        model: &'static str,
        hidden_output: String,
        pooled_output: Option<String>,
    ) -> Result<TextEncoder, DiffusionError> {
        Self::load_with(runtime, dir, model, hidden_output, pooled_output, InitializerOverrides::default())
    }

    /// The same encoder as `self` with `overrides` replacing some initializers (merged LoRA weights).
    pub(crate) fn with_initializers(
        &self,
        runtime: &Runtime,
        dir: &Path,
        overrides: InitializerOverrides,
    ) -> Result<TextEncoder, DiffusionError> {
        Self::load_with(
            runtime,
            dir,
            self.model,
            self.hidden_output.clone(),
            self.pooled_output.clone(),
            overrides,
        )
    }

    fn load_with(
        runtime: &Runtime,
        dir: &Path,
        model: &'static str,
        hidden_output: String,
        pooled_output: Option<String>,
        overrides: InitializerOverrides,
    ) -> Result<TextEncoder, DiffusionError> {
        let path = required_file(dir, &format!("{model}/model.onnx"))?;
        let session = runtime.session_with_overrides(&path, overrides)?;
        let has_output = |name: &str| session.outputs().iter().any(|o| o.name() == name);
        for name in std::iter::once(&hidden_output).chain(pooled_output.as_ref()) {
            if !has_output(name) {
                return Err(config_error(&path, format!("the model has no output named {name:?}")));
            }
        }
        if !session.inputs().iter().any(|i| i.name() == "input_ids") {
            return Err(config_error(&path, "the model has no input named \"input_ids\""));
        }
        Ok(TextEncoder { session, model, hidden_output, pooled_output })
    }

    /// Hidden states `[batch, seq, hidden]` for `input_ids` `[batch, seq]`, and the pooled
    /// embedding `[batch, projection]` when this encoder provides one.
    pub(crate) fn encode(
        &mut self,
        input_ids: &Array2<i64>,
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), DiffusionError> {
        let fail = inference_error(self.model);
        let outputs = self
            .session
            .run(ort::inputs!["input_ids" => TensorRef::from_array_view(input_ids.view()).map_err(&fail)?])
            .map_err(&fail)?;
        let shape_error =
            |e: ndarray::ShapeError| DiffusionError::Inference { model: self.model, reason: e.to_string() };
        let hidden = output_f32(&outputs[self.hidden_output.as_str()], self.model)?
            .into_owned()
            .into_dimensionality::<Ix3>()
            .map_err(shape_error)?;
        let pooled = match &self.pooled_output {
            Some(name) => Some(
                output_f32(&outputs[name.as_str()], self.model)?
                    .into_owned()
                    .into_dimensionality::<Ix2>()
                    .map_err(shape_error)?,
            ),
            None => None,
        };
        Ok((hidden, pooled))
    }
}
