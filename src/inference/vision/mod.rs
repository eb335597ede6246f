//! Vision: is the photo a desk, what is on it, and a caption for the prompt.
//!
//! Two real models do the looking: SSD-MobileNet-v2 COCO finds objects ([`detector`]) and
//! EfficientNet-Lite3 names the scene among ImageNet's classes ([`classifier`]); [`desk`]
//! combines both into the desk decision. An optional ONNX captioner ([`captioner`]) describes the
//! photo; without one the caption is composed from what was found. All of it is blocking code:
//! running a model takes `&mut` access, and the service gives each loaded model set one owner
//! thread ([`crate::inference::ModelOwner`]).

mod canny;
pub mod captioner;
pub mod classifier;
pub mod desk;
pub mod detector;
mod hed;
pub mod image;
pub mod items;
pub mod ocr;
pub mod oid;

use std::path::{Path, PathBuf};

use ::image::RgbImage;
use ort::session::Session;

use crate::inference::{Runtime, RuntimeError};

pub use canny::{canny, canny_control};
pub use captioner::{CaptionError, Captioner, GenerationOptions};
pub use classifier::{ClassScore, Classifier};
pub use desk::{SceneAnalysis, compose_caption};
pub use detector::{Detection, Detector};
pub use hed::{DEFAULT_HED_MODEL, Hed};
pub use image::{Header, ImageError, Upright, decode_image, decode_upright, probe_header};
pub use items::ItemTable;
pub use ocr::{Ocr, OcrConfig, Reading, TextLine};
pub use oid::OidDetector;

/// How many ImageNet classes a [`SceneAnalysis`] reports.
const TOP_CLASSES: usize = 5;

/// Errors while loading or running the vision models.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// ONNX Runtime could not build a session.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A model file is not where the configuration says.
    #[error("{what} not found at {path}: build the vision models with `make models` (onnx/make_models.sh)")]
    MissingModel {
        /// Which model, e.g. `detector`.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
    },
    /// The classifier's label file is missing or does not fit the model.
    #[error("cannot read labels from {path}: {reason}")]
    Labels {
        /// The configured path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A model's inputs, outputs or output shapes are not the ones this code was written for.
    #[error("the {model} model does not fit: {reason}")]
    Model {
        /// Which model.
        model: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// ONNX Runtime failed while running a model.
    #[error("{model} inference failed: {reason}")]
    Inference {
        /// Which model.
        model: &'static str,
        /// ONNX Runtime's message.
        reason: String,
    },
    /// The captioner failed to load or to generate.
    #[error(transparent)]
    Caption(#[from] CaptionError),
}

/// Vision settings: model paths and the thresholds of the desk decision.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    /// COCO object detector (SSD-MobileNet-v2 ONNX), built by `make models`.
    pub detector: PathBuf,
    /// Open Images v4 object detector (MediaPipe's SSD-MobileNetV2 as ONNX), built by `make models`.
    pub oid_detector: PathBuf,
    /// Its label map, one a line (line 0 the background).
    pub oid_labels: PathBuf,
    /// Open Images detections scoring below this (0..1) are ignored (MediaPipe's threshold: 0.5).
    pub min_oid_score: f32,
    /// Besides the whole photo, both detectors look at a grid of this many overlapping tiles a
    /// side (0 or 1: the whole photo only), for the small things on a desk.
    pub detector_tiles: u32,
    /// What each model's class names mean as items (`[items]` of the pipeline settings).
    pub items: ItemTable,
    /// ImageNet scene classifier (EfficientNet-Lite3 ONNX), built by `make models`.
    pub classifier: PathBuf,
    /// The classifier's labels, one a line.
    pub classifier_labels: PathBuf,
    /// Captioner directory in the optimum ONNX layout; without it captions are composed from detections.
    pub captioner: Option<PathBuf>,
    /// Beams for caption search (1 = greedy); defaults to the captioner's generation_config.json.
    pub caption_beams: Option<usize>,
    /// Most tokens a caption may have; defaults to the captioner's generation_config.json.
    pub caption_max_tokens: Option<usize>,
    /// Desk score (0..1) at or above which a photo counts as a desk.
    pub desk_threshold: f32,
    /// Detections scoring below this (0..1) are ignored.
    pub min_detection_score: f32,
    /// ImageNet classes below this probability (0..1) do not count as items found.
    pub min_class_score: f32,
    /// Largest photo accepted, in pixels (checked from the header, before decoding).
    pub max_image_pixels: u64,
    /// Text reading (PP-OCRv4); none: photos are not read.
    pub ocr: Option<OcrConfig>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            detector: PathBuf::from("assets/models/detector.onnx"),
            oid_detector: PathBuf::from("assets/models/oidv4_detector.onnx"),
            oid_labels: PathBuf::from("assets/models/oidv4_labels.txt"),
            min_oid_score: 0.4,
            detector_tiles: 3,
            items: ItemTable::builtin(),
            classifier: PathBuf::from("assets/models/classifier.onnx"),
            classifier_labels: PathBuf::from("assets/models/imagenet_labels.txt"),
            captioner: None,
            caption_beams: None,
            caption_max_tokens: None,
            desk_threshold: 0.5,
            min_detection_score: 0.3,
            min_class_score: 0.1,
            max_image_pixels: 40_000_000,
            ocr: Some(OcrConfig::default()),
        }
    }
}

