//! ControlNets (diffusers' `ControlNetModel`): at each denoising step every active control unit
//! runs its ControlNet on the UNet's inputs and a control image; the down- and mid-block residuals,
//! each times its unit's scale and summed over the units as diffusers' `MultiControlNetModel` sums
//! them, feed the UNet exported with residual inputs (`unet_controlnet/`).
//!
//! A ControlNet lives in `controlnet/<type>/model.onnx` beside the pipeline (or anywhere, with
//! `--controlnet TYPE=DIR`), exported by `onnx/export_controlnet.py`: inputs `sample`, `timestep`,
//! `encoder_hidden_states`, `controlnet_cond` (`[batch, 3, H, W]` in [0, 1]) and for SDXL
//! `text_embeds`, `time_ids`; outputs `down_block_res_sample_<i>` and `mid_block_res_sample`,
//! unscaled.

use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use image::imageops::FilterType;
use ndarray::{Array0, Array4, ArrayView4, CowArray, Ix4};
use ort::session::Session;
use ort::value::Outlet;

use super::DiffusionError;
use super::config::{config_error, required_file};
use super::tensor::{FloatType, ModelTensor, inference_error, output_f32};
use super::unet::{Unet, UnetConditioning};
use crate::inference::Runtime;

const MODEL: &str = "controlnet";
const MID_OUTPUT: &str = "mid_block_res_sample";

/// One control of a generation: a ControlNet by its type, the control image and how strongly and
/// when it steers (diffusers' `controlnet_conditioning_scale`, `control_guidance_start` / `_end`).
#[derive(Debug, Clone)]
pub struct ControlUnit {
    /// The control type, the name of a loaded ControlNet (`canny`, `softedge`, …).
    pub control_type: String,
    /// The control image; resized to the output size when it differs.
    pub image: RgbImage,
    /// Multiplies the ControlNet's residuals; 0 leaves the unit out.
    pub scale: f32,
    /// The share of the steps run after which the unit starts acting, in [0, 1).
    pub guidance_start: f32,
    /// The share of the steps run after which it stops, in (0, 1], above `guidance_start`.
    pub guidance_end: f32,
}

/// The largest `scale` a control unit may have.
pub const MAX_CONTROL_SCALE: f32 = 2.0;

/// One loaded ControlNet and the control type it was trained for.
pub(crate) struct ControlNet {
    session: Session,
    control_type: String,
    float_type: FloatType,
    layout: ResidualLayout,
    cross_attention_width: Option<i64>,
}

/// The channels of the residuals a ControlNet gives or a residual-input UNet takes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResidualLayout {
    /// One per down-block residual.
    pub(crate) down_channels: Vec<i64>,
    /// The mid-block residual.
    pub(crate) mid_channels: i64,
}

impl ResidualLayout {
    /// The layout named by `down(0)`, `down(1)`, … and `mid` among `outlets`.
    pub(crate) fn read(
        outlets: &[Outlet],
        down: impl Fn(usize) -> String,
        mid: &str,
    ) -> Result<ResidualLayout, String> {
        let channels = |name: &str| {
            let outlet = outlets.iter().find(|o| o.name() == name)?;
            outlet.dtype().tensor_shape().and_then(|shape| shape.get(1).copied())
        };
        let mut down_channels = Vec::new();
        while let Some(c) = channels(&down(down_channels.len())) {
            down_channels.push(c);
        }
        if down_channels.is_empty() {
            return Err(format!("the model has no {:?}", down(0)));
        }
        let mid_channels = channels(mid).ok_or_else(|| format!("the model has no {mid:?}"))?;
        Ok(ResidualLayout { down_channels, mid_channels })
    }
}

/// The summed, scaled residuals of one step, in the UNet's input order.
pub(crate) struct Residuals {
    pub(crate) down: Vec<Array4<f32>>,
    pub(crate) mid: Array4<f32>,
}

