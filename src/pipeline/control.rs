//! The control stage: which ControlNet units a generation gets, and their control images (a
//! unit's own `image_url`, or canny edges of the user's photo).

use std::collections::BTreeMap;

use image::RgbImage;

use super::RunContext;
use super::photo::{PhotoSources, decode};
use super::plan::ControlSettings;
use crate::core::request::{CANNY, DEFAULT_STRENGTH};
use crate::core::{
    ControlNetInfo, ControlRequest, ControlUsed, DefaultControl, Failure, GenerateRequest, PhotoSource,
};
use crate::inference::diffusion::ControlUnit;
use crate::inference::vision::canny_control;

/// The ControlNets the model has and the default control of desk photos.
pub struct Controls {
    /// The control types the model has ControlNets for, sorted.
    pub types: Vec<String>,
    /// `[control]` of the pipeline settings.
    pub default: Option<ControlSettings>,
}

/// The control of one generation: the units, the images fetched for those that have their own,
/// and the img2img strength that goes with them.
pub struct Guidance {
    units: Vec<(ControlRequest, Option<RgbImage>)>,
    /// The img2img strength when the request sets none.
    pub default_strength: f64,
}

impl Controls {
    /// The ControlNets as /info lists them.
    pub fn info(&self) -> Vec<ControlNetInfo> {
        self.types
            .iter()
            .map(|t| ControlNetInfo { control_type: t.clone(), from_photo: t == CANNY })
            .collect()
    }

    /// The default control as /info states it; none when the model lacks its ControlNet.
    pub fn default_info(&self) -> Option<DefaultControl> {
        let d = self.applicable_default()?;
        Some(DefaultControl {
            control_type: d.control_type.clone(),
            scale: d.scale,
            guidance_start: d.guidance_start,
            guidance_end: d.guidance_end,
            strength: d.strength,
        })
    }

    fn applicable_default(&self) -> Option<&ControlSettings> {
        self.default.as_ref().filter(|d| self.types.contains(&d.control_type))
    }

    /// The units `request` asks for, or for a photo without `control` the default one, with the
    /// images of units that bring their own, read like the photo.
    pub async fn guidance(
        &self,
        request: &GenerateRequest,
        sources: &PhotoSources,
        ctx: &RunContext,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<Guidance, Failure> {
        let (requests, default_strength) = match (&request.control, self.applicable_default()) {
            (Some(units), _) => (units.clone(), f64::from(DEFAULT_STRENGTH)),
            (None, Some(d)) if request.photo.is_some() => (vec![default_unit(d)], d.strength),
            (None, _) => (Vec::new(), f64::from(DEFAULT_STRENGTH)),
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
        Ok(Guidance { units, default_strength })
    }
}

impl Guidance {
    /// The units for the engine, the photo already shaped to the output: canny units without an
    /// image of their own get the photo's edges.
    pub fn units(&self, shaped_photo: Option<&RgbImage>) -> Vec<ControlUnit> {
        self.units
            .iter()
            .filter_map(|(unit, image)| {
                let image = match (image, shaped_photo) {
                    (Some(image), _) => image.clone(),
                    (None, Some(photo)) => {
                        canny_control(photo, unit.low_threshold as f32, unit.high_threshold as f32)
                    }
                    (None, None) => return None,
                };
                Some(ControlUnit {
                    control_type: unit.control_type.clone(),
                    image,
                    scale: unit.scale as f32,
                    guidance_start: unit.guidance_start as f32,
                    guidance_end: unit.guidance_end as f32,
                })
            })
            .collect()
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
