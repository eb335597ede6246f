//! The control stage: which ControlNet units a generation gets, and their control images (a
//! unit's own `image_url`, or made from the user's photo: canny edges, HED soft edges).

use std::collections::BTreeMap;

use image::RgbImage;

use super::RunContext;
use super::photo::{PhotoSources, decode};
use super::plan::ControlSettings;
use crate::core::FailureCode;
use crate::core::request::{CANNY, DEFAULT_STRENGTH};
use crate::core::{
    ControlNetInfo, ControlRequest, ControlUsed, DefaultControl, Failure, GenerateRequest, PhotoSource,
};
use crate::inference::ModelOwner;
use crate::inference::diffusion::ControlUnit;
use crate::inference::vision::{Hed, canny_control};

/// The control type whose images HED makes from the photo.
pub const SOFTEDGE: &str = "softedge";

/// The default control of desk photos, and the model that makes soft-edge control images. Which
/// ControlNets there are is a matter of each Stable Diffusion model: methods take its types.
pub struct Controls {
    /// `[control]` of the pipeline settings.
    pub default: Option<ControlSettings>,
    /// The HED soft-edge model, on its own thread; none when not loaded.
    pub hed: Option<ModelOwner<Hed>>,
}

/// The control of one generation: the units, the images fetched for those that have their own,
/// and the img2img strength that goes with them.
pub struct Guidance<'a> {
    units: Vec<(ControlRequest, Option<RgbImage>)>,
    /// The img2img strength when the request sets none.
    pub default_strength: f64,
    hed: Option<&'a ModelOwner<Hed>>,
}

impl Controls {
    /// A model's ControlNets, of `types`, as /info lists them.
    pub fn info(&self, types: &[String]) -> Vec<ControlNetInfo> {
        types
            .iter()
            .map(|t| ControlNetInfo { control_type: t.clone(), from_photo: self.makes_from_photo(t) })
            .collect()
    }

    /// Whether the service can make `control_type`'s image from the photo.
    fn makes_from_photo(&self, control_type: &str) -> bool {
        control_type == CANNY || (control_type == SOFTEDGE && self.hed.is_some())
    }

    /// The default control as /info states it; none when the model (with ControlNets of
    /// `types`) lacks its ControlNet.
    pub fn default_info(&self, types: &[String]) -> Option<DefaultControl> {
        let d = self.applicable_default(types)?;
        Some(DefaultControl {
            control_type: d.control_type.clone(),
            scale: d.scale,
            guidance_start: d.guidance_start,
            guidance_end: d.guidance_end,
            strength: d.strength,
        })
    }

    fn applicable_default(&self, types: &[String]) -> Option<&ControlSettings> {
        self.default.as_ref().filter(|d| types.contains(&d.control_type))
    }

    /// The units `request` asks for, or for a photo without `control` the default one (when the
    /// model, with ControlNets of `types`, has its type), with the images of units that bring
    /// their own, read like the photo.
    pub async fn guidance(
        &self,
        request: &GenerateRequest,
        types: &[String],
        sources: &PhotoSources,
        ctx: &RunContext,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<Guidance<'_>, Failure> {
        // Inpainting repaints the masked region from noise unless the request says otherwise, and
        // takes no control (the desk default included).
        let plain_strength = if request.mask.is_some() { 1.0 } else { f64::from(DEFAULT_STRENGTH) };
        let (requests, default_strength) = match (&request.control, self.applicable_default(types)) {
            (Some(units), _) => (units.clone(), plain_strength),
            (None, Some(d)) if request.photo.is_some() && request.mask.is_none() => {
                (vec![default_unit(d)], d.strength)
            }
            (None, _) => (Vec::new(), plain_strength),
        };
        let mut units = Vec::with_capacity(requests.len());
        for unit in requests {
            let image = match &unit.image_url {
                Some(url) => {
                    let bytes = sources.read(&PhotoSource::Url(url.clone()), ctx, timings).await?;
                    Some(decode(bytes, sources.max_image_pixels, timings).await?)
                }
                None => None,
            };
            units.push((unit, image));
        }
        Ok(Guidance { units, default_strength, hed: self.hed.as_ref() })
    }
}

impl Guidance<'_> {
    /// The units for the engine, the photo already shaped to the output: units without an image
    /// of their own get the photo's canny edges or HED soft edges.
    pub async fn units(&self, shaped_photo: Option<&RgbImage>) -> Result<Vec<ControlUnit>, Failure> {
        let mut units = Vec::with_capacity(self.units.len());
        for (unit, own) in &self.units {
            let image = match (own, shaped_photo) {
                (Some(image), _) => image.clone(),
                (None, Some(photo)) => self.image_from_photo(unit, photo).await?,
                (None, None) => continue,
            };
            units.push(ControlUnit {
                control_type: unit.control_type.clone(),
                image,
                scale: unit.scale as f32,
                guidance_start: unit.guidance_start as f32,
                guidance_end: unit.guidance_end as f32,
            });
        }
        Ok(units)
    }

    /// The control image of `unit` made from `photo`: HED's soft edges, or canny's edges.
    async fn image_from_photo(&self, unit: &ControlRequest, photo: &RgbImage) -> Result<RgbImage, Failure> {
        let failed = |reason: String| Failure::new(FailureCode::ModelError, format!("soft edges: {reason}"));
        match (unit.control_type.as_str(), self.hed) {
            (SOFTEDGE, Some(hed)) => {
                let photo = photo.clone();
                let edges =
                    hed.run(move |hed| hed.soft_edges(&photo)).await.map_err(|e| failed(e.to_string()))?;
                edges.map_err(|e| failed(e.to_string()))
            }
            _ => Ok(canny_control(photo, unit.low_threshold as f32, unit.high_threshold as f32)),
        }
    }

    /// What the result reports of the control used.
    pub fn used(&self) -> Vec<ControlUsed> {
        self.units
            .iter()
            .map(|(unit, _)| ControlUsed { control_type: unit.control_type.clone(), scale: unit.scale })
            .collect()
    }
}

fn default_unit(d: &ControlSettings) -> ControlRequest {
    ControlRequest {
        control_type: d.control_type.clone(),
        scale: d.scale,
        guidance_start: d.guidance_start,
        guidance_end: d.guidance_end,
        image_url: None,
        low_threshold: d.low_threshold,
        high_threshold: d.high_threshold,
    }
}
