//! ImageNet-1k classification with EfficientNet-Lite3 (uint8 quantised TFLite, converted to ONNX).
//!
//! The graph takes a uint8 `[1, 280, 280, 3]` image and returns a uint8 softmax `[1, 1000]` whose
//! quantisation scale is 1/256, so `value / 256` is the probability.

use std::path::Path;

use image::RgbImage;
use image::imageops::FilterType;
use ndarray::ArrayView4;
use ort::session::Session;
use ort::value::TensorRef;

use super::VisionError;

const INPUT: &str = "images";
const OUTPUT: &str = "Softmax";
/// The side of the square the network was trained on.
const SIDE: u32 = 280;
const CLASSES: usize = 1000;

/// One ImageNet class and its probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassScore {
    /// The ImageNet label with its synonyms, e.g. `notebook, notebook computer`.
    pub label: String,
    /// Softmax probability in `[0, 1]`.
    pub probability: f32,
}

impl ClassScore {
    /// The label's first synonym, e.g. `notebook` for `notebook, notebook computer`.
    pub fn name(&self) -> &str {
        self.label.split(',').next().unwrap_or_default().trim()
    }
}

/// EfficientNet-Lite3 with its 1000 labels.
pub struct Classifier {
    session: Session,
    labels: Vec<String>,
}

/// Reads a label file: one label a line, in class order.
pub fn read_labels(path: &Path) -> Result<Vec<String>, VisionError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VisionError::Labels { path: path.to_path_buf(), reason: e.to_string() })?;
    let labels: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if labels.len() != CLASSES {
        return Err(VisionError::Labels {
            path: path.to_path_buf(),
            reason: format!("{} labels, the classifier has {CLASSES} classes", labels.len()),
        });
    }
    Ok(labels)
}

impl Classifier {
    /// Wraps a session and its labels, checking the session's inputs and outputs.
    pub fn new(session: Session, labels: Vec<String>) -> Result<Classifier, VisionError> {
        super::expect_signature(&session, "classifier", &[INPUT], &[OUTPUT])?;
        Ok(Classifier { session, labels })
    }

    /// Every class with its probability, most probable first.
    pub fn classify(&mut self, image: &RgbImage) -> Result<Vec<ClassScore>, VisionError> {
        // The whole photo is squeezed into the square rather than centre-cropped: a desk's
        // evidence is often at the edges (a monitor, a lamp).
        let square = image::imageops::resize(image, SIDE, SIDE, FilterType::Triangle);
        let shape = (1, SIDE as usize, SIDE as usize, 3);
        let pixels =
            ArrayView4::from_shape(shape, square.as_raw()).expect("the image was resized to SIDE x SIDE");

        let fail = |e: ort::Error| VisionError::Inference { model: "classifier", reason: e.to_string() };
        let outputs = self
            .session
            .run(ort::inputs![INPUT => TensorRef::from_array_view(pixels).map_err(fail)?])
            .map_err(fail)?;
        let (_, quantised) = outputs[OUTPUT].try_extract_tensor::<u8>().map_err(fail)?;
        if quantised.len() != self.labels.len() {
            return Err(VisionError::Model {
                model: "classifier",
                reason: format!("{} scores for {} labels", quantised.len(), self.labels.len()),
            });
        }
        let mut scores: Vec<ClassScore> = quantised
            .iter()
            .zip(&self.labels)
            .map(|(&q, label)| ClassScore { label: label.clone(), probability: f32::from(q) / 256.0 })
            .collect();
        scores.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        Ok(scores)
    }
}
