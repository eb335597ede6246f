//! Open Images v4 object detection: MediaPipe Objectron's SSD-MobileNetV2 (23 classes, among them
//! Computer monitor, Computer mouse, Laptop, Desk, Mug, Coffee cup, Book), converted to ONNX by
//! `make models`.
//!
//! The graph holds only the network: a `[1, 300, 300, 3]` image in [-1, 1] in, raw box encodings
//! `[1, 1917, 4]` and class logits `[1, 1917, 24]` out. What MediaPipe's
//! `ObjectDetectionOidV4Subgraph` does around it is here, with its settings (read from the graph in
//! the package's wasm): the SSD anchors ([`ssd_anchors`]), box decoding, sigmoid scores over the
//! 23 classes (0 is background) kept from 0.5, and greedy suppression at IoU 0.5 over all classes.

use image::RgbImage;
use image::imageops::FilterType;
use ndarray::Array4;
use ort::session::Session;
use ort::value::TensorRef;

use super::VisionError;
use super::detector::Detection;

const INPUT: &str = "normalized_input_image_tensor";
const BOXES: &str = "raw_outputs/box_encodings";
const CLASSES: &str = "raw_outputs/class_predictions";

/// The model's input side in pixels.
pub const INPUT_SIDE: u32 = 300;

/// Box decoding: the encodings are (y, x, h, w) offsets scaled by these.
const Y_SCALE: f32 = 10.0;
const X_SCALE: f32 = 10.0;
const H_SCALE: f32 = 5.0;
const W_SCALE: f32 = 5.0;
/// Boxes overlapping a better one by more than this IoU are dropped.
const SUPPRESSION_IOU: f32 = 0.5;
/// The most detections kept.
const MAX_DETECTIONS: usize = 100;

/// MediaPipe's `SsdAnchorsCalculatorOptions` for this model.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorOptions {
    /// Input side in pixels (square).
    pub input_size: u32,
    /// Smallest and largest anchor scale, interpolated over the layers.
    pub min_scale: f32,
    /// See `min_scale`.
    pub max_scale: f32,
    /// Anchor centres sit this far into their cell.
    pub anchor_offset: f32,
    /// Feature-map stride of each layer.
    pub strides: Vec<u32>,
    /// Aspect ratios of every layer but the lowest.
    pub aspect_ratios: Vec<f32>,
    /// The lowest layer gets three boxes (scale 0.1 at 1:1, and 2:1 and 1:2) instead.
    pub reduce_boxes_in_lowest_layer: bool,
    /// A box between this layer's scale and the next one's, at this aspect ratio (0: none).
    pub interpolated_scale_aspect_ratio: f32,
}

impl AnchorOptions {
    /// The settings of MediaPipe's OIV4 detection subgraph.
    pub fn oidv4() -> AnchorOptions {
        AnchorOptions {
            input_size: INPUT_SIDE,
            min_scale: 0.2,
            max_scale: 0.95,
            anchor_offset: 0.5,
            strides: vec![16, 32, 64, 128, 256, 512],
            aspect_ratios: vec![1.0, 2.0, 0.5, 3.0, 0.3333],
            reduce_boxes_in_lowest_layer: true,
            interpolated_scale_aspect_ratio: 1.0,
        }
    }
}

/// One SSD anchor, normalised to the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anchor {
    /// Centre, from the top.
    pub y_center: f32,
    /// Centre, from the left.
    pub x_center: f32,
    /// Height.
    pub h: f32,
    /// Width.
    pub w: f32,
}

