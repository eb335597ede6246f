//! The look stage: what the vision models see in the photo (desk or not, items, a caption).

use std::collections::BTreeMap;
use std::time::Instant;

use image::RgbImage;

use super::{RunContext, record_ms};
use crate::core::{BoundingBox, DetectedItem, Failure, FailureCode};
use crate::inference::ModelOwner;
use crate::inference::vision::{SceneAnalysis, Vision};

/// The photo and what the vision models made of it.
pub struct Seen {
    /// The decoded photo.
    pub photo: RgbImage,
    /// Desk score, detections and desk items.
    pub scene: SceneAnalysis,
    /// A sentence describing the photo.
    pub caption: String,
}

impl Seen {
    /// The detections in the result's shape.
    pub fn detected_items(&self) -> Vec<DetectedItem> {
        self.scene
            .detections
            .iter()
            .map(|d| DetectedItem {
                label: d.label.clone(),
                score: d.score,
                bbox: BoundingBox { x_min: d.bbox[0], y_min: d.bbox[1], x_max: d.bbox[2], y_max: d.bbox[3] },
                item: d.item.clone(),
                source: d.source.clone(),
            })
            .collect()
    }
}

/// Runs the detector and classifier ("vision"), then the captioner ("caption").
pub async fn look_at(
    vision: &ModelOwner<Vision>,
    photo: RgbImage,
    ctx: &RunContext,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Seen, Failure> {
    ctx.progress("vision", 0, 2);
    let started = Instant::now();
    let (photo, scene) = vision
        .run(move |models| {
            let scene = models.analyze(&photo);
            (photo, scene)
        })
        .await
        .map_err(|e| Failure::new(FailureCode::Internal, e.to_string()))?;
    let scene =
        scene.map_err(|e| Failure::new(FailureCode::ModelError, format!("Vision models failed: {e}")))?;
    record_ms(timings, "vision", started);
    ctx.check()?;
    ctx.progress("caption", 1, 2);
    let started = Instant::now();
    let (photo, scene, caption) = vision
        .run(move |models| {
            let caption = models.caption(&photo, &scene);
            (photo, scene, caption)
        })
        .await
        .map_err(|e| Failure::new(FailureCode::Internal, e.to_string()))?;
    let caption =
        caption.map_err(|e| Failure::new(FailureCode::ModelError, format!("Captioning failed: {e}")))?;
    record_ms(timings, "caption", started);
    Ok(Seen { photo, scene, caption })
}
