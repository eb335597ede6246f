//! Reading the text in a photo: PaddleOCR's PP-OCRv4 models as `rapidocr-onnxruntime` ships and
//! runs them (its pipeline is the reference, onnx/ocr_reference.py).
//!
//! 1. **Detection**: the photo (at most [`OcrConfig::max_side`] a side, the short side scaled up
//!    to 736, both to multiples of 32, BGR in [-1, 1]) gives a text-probability map; [`db`] turns
//!    it into boxes of lines, read top to bottom, left to right.
//! 2. **Orientation**: each line is cut out straight ([`geometry::warp_quad`]), turned upright if
//!    it is taller than wide, and turned half round when the classifier is sure it is upside down.
//! 3. **Recognition**: lines in batches of six, 48 px high, padded to the batch's widest; the
//!    per-column character probabilities are CTC-decoded (repeats merged, blanks dropped), the
//!    score the mean probability of the kept characters.
//!
//! The recognition model reads the 6,623 characters of its dictionary (Chinese, Latin letters,
//! digits, punctuation): brands and model names printed in Latin script, not Hangul.

mod db;
pub mod geometry;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::Array4;
use ort::session::Session;
use ort::value::TensorRef;

use super::{ModelFile, VisionError};
pub use db::DbSettings;
use geometry::{Point, distance, order_corners, resize_linear, rotate_left, warp_quad};

/// The detection model's id, as `/info` names it.
pub const DETECTOR_ID: &str = "pp-ocrv4-det";
/// The orientation classifier's id.
pub const CLASSIFIER_ID: &str = "ppocr-mobile-v2-cls";
/// The recognition model's id.
pub const RECOGNIZER_ID: &str = "pp-ocrv4-rec";

/// The short side the detector sees at least (rapidocr's `limit_side_len`, type "min").
const DETECTION_MIN_SIDE: f32 = 736.0;
/// Images with a side below this are scaled up first.
const MIN_SIDE: f32 = 30.0;
/// Images this low, or wider than [`MAX_ASPECT`] times their height, are padded top and bottom.
const MIN_HEIGHT: f32 = 30.0;
/// See [`MIN_HEIGHT`].
const MAX_ASPECT: f32 = 8.0;
/// The classifier's input: 48 px high, at most 192 wide.
const CLS_SHAPE: (u32, u32) = (48, 192);
/// The recogniser's input height, and its narrowest batch width.
const REC_SHAPE: (u32, u32) = (48, 320);
/// Lines per classifier and recogniser run.
const BATCH: usize = 6;
/// The classifier turns a line round when it says "180" with more than this.
const UPSIDE_DOWN_SCORE: f32 = 0.9;

/// Text reading settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OcrConfig {
    /// Text detection model (PP-OCRv4 DB).
    pub detector: PathBuf,
    /// Text orientation classifier.
    pub classifier: PathBuf,
    /// Text recognition model (PP-OCRv4, its characters in the metadata key `character`).
    pub recognizer: PathBuf,
    /// The detector's post-processing.
    pub db: DbSettings,
    /// Lines read with a lower mean character probability are dropped.
    pub min_score: f32,
    /// Photos larger than this a side are scaled down first (rapidocr's `max_side_len`).
    pub max_side: u32,
    /// Reading stops after this long; what was read by then is kept.
    pub timeout: Duration,
}

impl Default for OcrConfig {
    fn default() -> Self {
        OcrConfig {
            detector: PathBuf::from("assets/models/ocr_det.onnx"),
            classifier: PathBuf::from("assets/models/ocr_cls.onnx"),
            recognizer: PathBuf::from("assets/models/ocr_rec.onnx"),
            db: DbSettings::default(),
            min_score: 0.5,
            max_side: 2000,
            timeout: Duration::from_secs(10),
        }
    }
}

impl OcrConfig {
    /// Whether all three model files are there.
    pub fn files_present(&self) -> bool {
        [&self.detector, &self.classifier, &self.recognizer].iter().all(|p| p.is_file())
    }
}