/// MediaPipe's `SsdAnchorsCalculator`: per layer, per cell (row-major), one anchor per scale and
/// aspect ratio.
pub fn ssd_anchors(options: &AnchorOptions) -> Vec<Anchor> {
    let strides = &options.strides;
    let layer_scale = |index: usize| {
        if strides.len() == 1 {
            (options.min_scale + options.max_scale) / 2.0
        } else {
            options.min_scale
                + (options.max_scale - options.min_scale) * index as f32 / (strides.len() - 1) as f32
        }
    };
    let mut anchors = Vec::new();
    let mut layer = 0;
    while layer < strides.len() {
        let mut shapes: Vec<(f32, f32)> = Vec::new();
        let mut last = layer;
        while last < strides.len() && strides[last] == strides[layer] {
            let scale = layer_scale(last);
            if last == 0 && options.reduce_boxes_in_lowest_layer {
                shapes.extend([(1.0, 0.1), (2.0, scale), (0.5, scale)]);
            } else {
                shapes.extend(options.aspect_ratios.iter().map(|&ratio| (ratio, scale)));
                if options.interpolated_scale_aspect_ratio > 0.0 {
                    let next = if last == strides.len() - 1 { 1.0 } else { layer_scale(last + 1) };
                    shapes.push((options.interpolated_scale_aspect_ratio, (scale * next).sqrt()));
                }
            }
            last += 1;
        }
        let side = options.input_size.div_ceil(strides[layer]) as usize;
        for y in 0..side {
            for x in 0..side {
                for &(ratio, scale) in &shapes {
                    anchors.push(Anchor {
                        y_center: (y as f32 + options.anchor_offset) / side as f32,
                        x_center: (x as f32 + options.anchor_offset) / side as f32,
                        h: scale / ratio.sqrt(),
                        w: scale * ratio.sqrt(),
                    });
                }
            }
        }
        layer = last;
    }
    anchors
}

/// The raw outputs of one run: per anchor, the box encoding (y, x, h, w) and the class logits.
#[derive(Debug, Clone)]
pub struct RawOutputs {
    /// `[anchors][4]`.
    pub box_encodings: Vec<[f32; 4]>,
    /// `[anchors][classes]`, class 0 the background.
    pub class_logits: Vec<Vec<f32>>,
}

/// The OIV4 detector: its session, label map and anchors.
pub struct OidDetector {
    session: Session,
    labels: Vec<String>,
    anchors: Vec<Anchor>,
}

impl OidDetector {
    /// Wraps a session and its label map (one label a line, line 0 the background), checking that
    /// they fit the anchors.
    pub fn new(session: Session, labels: Vec<String>) -> Result<OidDetector, VisionError> {
        super::expect_signature(&session, "oidv4 detector", &[INPUT], &[BOXES, CLASSES])?;
        let anchors = ssd_anchors(&AnchorOptions::oidv4());
        let mut detector = OidDetector { session, labels, anchors };
        let probe = detector.raw(&RgbImage::new(INPUT_SIDE, INPUT_SIDE))?;
        let classes = probe.class_logits.first().map_or(0, Vec::len);
        if probe.box_encodings.len() != detector.anchors.len() || classes != detector.labels.len() {
            return Err(VisionError::Model {
                model: "oidv4 detector",
                reason: format!(
                    "{} boxes of {classes} classes, but {} anchors and {} labels",
                    probe.box_encodings.len(),
                    detector.anchors.len(),
                    detector.labels.len()
                ),
            });
        }
        Ok(detector)
    }

    /// The model's raw outputs on an image of [`INPUT_SIDE`]² (other sizes are resized, bilinear).
    pub fn raw(&mut self, image: &RgbImage) -> Result<RawOutputs, VisionError> {
        let resized;
        let image = if image.dimensions() == (INPUT_SIDE, INPUT_SIDE) {
            image
        } else {
            resized = image::imageops::resize(image, INPUT_SIDE, INPUT_SIDE, FilterType::Triangle);
            &resized
        };
        let side = INPUT_SIDE as usize;
        let pixels = Array4::from_shape_fn((1, side, side, 3), |(_, y, x, c)| {
            f32::from(image.get_pixel(x as u32, y as u32)[c]) / 127.5 - 1.0
        });
        let fail = |e: ort::Error| VisionError::Inference { model: "oidv4 detector", reason: e.to_string() };
        let outputs = self
            .session
            .run(ort::inputs![INPUT => TensorRef::from_array_view(pixels.view()).map_err(fail)?])
            .map_err(fail)?;
        let (_, boxes) = outputs[BOXES].try_extract_tensor::<f32>().map_err(fail)?;
        let (shape, logits) = outputs[CLASSES].try_extract_tensor::<f32>().map_err(fail)?;
        let classes = shape.last().copied().unwrap_or(0).max(1) as usize;
        Ok(RawOutputs {
            box_encodings: boxes.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]).collect(),
            class_logits: logits.chunks_exact(classes).map(<[f32]>::to_vec).collect(),
        })
    }

    /// Objects with a score of at least `min_score`, best first, as MediaPipe decodes them.
    pub fn detect(&mut self, image: &RgbImage, min_score: f32) -> Result<Vec<Detection>, VisionError> {
        let raw = self.raw(image)?;
        Ok(decode(&raw, &self.anchors, &self.labels, min_score))
    }
}

