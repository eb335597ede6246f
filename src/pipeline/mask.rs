//! The mask stage: the inpainting mask a request asks for, read from where it is (a mask image)
//! or drawn from what the detector saw (`keep` / `repaint`), at the photo's size.

use image::{GrayImage, Luma};

use super::RunContext;
use super::look::Seen;
use super::photo::PhotoSources;
use crate::core::{Failure, FailureCode, GenerateOutput, MaskRequest, MaskSource, PhotoSource};
use crate::inference::diffusion::InpaintMask;
use crate::inference::diffusion::mask::{from_image, repaints_anything};
use crate::inference::vision::{Detection, decode_upright};

/// How far a detected item's box is grown on each side for `keep` and `repaint`, as a share of
/// the box's own width and height (detector boxes sit tight on the object, its shadow and edge
/// outside them).
pub const BOX_MARGIN: f32 = 0.1;

/// The mask of `request` for `seen`'s photo, stretched to the photo; warnings for items it names
/// that give no box go into `output`. A mask that repaints nothing fails the task.
pub async fn mask_for(
    request: &MaskRequest,
    seen: &Seen,
    photos: &PhotoSources,
    ctx: &RunContext,
    output: &mut GenerateOutput,
) -> Result<InpaintMask, Failure> {
    let (width, height) = seen.photo.dimensions();
    let image = match &request.source {
        MaskSource::Image(source) => {
            let field = match source {
                PhotoSource::Url(_) => "mask_image_url",
                PhotoSource::Stored { .. } => "mask_image",
            };
            let bytes = photos
                .read_image(source, "mask")
                .await
                .map_err(|f| Failure::new(f.code, format!("{field}: {}", f.message)))?;
            ctx.check()?;
            let max_pixels = photos.max_image_pixels;
            let decoded = tokio::task::spawn_blocking(move || decode_upright(&bytes, max_pixels))
                .await
                .map_err(|e| Failure::new(FailureCode::Internal, e.to_string()))?
                .map_err(|e| {
                    Failure::new(FailureCode::InvalidImage, format!("{field}: The mask cannot be used: {e}"))
                })?;
            let mask = from_image(&decoded.image);
            if !repaints_anything(&mask) {
                return Err(nothing_to_repaint(field, "the mask is black everywhere (white repaints)"));
            }
            mask
        }
        MaskSource::Keep(items) => {
            let (mask, warnings) = from_boxes(items, seen, (width, height), true);
            output.warnings.extend(warnings);
            if !repaints_anything(&mask) {
                return Err(nothing_to_repaint("keep", "the kept items cover the whole photo"));
            }
            mask
        }
        MaskSource::Repaint(items) => {
            let (mask, warnings) = from_boxes(items, seen, (width, height), false);
            output.warnings.extend(warnings);
            if !repaints_anything(&mask) {
                return Err(nothing_to_repaint("repaint", "none of the items was detected with a box"));
            }
            mask
        }
    };
    Ok(InpaintMask {
        image,
        blur: request.blur,
        padding_crop: request.padding_crop,
        preserve_unmasked: request.preserve_unmasked,
    })
}

fn nothing_to_repaint(field: &str, why: &str) -> Failure {
    Failure::new(FailureCode::InvalidInput, format!("{field}: Nothing to repaint: {why}."))
}

/// A mask of `size` from the boxes of the detections named by `items` (item names such as
/// `monitor`, or detector labels such as `tv`), each grown by [`BOX_MARGIN`]: `keep` paints them
/// black on white, else white on black. Names that give no box come back as warnings.
pub fn from_boxes(
    items: &[String],
    seen: &Seen,
    (width, height): (u32, u32),
    keep: bool,
) -> (GrayImage, Vec<String>) {
    let (background, painted) = if keep { (255, 0) } else { (0, 255) };
    let mut mask = GrayImage::from_pixel(width, height, Luma([background]));
    let mut warnings = Vec::new();
    let field = if keep { "keep" } else { "repaint" };
    for item in items {
        let boxes: Vec<&Detection> = seen
            .scene
            .detections
            .iter()
            .filter(|d| d.label.to_lowercase() == *item || d.item.as_deref() == Some(item.as_str()))
            .collect();
        if boxes.is_empty() {
            warnings.push(if seen.scene.items.contains(item) {
                format!("{field}: {item} was seen only by the classifier, which gives no place in the photo; it was left out of the mask.")
            } else {
                format!("{field}: no {item} was detected in the photo; it was left out of the mask.")
            });
            continue;
        }
        for detection in boxes {
            paint_box(&mut mask, detection.bbox, painted);
        }
    }
    (mask, warnings)
}