/// One line of text read from the photo.
#[derive(Debug, Clone, PartialEq)]
pub struct TextLine {
    /// What it says.
    pub text: String,
    /// Mean probability of its characters, 0..1.
    pub score: f32,
    /// Its box in the photo's pixels: top-left, top-right, bottom-right, bottom-left.
    pub corners: [Point; 4],
}

impl TextLine {
    /// The upright box around the corners, `[x_min, y_min, x_max, y_max]` in pixels.
    pub fn bounds(&self) -> [f32; 4] {
        let xs = self.corners.map(|p| p[0]);
        let ys = self.corners.map(|p| p[1]);
        let min = |v: [f32; 4]| v.into_iter().fold(f32::MAX, f32::min);
        let max = |v: [f32; 4]| v.into_iter().fold(f32::MIN, f32::max);
        [min(xs), min(ys), max(xs), max(ys)]
    }
}

/// What reading a photo gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// The lines read, top to bottom, left to right.
    pub lines: Vec<TextLine>,
    /// Set when the time ran out: the lines found that were not read.
    pub unread: usize,
}

/// The three OCR models, loaded.
pub struct Ocr {
    detector: Session,
    classifier: Session,
    recognizer: Session,
    characters: Vec<String>,
    config: OcrConfig,
    models: Vec<ModelFile>,
}

/// Runs `session` (the `model`) on `input`: its first output's shape and values.
fn run(
    session: &mut Session,
    model: &'static str,
    input: &Array4<f32>,
) -> Result<(Vec<usize>, Vec<f32>), VisionError> {
    let fail = |e: ort::Error| VisionError::Inference { model, reason: e.to_string() };
    let outputs =
        session.run(ort::inputs![TensorRef::from_array_view(input.view()).map_err(fail)?]).map_err(fail)?;
    let (shape, values) = outputs[0].try_extract_tensor::<f32>().map_err(fail)?;
    Ok((shape.iter().map(|&d| d as usize).collect(), values.to_vec()))
}

impl Ocr {
    /// Loads the three models, reading the recogniser's characters from its metadata.
    pub fn load(runtime: &crate::inference::Runtime, config: &OcrConfig) -> Result<Ocr, VisionError> {
        let mut models = Vec::new();
        let detector = super::open(runtime, DETECTOR_ID, "ocr detector", &config.detector, &mut models)?;
        let classifier =
            super::open(runtime, CLASSIFIER_ID, "ocr classifier", &config.classifier, &mut models)?;
        let recognizer =
            super::open(runtime, RECOGNIZER_ID, "ocr recognizer", &config.recognizer, &mut models)?;
        let model = |reason: String| VisionError::Model { model: "ocr recognizer", reason };
        let listed = recognizer
            .metadata()
            .map_err(|e| model(e.to_string()))?
            .custom("character")
            .ok_or_else(|| model("no `character` key in its metadata".into()))?;
        // CTC's blank is class 0, and the space the class after the dictionary.
        let characters: Vec<String> = std::iter::once(String::new())
            .chain(listed.lines().map(str::to_string))
            .chain(std::iter::once(" ".to_string()))
            .collect();
        Ok(Ocr { detector, classifier, recognizer, characters, config: config.clone(), models })
    }

    /// The loaded model files, for `/info`.
    pub fn models(&self) -> &[ModelFile] {
        &self.models
    }

