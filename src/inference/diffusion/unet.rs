//! The denoising UNet, run once per step on the (unconditional, conditional) batch.

use std::path::Path;
use std::sync::Mutex;

use half::f16;
use ndarray::{Array0, Array1, Array2, Array3, Array4, ArrayD, ArrayView4, Ix2, Ix3, Ix4, IxDyn};
use ort::memory::Allocator;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::TensorElementType;
use ort::value::{DynValue, Tensor, TensorRef};

use super::DiffusionError;
use super::config::{config_error, required_file};
use super::tensor::{FloatType, ModelTensor, inference_error, output_f32};
use crate::inference::{InitializerOverrides, Runtime};

const MODEL: &str = "unet";
const OUTPUT: &str = "out_sample";

/// The UNet session and the input types it was exported with.
pub(crate) struct Unet {
    session: Mutex<Session>,
    float_type: FloatType,
    timestep: TimestepInput,
}

/// How the export takes the timestep: optimum writes a rank-0 float32, older exports a rank-1
/// tensor or int64.
#[derive(Debug, Clone, Copy)]
struct TimestepInput {
    element: TensorElementType,
    rank: usize,
}

/// What the UNet is conditioned on besides the sample, in the model's element type, batch first
/// (unconditional row first when guidance is on).
pub(crate) struct UnetConditioning {
    encoder_hidden_states: ModelTensor<Ix3>,
    /// SDXL: pooled text embeddings `[batch, projection]` and size conditioning `[batch, 6]`.
    added: Option<(ModelTensor<Ix2>, ModelTensor<Ix2>)>,
}

/// The buffers of one generation, reused at every step.
pub(crate) struct UnetBuffers {
    /// The UNet's `sample` input in float32; the pipeline fills and scales it.
    pub(crate) sample: Array4<f32>,
    /// The same in float16 for half-precision models.
    sample_f16: Option<Array4<f16>>,
    timestep: TimestepValue,
    options: RunOptions<HasSelectedOutputs>,
}

enum TimestepValue {
    Float(ModelTensor<IxDyn>),
    Int(ArrayD<i64>),
}

impl Unet {
    /// Loads `dir/unet/model.onnx` with `overrides` replacing some initializers (merged LoRA
    /// weights) and checks its inputs; `size_conditioned` for SDXL.
    pub(crate) fn load(
        runtime: &Runtime,
        dir: &Path,
        size_conditioned: bool,
        overrides: InitializerOverrides,
    ) -> Result<Unet, DiffusionError> {
        let path = required_file(dir, "unet/model.onnx")?;
        let session = runtime.session_with_overrides(&path, overrides)?;
        let mut required = vec!["sample", "timestep", "encoder_hidden_states"];
        if size_conditioned {
            required.extend(["text_embeds", "time_ids"]);
        }
        for name in required {
            if !session.inputs().iter().any(|i| i.name() == name) {
                return Err(config_error(&path, format!("the model has no input named {name:?}")));
            }
        }
        let as_config_error = |e: DiffusionError| config_error(&path, e.to_string());
        let float_type = FloatType::of_input(&session, "sample", MODEL).map_err(as_config_error)?;
        FloatType::of_output(&session, OUTPUT, MODEL).map_err(as_config_error)?;
        let timestep = session
            .inputs()
            .iter()
            .find(|i| i.name() == "timestep")
            .and_then(|i| {
                Some(TimestepInput {
                    element: i.dtype().tensor_type()?,
                    rank: i.dtype().tensor_shape()?.len(),
                })
            })
            .filter(|t| {
                t.rank <= 1
                    && matches!(
                        t.element,
                        TensorElementType::Float32 | TensorElementType::Float16 | TensorElementType::Int64
                    )
            })
            .ok_or_else(|| {
                config_error(&path, "input \"timestep\" must be a float or int64 scalar or 1-element tensor")
            })?;
        Ok(Unet { session: Mutex::new(session), float_type, timestep })
    }

    /// Whether the model runs in float16.
    pub(crate) fn is_half(&self) -> bool {
        self.float_type == FloatType::F16
    }

    /// Casts the text conditioning to the model's element type, once per generation.
    pub(crate) fn conditioning(
        &self,
        encoder_hidden_states: Array3<f32>,
        added: Option<(Array2<f32>, Array2<f32>)>,
    ) -> UnetConditioning {
        UnetConditioning {
            encoder_hidden_states: ModelTensor::new(self.float_type, encoder_hidden_states),
            added: added.map(|(text_embeds, time_ids)| {
                (ModelTensor::new(self.float_type, text_embeds), ModelTensor::new(self.float_type, time_ids))
            }),
        }
    }