/// Fills the box `[x_min, y_min, x_max, y_max]` (normalised), grown by [`BOX_MARGIN`], with `value`.
fn paint_box(mask: &mut GrayImage, [x_min, y_min, x_max, y_max]: [f32; 4], value: u8) {
    let (w, h) = (mask.width() as f32, mask.height() as f32);
    let (grow_x, grow_y) = ((x_max - x_min) * BOX_MARGIN, (y_max - y_min) * BOX_MARGIN);
    let left = ((x_min - grow_x) * w).floor().clamp(0.0, w) as u32;
    let right = ((x_max + grow_x) * w).ceil().clamp(0.0, w) as u32;
    let top = ((y_min - grow_y) * h).floor().clamp(0.0, h) as u32;
    let bottom = ((y_max + grow_y) * h).ceil().clamp(0.0, h) as u32;
    for y in top..bottom {
        for x in left..right {
            mask.put_pixel(x, y, Luma([value]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::vision::items::COCO;
    use crate::inference::vision::{ItemTable, SceneAnalysis};

    /// A 200×100 photo in which the detector saw a laptop and a tv, and the classifier a lamp.
    fn seen() -> Seen {
        let detection = |label: &str, bbox| {
            let item = ItemTable::builtin().detected(COCO, label).map(str::to_string);
            Detection { label: label.into(), score: 0.9, bbox, source: COCO.into(), item }
        };
        Seen {
            photo: image::RgbImage::new(200, 100),
            scene: SceneAnalysis {
                is_desk: true,
                desk_score: 1.0,
                detections: vec![
                    detection("laptop", [0.1, 0.2, 0.3, 0.6]),
                    detection("tv", [0.6, 0.1, 0.9, 0.5]),
                ],
                top_classes: Vec::new(),
                items: vec!["laptop".into(), "monitor".into(), "lamp".into()],
            },
            text: Vec::new(),
            caption: String::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn keep_blackens_the_grown_boxes_of_the_named_items() {
        let (mask, warnings) = from_boxes(&["laptop".into()], &seen(), (200, 100), true);
        assert!(warnings.is_empty(), "{warnings:?}");
        // The laptop's box is x 20..60, y 20..60, grown by a tenth of its size: x 16..64, y 16..64.
        for (x, y) in [(17, 17), (62, 62), (40, 17), (17, 62)] {
            assert_eq!(mask.get_pixel(x, y)[0], 0, "({x}, {y}) is kept");
        }
        for (x, y) in [(14, 40), (66, 40), (40, 14), (40, 66)] {
            assert_eq!(mask.get_pixel(x, y)[0], 255, "({x}, {y}) is repainted");
        }
        assert_eq!(mask.get_pixel(150, 30)[0], 255, "the monitor is repainted");
    }

    #[test]
    fn item_names_and_detector_labels_both_find_a_box_and_the_rest_warn() {
        let items = ["monitor".to_string(), "lamp".to_string(), "plant".to_string()];
        let (mask, warnings) = from_boxes(&items, &seen(), (200, 100), false);
        assert_eq!(mask.get_pixel(150, 30)[0], 255, "monitor names the tv's box");
        assert_eq!(mask.get_pixel(40, 40)[0], 0);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("lamp was seen only by the classifier"), "{warnings:?}");
        assert!(warnings[1].contains("no plant was detected"), "{warnings:?}");
        let (by_label, _) = from_boxes(&["tv".into()], &seen(), (200, 100), false);
        assert_eq!(by_label, from_boxes(&["monitor".into()], &seen(), (200, 100), false).0);
    }
}