    /// Finds and reads the lines of text in `image`.
    pub fn read(&mut self, image: &RgbImage) -> Result<Reading, VisionError> {
        let started = Instant::now();
        let (raw_w, raw_h) = (image.width() as f32, image.height() as f32);
        let (scaled, ratio) = self.fit(image);
        let (padded, top) = letterbox(scaled);
        let boxes = self.detect(&padded)?;
        let mut crops: Vec<RgbImage> = boxes.iter().map(|corners| crop(&padded, *corners)).collect();
        let mut reading = Reading::default();
        let mut results: Vec<Option<(String, f32)>> = vec![None; crops.len()];
        if started.elapsed() < self.config.timeout {
            self.turn_upright(&mut crops)?;
            let order = by_aspect(&crops);
            for batch in order.chunks(BATCH) {
                if started.elapsed() >= self.config.timeout {
                    break;
                }
                let images: Vec<&RgbImage> = batch.iter().map(|&i| &crops[i]).collect();
                for (&i, read) in batch.iter().zip(self.recognize(&images)?) {
                    results[i] = Some(read);
                }
            }
        }
        for (corners, result) in boxes.into_iter().zip(results) {
            let Some((text, score)) = result else {
                reading.unread += 1;
                continue;
            };
            if score < self.config.min_score {
                continue;
            }
            let back = |p: Point| {
                [(p[0] * ratio.0).clamp(0.0, raw_w), ((p[1] - top as f32) * ratio.1).clamp(0.0, raw_h)]
            };
            reading.lines.push(TextLine { text, score, corners: corners.map(back) });
        }
        Ok(reading)
    }

    /// rapidocr's first resize: down to `max_side`, or up to [`MIN_SIDE`], to multiples of 32;
    /// with the ratios that take its coordinates back to the photo's.
    fn fit(&self, image: &RgbImage) -> (RgbImage, (f32, f32)) {
        let (w, h) = (image.width() as f32, image.height() as f32);
        let max_side = self.config.max_side as f32;
        let ratio = if w.max(h) > max_side {
            max_side / w.max(h)
        } else if w.min(h) < MIN_SIDE {
            MIN_SIDE / w.min(h)
        } else {
            return (image.clone(), (1.0, 1.0));
        };
        let (nw, nh) = (multiple_of_32(w * ratio), multiple_of_32(h * ratio));
        (resize_linear(image, nw, nh), (w / nw as f32, h / nh as f32))
    }

    /// Text boxes in `image`'s pixels, in reading order.
    fn detect(&mut self, image: &RgbImage) -> Result<Vec<[Point; 4]>, VisionError> {
        let (w, h) = (image.width() as f32, image.height() as f32);
        let ratio = if w.min(h) < DETECTION_MIN_SIDE { DETECTION_MIN_SIDE / w.min(h) } else { 1.0 };
        let (nw, nh) = (multiple_of_32(w * ratio), multiple_of_32(h * ratio));
        let input = bgr_tensor(&[&resize_linear(image, nw, nh)], nw);
        let (shape, map) = run(&mut self.detector, "ocr detector", &input)?;
        let (mh, mw) = (shape[2], shape[3]);
        let found = db::boxes(&map[..mh * mw], mw, mh, image.dimensions(), &self.config.db);
        let (iw, ih) = (image.width() as f32, image.height() as f32);
        let mut boxes: Vec<[Point; 4]> = found
            .into_iter()
            .map(|(corners, _)| {
                order_corners(corners)
                    .map(|p| [p[0].clamp(0.0, iw - 1.0).trunc(), p[1].clamp(0.0, ih - 1.0).trunc()])
            })
            .filter(|c| distance(c[0], c[1]) as u32 > 3 && distance(c[0], c[3]) as u32 > 3)
            .collect();
        reading_order(&mut boxes);
        Ok(boxes)
    }

    /// Turns each line the classifier is sure is upside down half round.
    fn turn_upright(&mut self, crops: &mut [RgbImage]) -> Result<(), VisionError> {
        let order = by_aspect(crops);
        for batch in order.chunks(BATCH) {
            let (height, max_width) = CLS_SHAPE;
            let resized: Vec<RgbImage> = batch
                .iter()
                .map(|&i| {
                    let c = &crops[i];
                    let w =
                        ((height as f64 * c.width() as f64 / c.height() as f64).ceil() as u32).min(max_width);
                    resize_linear(c, w.max(1), height)
                })
                .collect();
            let input = bgr_tensor(&resized.iter().collect::<Vec<_>>(), max_width);
            let (_, probs) = run(&mut self.classifier, "ocr classifier", &input)?;
            for (k, &i) in batch.iter().enumerate() {
                let (upright, flipped) = (probs[2 * k], probs[2 * k + 1]);
                if flipped > upright && flipped > UPSIDE_DOWN_SCORE {
                    image::imageops::rotate180_in_place(&mut crops[i]);
                }
            }
        }
        Ok(())
    }

