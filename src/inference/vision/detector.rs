//! COCO object detection with SSD-MobileNet-v2 (TF object detection zoo, converted to ONNX).
//!
//! The graph takes a uint8 NHWC image of any size, resizes it to 300x300 itself and runs
//! non-maximum suppression inside, returning up to 100 boxes as `[y_min, x_min, y_max, x_max]`
//! normalised to the image, with scores and 1-based COCO class ids as floats.

use image::RgbImage;
use image::imageops::FilterType;
use ndarray::ArrayView4;
use ort::session::Session;
use ort::value::TensorRef;

use super::VisionError;

const INPUT: &str = "image_tensor:0";
const BOXES: &str = "detection_boxes:0";
const SCORES: &str = "detection_scores:0";
const CLASSES: &str = "detection_classes:0";
const COUNT: &str = "num_detections:0";

/// Photos are shrunk to this longest side before inference: the graph resizes to 300x300 anyway,
/// and feeding it a 12-megapixel photo only costs time.
const MAX_SIDE: u32 = 640;

/// The 90-id label map the model was trained with (ids missing from COCO's 80 classes are `None`).
const COCO_LABELS: [Option<&str>; 91] = [
    None,
    Some("person"),
    Some("bicycle"),
    Some("car"),
    Some("motorcycle"),
    Some("airplane"),
    Some("bus"),
    Some("train"),
    Some("truck"),
    Some("boat"),
    Some("traffic light"),
    Some("fire hydrant"),
    None,
    Some("stop sign"),
    Some("parking meter"),
    Some("bench"),
    Some("bird"),
    Some("cat"),
    Some("dog"),
    Some("horse"),
    Some("sheep"),
    Some("cow"),
    Some("elephant"),
    Some("bear"),
    Some("zebra"),
    Some("giraffe"),
    None,
    Some("backpack"),
    Some("umbrella"),
    None,
    None,
    Some("handbag"),
    Some("tie"),
    Some("suitcase"),
    Some("frisbee"),
    Some("skis"),
    Some("snowboard"),
    Some("sports ball"),
    Some("kite"),
    Some("baseball bat"),
    Some("baseball glove"),
    Some("skateboard"),
    Some("surfboard"),
    Some("tennis racket"),
    Some("bottle"),
    None,
    Some("wine glass"),
    Some("cup"),
    Some("fork"),
    Some("knife"),
    Some("spoon"),
    Some("bowl"),
    Some("banana"),
    Some("apple"),
    Some("sandwich"),
    Some("orange"),
    Some("broccoli"),
    Some("carrot"),
    Some("hot dog"),
    Some("pizza"),
    Some("donut"),
    Some("cake"),
    Some("chair"),
    Some("couch"),
    Some("potted plant"),
    Some("bed"),
    None,
    Some("dining table"),
    None,
    None,
    Some("toilet"),
    None,
    Some("tv"),
    Some("laptop"),
    Some("mouse"),
    Some("remote"),
    Some("keyboard"),
    Some("cell phone"),
    Some("microwave"),
    Some("oven"),
    Some("toaster"),
    Some("sink"),
    Some("refrigerator"),
    None,
    Some("book"),
    Some("clock"),
    Some("vase"),
    Some("scissors"),
    Some("teddy bear"),
    Some("hair drier"),
    Some("toothbrush"),
];

/// One object found in a photo.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Detection {
    /// The detector's own class name, e.g. COCO's `laptop`, `tv`, `cup` or Open Images'
    /// `Computer monitor`.
    pub label: String,
    /// Detector confidence in `[0, 1]`.
    pub score: f32,
    /// `[x_min, y_min, x_max, y_max]`, normalised to the image's width and height.
    pub bbox: [f32; 4],
    /// The model that saw it, by its `/info` id (`ssd-mobilenet-v2-coco`, `ssd-mobilenet-v2-oidv4`).
    pub source: String,
    /// The deskgen item the label means (`[items]` in `config/pipeline.toml`), if any.
    pub item: Option<String>,
}

/// SSD-MobileNet-v2 COCO behind a lock (ONNX Runtime sessions run one call at a time here).
pub struct Detector {
    session: Session,
}

impl Detector {
    /// Wraps a session, checking that it has the detector's inputs and outputs.
    pub fn new(session: Session) -> Result<Detector, VisionError> {
        super::expect_signature(&session, "detector", &[INPUT], &[BOXES, SCORES, CLASSES, COUNT])?;
        Ok(Detector { session })
    }

    /// Objects with a score of at least `min_score`, best first.
    pub fn detect(&mut self, image: &RgbImage, min_score: f32) -> Result<Vec<Detection>, VisionError> {
        let resized;
        let image = if image.width().max(image.height()) > MAX_SIDE {
            let scale = f64::from(MAX_SIDE) / f64::from(image.width().max(image.height()));
            let width = ((f64::from(image.width()) * scale).round() as u32).max(1);
            let height = ((f64::from(image.height()) * scale).round() as u32).max(1);
            resized = image::imageops::resize(image, width, height, FilterType::Triangle);
            &resized
        } else {
            image
        };
        let shape = (1, image.height() as usize, image.width() as usize, 3);
        let pixels =
            ArrayView4::from_shape(shape, image.as_raw()).expect("an RgbImage is height*width*3 bytes");

        let fail = |e: ort::Error| VisionError::Inference { model: "detector", reason: e.to_string() };
        let outputs = self
            .session
            .run(ort::inputs![INPUT => TensorRef::from_array_view(pixels).map_err(fail)?])
            .map_err(fail)?;
        let (_, boxes) = outputs[BOXES].try_extract_tensor::<f32>().map_err(fail)?;
        let (_, scores) = outputs[SCORES].try_extract_tensor::<f32>().map_err(fail)?;
        let (_, classes) = outputs[CLASSES].try_extract_tensor::<f32>().map_err(fail)?;
        let (_, count) = outputs[COUNT].try_extract_tensor::<f32>().map_err(fail)?;

        let count = count.first().map_or(0, |&n| n as usize).min(scores.len()).min(classes.len());
        if boxes.len() < count * 4 {
            return Err(VisionError::Model {
                model: "detector",
                reason: format!("{count} detections but only {} box coordinates", boxes.len()),
            });
        }
        let mut detections: Vec<Detection> = (0..count)
            .filter(|&i| scores[i] >= min_score)
            .filter_map(|i| {
                let label = COCO_LABELS.get(classes[i] as usize).copied().flatten()?;
                let [y_min, x_min, y_max, x_max] = [0, 1, 2, 3].map(|k| boxes[i * 4 + k].clamp(0.0, 1.0));
                Some(Detection {
                    label: label.to_string(),
                    score: scores[i],
                    bbox: [x_min, y_min, x_max, y_max],
                    source: super::items::COCO.to_string(),
                    item: None,
                })
            })
            .collect();
        detections.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(detections)
    }
}