    /// Buffers for samples of `shape` (`[batch, channels, h, w]`).
    pub(crate) fn buffers(&self, shape: [usize; 4]) -> Result<UnetBuffers, DiffusionError> {
        let fail = inference_error(MODEL);
        let output: DynValue = match self.float_type {
            FloatType::F32 => Tensor::<f32>::new(&Allocator::default(), shape).map_err(&fail)?.into_dyn(),
            FloatType::F16 => Tensor::<f16>::new(&Allocator::default(), shape).map_err(&fail)?.into_dyn(),
        };
        let options = RunOptions::new()
            .map_err(&fail)?
            .with_outputs(OutputSelector::no_default().with(OUTPUT).preallocate(OUTPUT, output));
        let timestep_shape = IxDyn(if self.timestep.rank == 0 { &[] } else { &[1] });
        let timestep = match self.timestep.element {
            TensorElementType::Int64 => TimestepValue::Int(ArrayD::zeros(timestep_shape)),
            TensorElementType::Float16 => {
                TimestepValue::Float(ModelTensor::new(FloatType::F16, ArrayD::zeros(timestep_shape)))
            }
            _ => TimestepValue::Float(ModelTensor::new(FloatType::F32, ArrayD::zeros(timestep_shape))),
        };
        Ok(UnetBuffers {
            sample: Array4::zeros(shape),
            sample_f16: (self.float_type == FloatType::F16).then(|| Array4::from_elem(shape, f16::ZERO)),
            timestep,
            options,
        })
    }

    /// Runs the UNet on `buffers.sample` at `timestep` and hands its prediction to `consume`.
    pub(crate) fn predict(
        &self,
        buffers: &mut UnetBuffers,
        timestep: f32,
        conditioning: &UnetConditioning,
        consume: impl FnOnce(ArrayView4<'_, f32>),
    ) -> Result<(), DiffusionError> {
        let fail = inference_error(MODEL);
        if let Some(halves) = &mut buffers.sample_f16 {
            ndarray::Zip::from(halves).and(&buffers.sample).for_each(|h, &s| *h = f16::from_f32(s));
        }
        match &mut buffers.timestep {
            TimestepValue::Float(t) => t.assign(Array0::from_elem((), timestep).into_dyn().view()),
            TimestepValue::Int(t) => t.fill(timestep as i64),
        }
        let sample: SessionInputValue<'_> = match &buffers.sample_f16 {
            Some(halves) => TensorRef::from_array_view(halves.view()).map_err(&fail)?.into(),
            None => TensorRef::from_array_view(buffers.sample.view()).map_err(&fail)?.into(),
        };
        let timestep_input = match &buffers.timestep {
            TimestepValue::Float(t) => t.input().map_err(&fail)?,
            TimestepValue::Int(t) => TensorRef::from_array_view(t.view()).map_err(&fail)?.into(),
        };
        let mut inputs = ort::inputs![
            "sample" => sample,
            "timestep" => timestep_input,
            "encoder_hidden_states" => conditioning.encoder_hidden_states.input().map_err(&fail)?,
        ];
        if let Some((text_embeds, time_ids)) = &conditioning.added {
            inputs.push(("text_embeds".into(), text_embeds.input().map_err(&fail)?));
            inputs.push(("time_ids".into(), time_ids.input().map_err(&fail)?));
        }
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run_with_options(inputs, &buffers.options).map_err(&fail)?;
        let prediction = output_f32(&outputs[OUTPUT], MODEL)?;
        let prediction = prediction
            .view()
            .into_dimensionality::<Ix4>()
            .map_err(|e| DiffusionError::Inference { model: MODEL, reason: e.to_string() })?;
        consume(prediction);
        Ok(())
    }
}

/// SDXL's size conditioning `[original_h, original_w, crop_top, crop_left, target_h, target_w]`,
/// one row per batch entry.
pub(crate) fn time_ids(height: usize, width: usize, batch: usize) -> Array2<f32> {
    let row = Array1::from(vec![height as f32, width as f32, 0.0, 0.0, height as f32, width as f32]);
    Array2::from_shape_fn((batch, 6), |(_, j)| row[j])
}