    /// Reads one batch of upright lines: text and score each.
    fn recognize(&mut self, crops: &[&RgbImage]) -> Result<Vec<(String, f32)>, VisionError> {
        let (height, min_width) = REC_SHAPE;
        let aspect = |c: &RgbImage| c.width() as f64 / c.height() as f64;
        let widest = crops.iter().map(|c| aspect(c)).fold(min_width as f64 / height as f64, f64::max);
        let batch_width = (height as f64 * widest) as u32;
        let resized: Vec<RgbImage> = crops
            .iter()
            .map(|c| {
                let w = ((height as f64 * aspect(c)).ceil() as u32).min(batch_width);
                resize_linear(c, w.max(1), height)
            })
            .collect();
        let input = bgr_tensor(&resized.iter().collect::<Vec<_>>(), batch_width);
        let (shape, probs) = run(&mut self.recognizer, "ocr recognizer", &input)?;
        let (steps, classes) = (shape[1], shape[2]);
        if classes != self.characters.len() {
            return Err(VisionError::Model {
                model: "ocr recognizer",
                reason: format!(
                    "{classes} classes, but its metadata lists {} characters",
                    self.characters.len() - 2
                ),
            });
        }
        Ok((0..crops.len())
            .map(|k| {
                ctc_decode(&probs[k * steps * classes..(k + 1) * steps * classes], classes, &self.characters)
            })
            .collect())
    }
}

/// Greedy CTC decoding of `[steps][classes]` probabilities: the best class per step, repeats
/// merged, blanks (class 0) dropped; the score is the mean probability of the kept steps (0 when
/// none is kept).
fn ctc_decode(probs: &[f32], classes: usize, characters: &[String]) -> (String, f32) {
    let (mut text, mut sum, mut kept, mut previous) = (String::new(), 0.0f64, 0usize, usize::MAX);
    for step in probs.chunks_exact(classes) {
        let (best, p) =
            step.iter().enumerate().fold((0, f32::MIN), |b, (i, &p)| if p > b.1 { (i, p) } else { b });
        if best != 0 && best != previous {
            text.push_str(&characters[best]);
            sum += f64::from(p);
            kept += 1;
        }
        previous = best;
    }
    (text, if kept == 0 { 0.0 } else { (sum / kept as f64) as f32 })
}

/// Python's `int(round(int(v) / 32) * 32)`: to the nearest multiple of 32, halves to even, at least 32.
fn multiple_of_32(v: f32) -> u32 {
    (((v as u32) as f32 / 32.0).round_ties_even() as u32 * 32).max(32)
}

/// rapidocr's letterbox: an image at most [`MIN_HEIGHT`] high, or wider than [`MAX_ASPECT`] times
/// its height, gets black bands above and below; returns the image and the band's height.
fn letterbox(image: RgbImage) -> (RgbImage, u32) {
    let (w, h) = (image.width() as f32, image.height() as f32);
    if h > MIN_HEIGHT && w / h <= MAX_ASPECT {
        return (image, 0);
    }
    let new_h = ((w / MAX_ASPECT) as u32).max(MIN_HEIGHT as u32) * 2;
    let band = new_h.abs_diff(image.height()) / 2;
    let mut padded = RgbImage::new(image.width(), image.height() + 2 * band);
    image::imageops::replace(&mut padded, &image, 0, i64::from(band));
    (padded, band)
}

/// The line inside `corners`, cut out straight; stood up when it is much taller than wide.
fn crop(image: &RgbImage, corners: [Point; 4]) -> RgbImage {
    let [a, b, c, d] = corners;
    let width = distance(a, b).max(distance(c, d)) as u32;
    let height = distance(a, d).max(distance(b, c)) as u32;
    let line = warp_quad(image, corners, width.max(1), height.max(1));
    if line.height() as f32 / line.width() as f32 >= 1.5 { rotate_left(&line) } else { line }
}

