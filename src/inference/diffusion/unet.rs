//! The denoising UNet, run once per step on the (unconditional, conditional) batch; with control,
//! the same UNet exported with ControlNet residual inputs (`unet_controlnet/`).

use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

use half::f16;
use ndarray::{Array0, Array1, Array2, Array3, Array4, ArrayD, ArrayView4, Ix2, Ix3, Ix4, IxDyn};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{HasSelectedOutputs, IoBinding, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::TensorElementType;
use ort::value::{DynTensor, DynValue, Tensor, TensorRef};

use super::DiffusionError;
use super::config::{config_error, required_file};
use super::controlnet::{ResidualLayout, Residuals};
use super::tensor::{FloatType, ModelTensor, inference_error, output_f32};
use crate::inference::{InitializerOverrides, Runtime};

const MODEL: &str = "unet";
const OUTPUT: &str = "out_sample";
const MID_RESIDUAL: &str = "mid_block_additional_residual";

/// Which export of the UNet a session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnetGraph {
    /// `unet/model.onnx`: the sample, timestep and text conditioning.
    Plain,
    /// `unet_controlnet/model.onnx`: the same plus ControlNet residuals
    /// (`down_block_additional_residual_<i>`, `mid_block_additional_residual`).
    Residual,
}

impl UnetGraph {
    /// The model file, relative to the pipeline directory.
    pub(crate) fn file(self) -> &'static str {
        match self {
            UnetGraph::Plain => "unet/model.onnx",
            UnetGraph::Residual => "unet_controlnet/model.onnx",
        }
    }
}

/// The UNet session and the input types it was exported with.
pub(crate) struct Unet {
    session: Session,
    float_type: FloatType,
    timestep: TimestepInput,
    /// The residual inputs a [`UnetGraph::Residual`] export takes; `None` for the plain UNet.
    residuals: Option<ResidualLayout>,
    /// The CUDA device the session runs on; `None` on the CPU.
    cuda_device: Option<i32>,
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

impl UnetConditioning {
    /// The conditioning as named session inputs (ControlNets take the same).
    pub(crate) fn inputs(&self) -> ort::Result<Vec<(Cow<'static, str>, SessionInputValue<'_>)>> {
        let mut inputs = vec![("encoder_hidden_states".into(), self.encoder_hidden_states.input()?)];
        if let Some((text_embeds, time_ids)) = &self.added {
            inputs.push(("text_embeds".into(), text_embeds.input()?));
            inputs.push(("time_ids".into(), time_ids.input()?));
        }
        Ok(inputs)
    }
}

/// The buffers of one generation, reused at every step.
pub(crate) struct UnetBuffers {
    /// The UNet's `sample` input in float32; the pipeline fills and scales it.
    pub(crate) sample: Array4<f32>,
    /// The same in float16 for half-precision models.
    sample_f16: Option<Array4<f16>>,
    timestep: TimestepValue,
    options: RunOptions<HasSelectedOutputs>,
    /// On CUDA: inputs and output bound in GPU memory.
    device: Option<DeviceBuffers>,
}

/// A generation's UNet buffers on a CUDA device. The conditioning is copied to the GPU once per
/// generation and the output is written in GPU memory; per step only the sample goes up and the
/// prediction comes back, because the schedulers run on the host.
struct DeviceBuffers {
    binding: IoBinding,
    /// The prediction in GPU memory, bound as the session's output.
    output: DynTensor,
    /// The prediction copied back for the scheduler.
    host_output: DynTensor,
}

/// Where one UNet step's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepCost {
    /// The session run alone (on CUDA: the GPU's work, synchronised).
    pub(crate) run_ms: f64,
    /// Copies between host and device memory (zero on the CPU).
    pub(crate) transfer_ms: f64,
}

enum TimestepValue {
    Float(ModelTensor<IxDyn>),
    Int(ArrayD<i64>),
}

impl Unet {
    /// Loads `graph`'s file in `dir` with `overrides` replacing some initializers (merged LoRA
    /// weights) and checks its inputs; `size_conditioned` for SDXL.
    pub(crate) fn load(
        runtime: &Runtime,
        dir: &Path,
        graph: UnetGraph,
        size_conditioned: bool,
        overrides: InitializerOverrides,
    ) -> Result<Unet, DiffusionError> {
        let path = required_file(dir, graph.file())?;
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
        let residuals = match graph {
            UnetGraph::Plain => None,
            UnetGraph::Residual => Some(
                ResidualLayout::read(session.inputs(), down_residual_input, MID_RESIDUAL)
                    .map_err(|reason| config_error(&path, reason))?,
            ),
        };
        Ok(Unet { session, float_type, timestep, residuals, cuda_device: runtime.cuda_device() })
    }