impl ControlNet {
    /// Loads `dir/model.onnx` as the ControlNet for `control_type`; `size_conditioned` for SDXL.
    pub(crate) fn load(
        runtime: &Runtime,
        dir: &Path,
        control_type: &str,
        size_conditioned: bool,
    ) -> Result<ControlNet, DiffusionError> {
        let path = required_file(dir, "model.onnx")?;
        let session = runtime.session(&path)?;
        let mut required = vec!["sample", "timestep", "encoder_hidden_states", "controlnet_cond"];
        if size_conditioned {
            required.extend(["text_embeds", "time_ids"]);
        }
        let has_input = |name: &str| session.inputs().iter().any(|i| i.name() == name);
        for name in required {
            if !has_input(name) {
                let family = if size_conditioned { "an SDXL pipeline needs an SDXL ControlNet" } else { "" };
                return Err(config_error(
                    &path,
                    format!("the ControlNet has no input named {name:?}; {family}")
                        .trim_end_matches("; ")
                        .to_string(),
                ));
            }
        }
        if !size_conditioned && has_input("text_embeds") {
            return Err(config_error(
                &path,
                "this is an SDXL ControlNet (it takes text_embeds and time_ids); this pipeline is SD 1.x/2.x",
            ));
        }
        let float_type =
            FloatType::of_input(&session, "sample", MODEL).map_err(|e| config_error(&path, e.to_string()))?;
        let layout = ResidualLayout::read(session.outputs(), down_output, MID_OUTPUT)
            .map_err(|reason| config_error(&path, reason))?;
        let cross_attention_width = session
            .inputs()
            .iter()
            .find(|i| i.name() == "encoder_hidden_states")
            .and_then(|i| i.dtype().tensor_shape()?.last().copied())
            .filter(|&d| d > 0);
        Ok(ControlNet {
            session,
            control_type: control_type.to_string(),
            float_type,
            layout,
            cross_attention_width,
        })
    }

    /// The control type requests name it by.
    pub(crate) fn control_type(&self) -> &str {
        &self.control_type
    }

    /// Refuses a ControlNet whose residuals or text width do not fit `unet` (the residual-input
    /// UNet), i.e. one trained for another base model.
    pub(crate) fn check_fits(&self, unet: &Unet, path: &Path) -> Result<(), DiffusionError> {
        let misfit = |what: String| {
            config_error(
                path,
                format!(
                    "ControlNet {:?} does not fit this pipeline's unet_controlnet: {what}; it was made for \
                     another base model",
                    self.control_type
                ),
            )
        };
        let Some(layout) = unet.residual_layout() else {
            return Err(misfit("the UNet takes no residuals".into()));
        };
        if &self.layout != layout {
            return Err(misfit(format!(
                "its residual channels are {:?} + mid {}, the UNet takes {:?} + mid {}",
                self.layout.down_channels,
                self.layout.mid_channels,
                layout.down_channels,
                layout.mid_channels
            )));
        }
        if let (Some(ours), Some(theirs)) = (self.cross_attention_width, unet.cross_attention_width())
            && ours != theirs
        {
            return Err(misfit(format!("its cross-attention width is {ours}, the UNet's {theirs}")));
        }
        if self.float_type != unet.float_type() {
            return Err(misfit(format!(
                "it runs in {:?}, the UNet in {:?}",
                self.float_type,
                unet.float_type()
            )));
        }
        Ok(())
    }