/// Indices of `crops` from the narrowest (width over height) to the widest.
fn by_aspect(crops: &[RgbImage]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..crops.len()).collect();
    let aspect = |c: &RgbImage| c.width() as f64 / c.height() as f64;
    order.sort_by(|&a, &b| aspect(&crops[a]).total_cmp(&aspect(&crops[b])));
    order
}

/// rapidocr's `sorted_boxes`: by the top-left corner's y then x, then a box less than 10 px below
/// its predecessor and left of it moves before it.
fn reading_order(boxes: &mut [[Point; 4]]) {
    boxes.sort_by(|a, b| a[0][1].total_cmp(&b[0][1]).then(a[0][0].total_cmp(&b[0][0])));
    for i in 0..boxes.len().saturating_sub(1) {
        for j in (0..=i).rev() {
            if (boxes[j + 1][0][1] - boxes[j][0][1]).abs() < 10.0 && boxes[j + 1][0][0] < boxes[j][0][0] {
                boxes.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
}

/// The images as one `[n, 3, h, width]` batch, BGR, scaled to [-1, 1], zero (grey) right of
/// each image.
fn bgr_tensor(images: &[&RgbImage], width: u32) -> Array4<f32> {
    let (height, width) = (images.first().map_or(1, |i| i.height()) as usize, width as usize);
    let plane = height * width;
    let mut values = vec![0f32; images.len() * 3 * plane];
    for (n, image) in images.iter().enumerate() {
        let own = image.width() as usize;
        for (y, row) in image.as_raw().chunks_exact(own * 3).enumerate() {
            for (x, pixel) in row.chunks_exact(3).enumerate() {
                let at = n * 3 * plane + y * width + x;
                for c in 0..3 {
                    values[at + c * plane] = f32::from(pixel[2 - c]) / 127.5 - 1.0;
                }
            }
        }
    }
    Array4::from_shape_vec((images.len(), 3, height, width), values).expect("n × 3 × h × w values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        let characters: Vec<String> = ["", "a", "b", " "].iter().map(|s| s.to_string()).collect();
        // Steps: a a blank a b b blank.
        let best = [1, 1, 0, 1, 2, 2, 0];
        let probs: Vec<f32> =
            best.iter().flat_map(|&b| (0..4).map(move |c| if c == b { 0.8 } else { 0.2 / 3.0 })).collect();
        let (text, score) = ctc_decode(&probs, 4, &characters);
        assert_eq!(text, "aab");
        assert!((score - 0.8).abs() < 1e-6);
        assert_eq!(ctc_decode(&[0.9, 0.1, 0.0, 0.0], 4, &characters), (String::new(), 0.0));
    }

    #[test]
    fn boxes_are_read_in_lines_left_to_right() {
        let at = |x: f32, y: f32| [[x, y], [x + 5.0, y], [x + 5.0, y + 5.0], [x, y + 5.0]];
        let mut boxes = vec![at(50.0, 4.0), at(0.0, 40.0), at(10.0, 0.0), at(5.0, 8.0)];
        reading_order(&mut boxes);
        let firsts: Vec<Point> = boxes.iter().map(|b| b[0]).collect();
        assert_eq!(firsts, [[5.0, 8.0], [10.0, 0.0], [50.0, 4.0], [0.0, 40.0]]);
    }

    #[test]
    fn sizes_round_to_multiples_of_32_as_python_does() {
        assert_eq!(multiple_of_32(981.33), 992);
        assert_eq!(multiple_of_32(736.0), 736);
        assert_eq!(multiple_of_32(48.0), 64, "1.5 rounds to 2");
        assert_eq!(multiple_of_32(80.0), 64, "2.5 rounds to 2");
        assert_eq!(multiple_of_32(3.0), 32);
    }

    #[test]
    fn a_wide_strip_is_letterboxed() {
        let (padded, band) = letterbox(RgbImage::new(400, 20));
        assert_eq!((padded.height(), band), (20 + 2 * 40, 40));
        let (same, band) = letterbox(RgbImage::new(300, 100));
        assert_eq!((same.height(), band), (100, 0));
    }
}