    /// The ControlNet residuals a residual-input UNet takes.
    pub(crate) fn residual_layout(&self) -> Option<&ResidualLayout> {
        self.residuals.as_ref()
    }

    /// The width of the text conditioning the UNet attends to.
    pub(crate) fn cross_attention_width(&self) -> Option<i64> {
        let input = self.session.inputs().iter().find(|i| i.name() == "encoder_hidden_states")?;
        input.dtype().tensor_shape()?.last().copied().filter(|&d| d > 0)
    }

    /// The element type of the sample and conditioning.
    pub(crate) fn float_type(&self) -> FloatType {
        self.float_type
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

    /// Buffers for predictions of `shape` (`[batch, channels, h, w]`) from samples of
    /// `sample_channels` channels, conditioned on `conditioning`.
    pub(crate) fn buffers(
        &self,
        shape: [usize; 4],
        sample_channels: usize,
        conditioning: &UnetConditioning,
    ) -> Result<UnetBuffers, DiffusionError> {
        let [rows, _, h, w] = shape;
        let sample_shape = [rows, sample_channels, h, w];
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
        let device = match self.cuda_device {
            Some(device_id) => Some(self.device_buffers(device_id, shape, conditioning).map_err(&fail)?),
            None => None,
        };
        Ok(UnetBuffers {
            sample: Array4::zeros(sample_shape),
            sample_f16: (self.float_type == FloatType::F16)
                .then(|| Array4::from_elem(sample_shape, f16::ZERO)),
            timestep,
            options,
            device,
        })
    }

    fn device_buffers(
        &self,
        device_id: i32,
        shape: [usize; 4],
        conditioning: &UnetConditioning,
    ) -> ort::Result<DeviceBuffers> {
        let session = &self.session;
        let gpu = Allocator::new(
            session,
            MemoryInfo::new(AllocationDevice::CUDA, device_id, AllocatorType::Device, MemoryType::Default)?,
        )?;
        let (mut output, host_output) = match self.float_type {
            FloatType::F32 => (
                Tensor::<f32>::new(&gpu, shape)?.upcast(),
                Tensor::<f32>::new(&Allocator::default(), shape)?.upcast(),
            ),
            FloatType::F16 => (
                Tensor::<f16>::new(&gpu, shape)?.upcast(),
                Tensor::<f16>::new(&Allocator::default(), shape)?.upcast(),
            ),
        };
        let mut binding = session.create_binding()?;
        binding.bind_output(OUTPUT, &mut output)?;
        binding.bind_input("encoder_hidden_states", &conditioning.encoder_hidden_states.to_value()?)?;
        if let Some((text_embeds, time_ids)) = &conditioning.added {
            binding.bind_input("text_embeds", &text_embeds.to_value()?)?;
            binding.bind_input("time_ids", &time_ids.to_value()?)?;
        }
        Ok(DeviceBuffers { binding, output, host_output })
    }

    /// Runs the UNet on `buffers.sample` at `timestep` (a residual-input UNet with `residuals`)
    /// and hands its prediction to `consume`.
    pub(crate) fn predict(
        &mut self,
        buffers: &mut UnetBuffers,
        timestep: f32,
        conditioning: &UnetConditioning,
        residuals: Option<Residuals>,
        consume: impl FnOnce(ArrayView4<'_, f32>),
    ) -> Result<StepCost, DiffusionError> {
        let residuals = self.residual_values(residuals)?;
        let fail = inference_error(MODEL);
        if let Some(halves) = &mut buffers.sample_f16 {
            ndarray::Zip::from(halves).and(&buffers.sample).for_each(|h, &s| *h = f16::from_f32(s));
        }
        match &mut buffers.timestep {
            TimestepValue::Float(t) => t.assign(Array0::from_elem((), timestep).into_dyn().view()),
            TimestepValue::Int(t) => t.fill(timestep as i64),
        }
        if buffers.device.is_some() {
            return self.predict_on_device(buffers, &residuals, consume);
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
        ];
        inputs.extend(conditioning.inputs().map_err(&fail)?);
        for (name, value) in &residuals {
            inputs.push((name.clone().into(), value.input().map_err(&fail)?));
        }
        let started = Instant::now();
        let outputs = self.session.run_with_options(inputs, &buffers.options).map_err(&fail)?;
        let cost = StepCost { run_ms: elapsed_ms(started), transfer_ms: 0.0 };
        consume(as_4d(&output_f32(&outputs[OUTPUT], MODEL)?)?);
        Ok(cost)
    }

    /// One step through the device binding: the sample and timestep go up, the prediction comes back.
    fn predict_on_device(
        &mut self,
        buffers: &mut UnetBuffers,
        residuals: &[(String, ModelTensor<Ix4>)],
        consume: impl FnOnce(ArrayView4<'_, f32>),
    ) -> Result<StepCost, DiffusionError> {
        let fail = inference_error(MODEL);
        let UnetBuffers { sample, sample_f16, timestep, device: Some(device), .. } = buffers else {
            return Err(DiffusionError::Inference { model: MODEL, reason: "no device buffers".into() });
        };
        let sample: DynValue = match sample_f16 {
            Some(halves) => Tensor::from_array(halves.clone()).map_err(&fail)?.into_dyn(),
            None => Tensor::from_array(sample.clone()).map_err(&fail)?.into_dyn(),
        };
        let timestep = match timestep {
            TimestepValue::Float(t) => t.to_value(),
            TimestepValue::Int(t) => Tensor::from_array(t.clone()).map(Tensor::into_dyn),
        }
        .map_err(&fail)?;
        let started = Instant::now();
        device.binding.bind_input("sample", &sample).map_err(&fail)?;
        device.binding.bind_input("timestep", &timestep).map_err(&fail)?;
        for (name, value) in residuals {
            device.binding.bind_input(name, &value.to_value().map_err(&fail)?).map_err(&fail)?;
        }
        device.binding.synchronize_inputs().map_err(&fail)?;
        let mut transfer_ms = elapsed_ms(started);
        let started = Instant::now();
        self.session.run_binding(&device.binding).map_err(&fail)?;
        let run_ms = elapsed_ms(started);
        let started = Instant::now();
        device.output.copy_into(&mut device.host_output).map_err(&fail)?;
        transfer_ms += elapsed_ms(started);
        consume(as_4d(&output_f32(&device.host_output, MODEL)?)?);
        Ok(StepCost { run_ms, transfer_ms })
    }
}

impl Unet {
    /// The residuals as named inputs in the model's element type (float32 ones moved, not copied);
    /// a residual-input UNet needs them and a plain one takes none.
    fn residual_values(
        &self,
        residuals: Option<Residuals>,
    ) -> Result<Vec<(String, ModelTensor<Ix4>)>, DiffusionError> {
        let missing = |reason: &str| DiffusionError::Inference { model: MODEL, reason: reason.into() };
        match (&self.residuals, residuals) {
            (None, None) => Ok(Vec::new()),
            (None, Some(_)) => Err(missing("this UNet takes no ControlNet residuals")),
            (Some(_), None) => Err(missing("this UNet needs ControlNet residuals")),
            (Some(layout), Some(residuals)) => {
                if residuals.down.len() != layout.down_channels.len() {
                    return Err(missing("the ControlNet residuals do not match the UNet's inputs"));
                }
                let Residuals { down, mid } = residuals;
                let down = down.into_iter().enumerate().map(|(i, r)| (down_residual_input(i), r));
                Ok(down
                    .chain(std::iter::once((MID_RESIDUAL.to_string(), mid)))
                    .map(|(name, r)| (name, ModelTensor::new(self.float_type, r)))
                    .collect())
            }
        }
    }
}

/// The name of the residual-input UNet's `i`-th down-block residual input.
fn down_residual_input(i: usize) -> String {
    format!("down_block_additional_residual_{i}")
}

fn as_4d<'a>(
    prediction: &'a ndarray::CowArray<'_, f32, IxDyn>,
) -> Result<ArrayView4<'a, f32>, DiffusionError> {
    prediction
        .view()
        .into_dimensionality::<Ix4>()
        .map_err(|e| DiffusionError::Inference { model: MODEL, reason: e.to_string() })
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// SDXL's size conditioning `[original_h, original_w, crop_top, crop_left, target_h, target_w]`,
/// one row per batch entry.
pub(crate) fn time_ids(height: usize, width: usize, batch: usize) -> Array2<f32> {
    let row = Array1::from(vec![height as f32, width as f32, 0.0, 0.0, height as f32, width as f32]);
    Array2::from_shape_fn((batch, 6), |(_, j)| row[j])
}