/// MediaPipe's `TensorsToDetectionsCalculator` and `NonMaxSuppressionCalculator` with this
/// model's settings: boxes as `[x_min, y_min, x_max, y_max]`, clamped to the image.
pub fn decode(raw: &RawOutputs, anchors: &[Anchor], labels: &[String], min_score: f32) -> Vec<Detection> {
    let mut candidates: Vec<(f32, usize, [f32; 4])> = Vec::new();
    for (index, (encoding, logits)) in raw.box_encodings.iter().zip(&raw.class_logits).enumerate() {
        let Some((class, &logit)) =
            logits.iter().enumerate().skip(1).max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        else {
            continue;
        };
        let score = 1.0 / (1.0 + (-logit).exp());
        if score < min_score {
            continue;
        }
        let anchor = anchors[index];
        let y_center = encoding[0] / Y_SCALE * anchor.h + anchor.y_center;
        let x_center = encoding[1] / X_SCALE * anchor.w + anchor.x_center;
        let h = (encoding[2] / H_SCALE).exp() * anchor.h;
        let w = (encoding[3] / W_SCALE).exp() * anchor.w;
        let bbox = [x_center - w / 2.0, y_center - h / 2.0, x_center + w / 2.0, y_center + h / 2.0];
        candidates.push((score, class, bbox));
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut kept: Vec<(f32, usize, [f32; 4])> = Vec::new();
    for candidate in candidates {
        if kept.iter().all(|k| iou(&k.2, &candidate.2) <= SUPPRESSION_IOU) {
            kept.push(candidate);
        }
        if kept.len() == MAX_DETECTIONS {
            break;
        }
    }
    kept.into_iter()
        .filter_map(|(score, class, bbox)| {
            let label = labels.get(class)?.clone();
            let bbox = bbox.map(|v| v.clamp(0.0, 1.0));
            Some(Detection { label, score, bbox, source: super::items::OIDV4.to_string(), item: None })
        })
        .collect()
}

/// Intersection over union of two `[x_min, y_min, x_max, y_max]` boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// The label map: one label a line, trailing empty lines dropped.
pub fn read_labels(path: &std::path::Path) -> Result<Vec<String>, VisionError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VisionError::Labels { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    while labels.last().is_some_and(String::is_empty) {
        labels.pop();
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_anchors_are_mediapipes_for_a_300_pixel_ssd() {
        let anchors = ssd_anchors(&AnchorOptions::oidv4());
        // 19² cells × 3 in the lowest layer, then 10², 5², 3², 2², 1² cells × 6.
        assert_eq!(anchors.len(), 19 * 19 * 3 + (100 + 25 + 9 + 4 + 1) * 6);
        let first = anchors[0];
        assert!((first.y_center - 0.5 / 19.0).abs() < 1e-6 && (first.h - 0.1).abs() < 1e-6);
        let wide = anchors[1];
        assert!((wide.w / wide.h - 2.0).abs() < 1e-5, "{wide:?}");
        let last = anchors[anchors.len() - 1];
        // The top layer's interpolated box: sqrt(0.95 × 1.0) at 1:1, centred.
        assert!((last.x_center - 0.5).abs() < 1e-6 && (last.w - 0.95f32.sqrt()).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn suppression_keeps_the_better_of_overlapping_boxes_whatever_their_class() {
        let anchors = vec![Anchor { y_center: 0.5, x_center: 0.5, h: 0.4, w: 0.4 }; 3];
        let labels: Vec<String> = ["???", "Mug", "Coffee cup"].map(String::from).to_vec();
        let raw = RawOutputs {
            box_encodings: vec![[0.0; 4], [0.1, 0.1, 0.0, 0.0], [0.0; 4]],
            class_logits: vec![vec![0.0, 2.0, 0.0], vec![0.0, 0.0, 3.0], vec![0.0, -5.0, -5.0]],
        };
        let found = decode(&raw, &anchors, &labels, 0.5);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].label, "Coffee cup");
        assert!((found[0].score - 1.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-6);
    }
}