/// One model file as `/info` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelFile {
    /// Stable name, e.g. `ssd-mobilenet-v2-coco`.
    pub id: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Hex sha256 of the file, computed once at load.
    pub sha256: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Graph inputs as `name: type`.
    pub inputs: Vec<String>,
    /// Graph outputs as `name: type`.
    pub outputs: Vec<String>,
}

/// The loaded vision models; sessions are built once and shared.
pub struct Vision {
    detector: Detector,
    oid_detector: OidDetector,
    classifier: Classifier,
    captioner: Option<Captioner>,
    ocr: Option<Ocr>,
    config: VisionConfig,
    models: Vec<ModelFile>,
}

impl Vision {
    /// Loads every configured model, failing with the file's name if one is missing.
    pub fn load(runtime: &Runtime, config: &VisionConfig) -> Result<Vision, VisionError> {
        let mut models = Vec::new();
        let detector = Detector::new(open(
            runtime,
            "ssd-mobilenet-v2-coco",
            "detector",
            &config.detector,
            &mut models,
        )?)?;
        if !config.oid_labels.is_file() {
            return Err(VisionError::MissingModel { what: "oidv4 labels", path: config.oid_labels.clone() });
        }
        let oid_detector = OidDetector::new(
            open(runtime, items::OIDV4, "oidv4 detector", &config.oid_detector, &mut models)?,
            oid::read_labels(&config.oid_labels)?,
        )?;
        if !config.classifier_labels.is_file() {
            return Err(VisionError::MissingModel {
                what: "classifier labels",
                path: config.classifier_labels.clone(),
            });
        }
        let labels = classifier::read_labels(&config.classifier_labels)?;
        let classifier = Classifier::new(
            open(runtime, "efficientnet-lite3", "classifier", &config.classifier, &mut models)?,
            labels,
        )?;
        let captioner = match &config.captioner {
            Some(dir) => {
                let captioner = Captioner::load(runtime, dir)?;
                models.extend(captioner.models().iter().cloned());
                Some(captioner)
            }
            None => None,
        };
        let ocr = match &config.ocr {
            Some(ocr) => {
                let ocr = Ocr::load(runtime, ocr)?;
                models.extend(ocr.models().iter().cloned());
                Some(ocr)
            }
            None => None,
        };
        Ok(Vision { detector, oid_detector, classifier, captioner, ocr, config: config.clone(), models })
    }

    /// Detects, classifies and decides whether the photo shows a desk.
    pub fn analyze(&mut self, image: &RgbImage) -> Result<SceneAnalysis, VisionError> {
        Ok(self.analyze_timed(image)?.0)
    }

    /// [`Vision::analyze`], with the milliseconds each model took: the COCO detector, the Open
    /// Images detector and the classifier, in that order.
    pub fn analyze_timed(&mut self, image: &RgbImage) -> Result<(SceneAnalysis, [f64; 3]), VisionError> {
        let ms = |started: std::time::Instant| started.elapsed().as_secs_f64() * 1000.0;
        let tiles = tiles(image, self.config.detector_tiles);
        let started = std::time::Instant::now();
        let mut coco = self.detector.detect(image, self.config.min_detection_score)?;
        let coco_whole = coco.len();
        // Tiles are there for the small things on a desk: only their detections of items count.
        let items = &self.config.items;
        let is_item = |d: &Detection| items.detected(&d.source, &d.label).is_some();
        for (tile, place) in &tiles {
            let found = self.detector.detect(tile, self.config.min_detection_score)?;
            coco.extend(found.into_iter().filter(is_item).map(|d| placed(d, *place)));
        }
        let coco_ms = ms(started);
        let started = std::time::Instant::now();
        let mut oid = self.oid_detector.detect(image, self.config.min_oid_score)?;
        let oid_whole = oid.len();
        for (tile, place) in &tiles {
            let found = self.oid_detector.detect(tile, self.config.min_oid_score)?;
            oid.extend(found.into_iter().filter(is_item).map(|d| placed(d, *place)));
        }
        let oid_ms = ms(started);
        let started = std::time::Instant::now();
        let classes = self.classifier.classify(image)?;
        let classify_ms = ms(started);
        // The desk is decided from the whole photo: a tile shows too little of the scene to vote.
        let whole =
            items::fuse(coco[..coco_whole].iter().chain(&oid[..oid_whole]).cloned(), &self.config.items);
        let detections = items::fuse(coco.into_iter().chain(oid), &self.config.items);
        let analysis = desk::analyze(detections, &whole, &classes, &self.config, TOP_CLASSES);
        Ok((analysis, [coco_ms, oid_ms, classify_ms]))
    }

