//! Float tensors at the session boundary: models may take float32 or float16, the pipeline
//! computes in float32 and casts only when it hands a tensor over or takes one back.

use half::f16;
use ndarray::{Array, ArrayView, ArrayViewD, CowArray, Dimension, IxDyn, Zip};
use ort::session::{Session, SessionInputValue};
use ort::value::TensorElementType;
use ort::value::{DynValue, Outlet, Tensor, TensorRef, TensorValueTypeMarker, Value};

use super::DiffusionError;

/// The float element type a model input expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatType {
    F32,
    F16,
}

impl FloatType {
    /// The element type of input `name` of `session`, which must be a float tensor.
    pub(crate) fn of_input(
        session: &Session,
        name: &str,
        model: &'static str,
    ) -> Result<FloatType, DiffusionError> {
        FloatType::of(session.inputs(), name, model)
    }

    /// The element type of output `name` of `session`, which must be a float tensor.
    pub(crate) fn of_output(
        session: &Session,
        name: &str,
        model: &'static str,
    ) -> Result<FloatType, DiffusionError> {
        FloatType::of(session.outputs(), name, model)
    }

    fn of(outlets: &[Outlet], name: &str, model: &'static str) -> Result<FloatType, DiffusionError> {
        let outlet = outlets.iter().find(|i| i.name() == name).ok_or_else(|| DiffusionError::Inference {
            model,
            reason: format!("the model has no input or output named {name:?}"),
        })?;
        match outlet.dtype().tensor_type() {
            Some(TensorElementType::Float32) => Ok(FloatType::F32),
            Some(TensorElementType::Float16) => Ok(FloatType::F16),
            other => Err(DiffusionError::Inference {
                model,
                reason: format!("input {name:?} has element type {other:?}, expected float32 or float16"),
            }),
        }
    }
}

/// A float tensor held in a model's element type.
pub(crate) enum ModelTensor<D: Dimension> {
    F32(Array<f32, D>),
    F16(Array<f16, D>),
}

impl<D: Dimension + 'static> ModelTensor<D> {
    /// `values` in `float_type`; float32 values are moved, not copied.
    pub(crate) fn new(float_type: FloatType, values: Array<f32, D>) -> ModelTensor<D> {
        match float_type {
            FloatType::F32 => ModelTensor::F32(values),
            FloatType::F16 => ModelTensor::F16(values.mapv(f16::from_f32)),
        }
    }

    /// Overwrites this tensor with `values` (same shape), casting as needed.
    pub(crate) fn assign(&mut self, values: ArrayView<'_, f32, D>) {
        match self {
            ModelTensor::F32(a) => a.assign(&values),
            ModelTensor::F16(a) => Zip::from(a).and(values).for_each(|d, &s| *d = f16::from_f32(s)),
        }
    }

    /// An owned copy as a session value, for binding to a device.
    pub(crate) fn to_value(&self) -> ort::Result<DynValue> {
        Ok(match self {
            ModelTensor::F32(a) => Tensor::from_array(a.clone())?.into_dyn(),
            ModelTensor::F16(a) => Tensor::from_array(a.clone())?.into_dyn(),
        })
    }

    /// A session input borrowing this tensor.
    pub(crate) fn input(&self) -> ort::Result<SessionInputValue<'_>> {
        Ok(match self {
            ModelTensor::F32(a) => TensorRef::from_array_view(a.view())?.into(),
            ModelTensor::F16(a) => TensorRef::from_array_view(a.view())?.into(),
        })
    }
}

/// A float output as float32: borrowed when the model produced float32, converted otherwise.
pub(crate) fn output_f32<'v, T: TensorValueTypeMarker + ?Sized>(
    value: &'v Value<T>,
    model: &'static str,
) -> Result<CowArray<'v, f32, IxDyn>, DiffusionError> {
    if let Ok(view) = value.try_extract_array::<f32>() {
        return Ok(CowArray::from(view));
    }
    let halves: ArrayViewD<'_, f16> = value.try_extract_array::<f16>().map_err(|e| {
        DiffusionError::Inference { model, reason: format!("output is neither float32 nor float16: {e}") }
    })?;
    Ok(CowArray::from(halves.mapv(f16::to_f32)))
}

/// Maps an ONNX Runtime error of `model` into ours.
pub(crate) fn inference_error(model: &'static str) -> impl Fn(ort::Error) -> DiffusionError {
    move |e| DiffusionError::Inference { model, reason: e.to_string() }
}
