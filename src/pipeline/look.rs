//! The look stage: what the vision models see in the photo (desk or not, items, the text on it,
//! a caption).

use std::collections::BTreeMap;
use std::time::Instant;

use image::RgbImage;

use super::plan::{Brand, PipelineSettings, and_list};
use super::{RunContext, record_ms};
use crate::core::{BoundingBox, DetectedItem, DetectedText, Failure, FailureCode};
use crate::inference::ModelOwner;
use crate::inference::vision::{Reading, SceneAnalysis, TextLine, Vision, VisionError};

/// The photo and what the vision models made of it.
pub struct Seen {
    /// The decoded photo.
    pub photo: RgbImage,
    /// Desk score, detections and desk items.
    pub scene: SceneAnalysis,
    /// The lines of text read in it, in reading order.
    pub text: Vec<TextLine>,
    /// A sentence describing the photo.
    pub caption: String,
    /// What went wrong without failing the task (reading the text).
    pub warnings: Vec<String>,
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

    /// The lines read, in the result's shape, each with the brand it names.
    pub fn detected_text(&self, settings: &PipelineSettings) -> Vec<DetectedText> {
        self.text
            .iter()
            .map(|line| {
                let [x_min, y_min, x_max, y_max] = self.normalised(line);
                DetectedText {
                    text: line.text.clone(),
                    score: line.score,
                    bbox: BoundingBox { x_min, y_min, x_max, y_max },
                    brand: settings.brand_in(&line.text).map(|b| b.name.clone()),
                }
            })
            .collect()
    }

    /// The brands the text names, each once, in reading order, with the item each is printed on
    /// (the smallest detected item around the line's centre), if any.
    pub fn brands<'s>(&self, settings: &'s PipelineSettings) -> Vec<(&'s Brand, Option<String>)> {
        let mut brands: Vec<(&Brand, Option<String>)> = Vec::new();
        for line in &self.text {
            let Some(brand) = settings.brand_in(&line.text) else { continue };
            if brands.iter().any(|(b, _)| b.id == brand.id) {
                continue;
            }
            let [x0, y0, x1, y1] = self.normalised(line);
            let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
            let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
            let under = self
                .scene
                .detections
                .iter()
                .filter(|d| d.item.is_some())
                .filter(|d| d.bbox[0] <= cx && cx <= d.bbox[2] && d.bbox[1] <= cy && cy <= d.bbox[3])
                .min_by(|a, b| area(&a.bbox).total_cmp(&area(&b.bbox)));
            brands.push((brand, under.and_then(|d| d.item.clone())));
        }
        brands
    }

    /// The caption, naming the brands the text shows: "…, with a Logitech keyboard and the Dell logo".
    pub fn caption_with_brands(&self, settings: &PipelineSettings) -> String {
        let parts: Vec<String> = self
            .brands(settings)
            .into_iter()
            .map(|(brand, item)| match item {
                Some(item) => format!("a {} {item}", brand.name),
                None => format!("the {} logo", brand.name),
            })
            .collect();
        if parts.is_empty() {
            return self.caption.clone();
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        format!("{}, with {}", self.caption, and_list(&parts))
    }

    fn normalised(&self, line: &TextLine) -> [f32; 4] {
        let (w, h) = (self.photo.width() as f32, self.photo.height() as f32);
        let [x0, y0, x1, y1] = line.bounds();
        [x0 / w, y0 / h, x1 / w, y1 / h]
    }
}

/// Runs the detectors and classifier ("vision"), reads the text ("ocr", when it is on), then
/// captions ("caption").
pub async fn look_at(
    vision: &ModelOwner<Vision>,
    photo: RgbImage,
    ctx: &RunContext,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Seen, Failure> {
    let gone = |e: crate::inference::NoAnswer| Failure::new(FailureCode::Internal, e.to_string());
    ctx.progress("vision", 0, 3);
    let started = Instant::now();
    let (photo, scene) = vision
        .run(move |models| {
            let scene = models.analyze(&photo);
            (photo, scene)
        })
        .await
        .map_err(gone)?;
    let scene =
        scene.map_err(|e| Failure::new(FailureCode::ModelError, format!("Vision models failed: {e}")))?;
    record_ms(timings, "vision", started);
    ctx.check()?;
    ctx.progress("ocr", 1, 3);
    let started = Instant::now();
    let (photo, reading) = vision
        .run(move |models| {
            let reading = models.read_text(&photo);
            (photo, reading)
        })
        .await
        .map_err(gone)?;
    if reading.is_some() {
        record_ms(timings, "ocr", started);
    }
    let (text, warnings) = read_out(reading);
    ctx.check()?;
    ctx.progress("caption", 2, 3);
    let started = Instant::now();
    let (photo, scene, caption) = vision
        .run(move |models| {
            let caption = models.caption(&photo, &scene);
            (photo, scene, caption)
        })
        .await
        .map_err(gone)?;
    let caption =
        caption.map_err(|e| Failure::new(FailureCode::ModelError, format!("Captioning failed: {e}")))?;
    record_ms(timings, "caption", started);
    Ok(Seen { photo, scene, text, caption, warnings })
}

/// The lines read, and a warning when reading failed or ran out of time: the task goes on.
fn read_out(reading: Option<Result<Reading, VisionError>>) -> (Vec<TextLine>, Vec<String>) {
    match reading {
        None => (Vec::new(), Vec::new()),
        Some(Ok(reading)) if reading.unread > 0 => {
            let warning = format!(
                "Reading the photo's text ran out of time: {} of the lines found were not read.",
                reading.unread
            );
            (reading.lines, vec![warning])
        }
        Some(Ok(reading)) => (reading.lines, Vec::new()),
        Some(Err(e)) => (Vec::new(), vec![format!("The photo's text could not be read: {e}")]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_that_fails_or_runs_late_is_a_warning() {
        let line = TextLine { text: "Dell".into(), score: 0.9, corners: [[0.0, 0.0]; 4] };
        let late = Reading { lines: vec![line.clone()], unread: 2 };
        let (lines, warnings) = read_out(Some(Ok(late)));
        assert_eq!(lines, [line]);
        assert!(warnings[0].contains("2 of the lines found were not read"), "{warnings:?}");
        let failed = VisionError::Inference { model: "ocr detector", reason: "out of memory".into() };
        let (lines, warnings) = read_out(Some(Err(failed)));
        assert!(lines.is_empty());
        assert!(warnings[0].starts_with("The photo's text could not be read: ocr detector"), "{warnings:?}");
        assert_eq!(read_out(None), (Vec::new(), Vec::new()), "reading is off");
    }
}