    /// A caption from the captioner when one is configured, else one composed from `analysis`.
    pub fn caption(&mut self, image: &RgbImage, analysis: &SceneAnalysis) -> Result<String, VisionError> {
        let Some(captioner) = &mut self.captioner else {
            return Ok(compose_caption(analysis));
        };
        let defaults = captioner.default_options();
        let options = GenerationOptions {
            num_beams: self.config.caption_beams.unwrap_or(defaults.num_beams),
            max_new_tokens: self.config.caption_max_tokens.unwrap_or(defaults.max_new_tokens),
            ..defaults
        };
        Ok(captioner.caption(image, &options)?)
    }

    /// The text in the photo, when text reading is on.
    pub fn read_text(&mut self, image: &RgbImage) -> Option<Result<Reading, VisionError>> {
        self.ocr.as_mut().map(|ocr| ocr.read(image))
    }

    /// Decodes untrusted bytes with this configuration's pixel cap.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        decode_image(bytes, self.config.max_image_pixels)
    }

    /// Every loaded model file, for `/info`.
    pub fn models(&self) -> Vec<ModelFile> {
        self.models.clone()
    }
}

fn open(
    runtime: &Runtime,
    id: &str,
    what: &'static str,
    path: &Path,
    models: &mut Vec<ModelFile>,
) -> Result<Session, VisionError> {
    if !path.is_file() {
        return Err(VisionError::MissingModel { what, path: path.to_path_buf() });
    }
    let session = runtime.session(path)?;
    models.push(describe(id, path, &session)?);
    Ok(session)
}

/// Hashes the file and lists the session's inputs and outputs.
pub fn describe(id: &str, path: &Path, session: &Session) -> Result<ModelFile, RuntimeError> {
    let unreadable =
        |e: std::io::Error| RuntimeError::Model { path: path.to_path_buf(), reason: e.to_string() };
    let sha256 = crate::inference::sha256_file(path).map_err(unreadable)?;
    let size_bytes = std::fs::metadata(path).map_err(unreadable)?.len();
    let signature = |outlets: &[ort::value::Outlet]| {
        outlets.iter().map(|o| format!("{}: {}", o.name(), o.dtype())).collect::<Vec<_>>()
    };
    Ok(ModelFile {
        id: id.to_string(),
        path: path.to_path_buf(),
        sha256,
        size_bytes,
        inputs: signature(session.inputs()),
        outputs: signature(session.outputs()),
    })
}

/// Fails unless the session has every named input and output.
pub(crate) fn expect_signature(
    session: &Session,
    model: &'static str,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<(), VisionError> {
    let has = |outlets: &[ort::value::Outlet], name: &str| outlets.iter().any(|o| o.name() == name);
    let missing: Vec<&str> = inputs
        .iter()
        .filter(|name| !has(session.inputs(), name))
        .chain(outputs.iter().filter(|name| !has(session.outputs(), name)))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(VisionError::Model { model, reason: format!("no input or output named {}", missing.join(", ")) })
    }
}

/// How much larger than a grid cell each tile is, so that an object on a cell's edge is whole in
/// some tile.
const TILE_OVERLAP: f32 = 1.4;

/// With `grid` of 2 or more, a `grid` × `grid` of overlapping crops of `image`: the detectors see
/// at 300² what would be a few pixels of the whole photo (a mug, a mouse, a phone). Each tile comes
/// with where it sits, `[x, y, width, height]` normalised.
fn tiles(image: &RgbImage, grid: u32) -> Vec<(RgbImage, [f32; 4])> {
    let mut views = Vec::new();
    if grid < 2 {
        return views;
    }
    let (w, h) = image.dimensions();
    let side = (TILE_OVERLAP / grid as f32).min(1.0);
    for gy in 0..grid {
        for gx in 0..grid {
            let x = (gx as f32 / (grid - 1) as f32) * (1.0 - side);
            let y = (gy as f32 / (grid - 1) as f32) * (1.0 - side);
            let (px, py, pw, ph) = (
                (x * w as f32) as u32,
                (y * h as f32) as u32,
                (side * w as f32) as u32,
                (side * h as f32) as u32,
            );
            let crop = ::image::imageops::crop_imm(image, px, py, pw.max(1), ph.max(1)).to_image();
            views.push((
                crop,
                [px as f32 / w as f32, py as f32 / h as f32, pw as f32 / w as f32, ph as f32 / h as f32],
            ));
        }
    }
    views
}

/// A detection in a tile at `[x, y, w, h]`, placed in the whole image.
fn placed(mut d: Detection, [x, y, w, h]: [f32; 4]) -> Detection {
    d.bbox = [x + d.bbox[0] * w, y + d.bbox[1] * h, x + d.bbox[2] * w, y + d.bbox[3] * h];
    d
}