    /// Runs on the UNet's `sample` at `timestep` with the control `image` and adds the residuals
    /// times `scale` to `sums` (which the first unit of a step creates); returns the run's
    /// milliseconds.
    pub(crate) fn add_residuals(
        &mut self,
        sample: ArrayView4<'_, f32>,
        timestep: f32,
        conditioning: &UnetConditioning,
        image: &ModelTensor<Ix4>,
        scale: f32,
        sums: &mut Option<Residuals>,
    ) -> Result<f64, DiffusionError> {
        let fail = inference_error(MODEL);
        let sample = ModelTensor::new(self.float_type, sample.to_owned());
        let timestep = ModelTensor::new(self.float_type, Array0::from_elem((), timestep).into_dyn());
        let mut inputs = ort::inputs![
            "sample" => sample.input().map_err(&fail)?,
            "timestep" => timestep.input().map_err(&fail)?,
            "controlnet_cond" => image.input().map_err(&fail)?,
        ];
        inputs.extend(conditioning.inputs().map_err(&fail)?);
        let started = Instant::now();
        let outputs = self.session.run(inputs).map_err(&fail)?;
        let run_ms = started.elapsed().as_secs_f64() * 1000.0;
        // Borrowed where the model gives float32: each residual is read once, scaled as it goes.
        let residual = |name: &str| -> Result<CowArray<'_, f32, Ix4>, DiffusionError> {
            output_f32(&outputs[name], MODEL)?
                .into_dimensionality::<Ix4>()
                .map_err(|e| DiffusionError::Inference { model: MODEL, reason: e.to_string() })
        };
        match sums {
            None => {
                let scaled = |name: &str| residual(name).map(|r| r.mapv(|v| v * scale));
                let down: Result<Vec<_>, _> =
                    (0..self.layout.down_channels.len()).map(|i| scaled(&down_output(i))).collect();
                *sums = Some(Residuals { down: down?, mid: scaled(MID_OUTPUT)? });
            }
            Some(sums) => {
                for (i, sum) in sums.down.iter_mut().enumerate() {
                    sum.scaled_add(scale, &residual(&down_output(i))?);
                }
                sums.mid.scaled_add(scale, &residual(MID_OUTPUT)?);
            }
        }
        Ok(run_ms)
    }
}

/// The name of a ControlNet's `i`-th down-block residual output.
fn down_output(i: usize) -> String {
    format!("down_block_res_sample_{i}")
}

/// A control image as the ControlNet's `controlnet_cond` `[rows, 3, height, width]` in [0, 1]:
/// resized to the output size first when it differs (Lanczos, aspect not kept), as diffusers'
/// `VaeImageProcessor` resizes it.
pub(crate) fn control_input(
    image: &RgbImage,
    width: u32,
    height: u32,
    rows: usize,
    float_type: FloatType,
) -> ModelTensor<Ix4> {
    let resized;
    let image = if image.dimensions() == (width, height) {
        image
    } else {
        resized = image::imageops::resize(image, width, height, FilterType::Lanczos3);
        &resized
    };
    let pixels = Array4::from_shape_fn((rows, 3, height as usize, width as usize), |(_, c, y, x)| {
        f32::from(image.get_pixel(x as u32, y as u32)[c]) / 255.0
    });
    ModelTensor::new(float_type, pixels)
}

/// Whether `[start, end]` is a guidance window diffusers accepts: `0 <= start < end <= 1`.
pub fn is_guidance_window(start: f64, end: f64) -> bool {
    (0.0..1.0).contains(&start) && end > start && end <= 1.0
}

/// diffusers' `controlnet_keep`: whether a unit with guidance window `[start, end]` acts at step
/// `index` of `total` steps run.
pub(crate) fn acts_at(index: usize, total: usize, start: f32, end: f32) -> bool {
    let (from, to) = (index as f64 / total as f64, (index + 1) as f64 / total as f64);
    !(from < f64::from(start) || to > f64::from(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_covers_the_steps_diffusers_keeps() {
        let kept = |start, end| (0..4).filter(|&i| acts_at(i, 4, start, end)).collect::<Vec<_>>();
        assert_eq!(kept(0.0, 1.0), [0, 1, 2, 3]);
        assert_eq!(kept(0.0, 0.5), [0, 1]);
        assert_eq!(kept(0.25, 1.0), [1, 2, 3]);
        assert_eq!(kept(0.0, 0.75), [0, 1, 2]);
        assert_eq!(kept(0.3, 0.6), Vec::<usize>::new());
    }

    #[test]
    fn a_control_image_of_another_size_is_resized_to_the_output() {
        let image = RgbImage::from_pixel(10, 20, image::Rgb([255, 0, 51]));
        let ModelTensor::F32(pixels) = control_input(&image, 16, 8, 2, FloatType::F32) else {
            unreachable!()
        };
        assert_eq!(pixels.dim(), (2, 3, 8, 16));
        assert!((pixels[[1, 0, 4, 4]] - 1.0).abs() < 1e-6 && pixels[[0, 1, 0, 0]].abs() < 1e-6);
        assert!((pixels[[0, 2, 7, 15]] - 0.2).abs() < 1e-6);
    }
}
