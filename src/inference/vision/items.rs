//! What each model's class names mean as deskgen's items (`[items]` in `config/pipeline.toml`),
//! and the fusion of both detectors' boxes into one list.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::detector::Detection;
use super::oid::iou;

/// The COCO detector's model id, as `/info` and `detected_items[].source` name it.
pub const COCO: &str = "ssd-mobilenet-v2-coco";
/// The Open Images v4 detector's model id.
pub const OIDV4: &str = "ssd-mobilenet-v2-oidv4";

/// Boxes of the same item from the two detectors overlapping at least this much are one object.
pub const FUSE_IOU: f32 = 0.5;

/// Class name to item name, per model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemTable {
    /// COCO detector labels (`tv`, `cup`, …).
    #[serde(default)]
    pub coco: BTreeMap<String, String>,
    /// Open Images v4 detector labels (`Computer monitor`, `Mug`, …).
    #[serde(default)]
    pub oidv4: BTreeMap<String, String>,
    /// ImageNet classes by their first synonym (`desktop computer`, `coffee mug`, …).
    #[serde(default)]
    pub imagenet: BTreeMap<String, String>,
}

impl ItemTable {
    /// The table of the pipeline settings built into the binary (`config/pipeline.toml`).
    pub fn builtin() -> ItemTable {
        #[derive(Deserialize)]
        struct Settings {
            items: ItemTable,
        }
        toml::from_str::<Settings>(include_str!("../../../config/pipeline.toml"))
            .expect("the built-in pipeline settings have an [items] table")
            .items
    }

    /// The item a detector's label means, if any.
    pub fn detected(&self, source: &str, label: &str) -> Option<&str> {
        let table = if source == OIDV4 { &self.oidv4 } else { &self.coco };
        table.get(label).map(String::as_str)
    }

    /// The item an ImageNet class means, if any.
    pub fn classified(&self, name: &str) -> Option<&str> {
        self.imagenet.get(name).map(String::as_str)
    }

    /// Every item name the table knows, sorted.
    pub fn item_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .coco
            .values()
            .chain(self.oidv4.values())
            .chain(self.imagenet.values())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Both detectors' detections (of the whole photo and its tiles) as one list, best first, each with
/// its item: where two boxed the same thing (the same item, or for labels that are no item the
/// same label in any case) with an IoU of at least [`FUSE_IOU`], or one box lies mostly inside the
/// other (a tile's view of part of it), only the better-scoring box stays.
pub fn fuse(detections: impl IntoIterator<Item = Detection>, table: &ItemTable) -> Vec<Detection> {
    let mut all: Vec<Detection> = detections
        .into_iter()
        .map(|mut d| {
            d.item = table.detected(&d.source, &d.label).map(str::to_string);
            d
        })
        .collect();
    all.sort_by(|a, b| b.score.total_cmp(&a.score));
    let key = |d: &Detection| d.item.clone().unwrap_or_else(|| d.label.to_lowercase());
    let mut kept: Vec<Detection> = Vec::with_capacity(all.len());
    for detection in all {
        let same_object =
            kept.iter().any(|k| key(k) == key(&detection) && same_place(&k.bbox, &detection.bbox));
        if !same_object {
            kept.push(detection);
        }
    }
    kept
}

/// Whether two boxes are one object: IoU of at least [`FUSE_IOU`], or [`INSIDE`] of the smaller one
/// within the other.
fn same_place(a: &[f32; 4], b: &[f32; 4]) -> bool {
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let smaller = area(a).min(area(b));
    iou(a, b) >= FUSE_IOU || (smaller > 0.0 && ix * iy / smaller >= INSIDE)
}

/// Share of the smaller box inside the larger at which two boxes of an item are one object.
pub const INSIDE: f32 = 0.8;

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(source: &str, label: &str, score: f32, bbox: [f32; 4]) -> Detection {
        Detection { label: label.into(), score, bbox, source: source.into(), item: None }
    }

    fn table() -> ItemTable {
        let map =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        ItemTable {
            coco: map(&[("tv", "monitor"), ("cup", "mug")]),
            oidv4: map(&[("Computer monitor", "monitor"), ("Mug", "mug"), ("Coffee cup", "mug")]),
            imagenet: BTreeMap::new(),
        }
    }

    #[test]
    fn an_object_both_detectors_box_is_one_item_with_the_better_score() {
        let fused = fuse(
            [
                seen(COCO, "tv", 0.6, [0.1, 0.1, 0.5, 0.5]),
                seen(OIDV4, "Computer monitor", 0.8, [0.12, 0.1, 0.52, 0.48]),
                seen(COCO, "cup", 0.7, [0.7, 0.7, 0.8, 0.8]),
                seen(OIDV4, "Coffee cup", 0.55, [0.7, 0.71, 0.8, 0.8]),
                seen(OIDV4, "Dog", 0.9, [0.0, 0.5, 0.3, 1.0]),
                seen(COCO, "dog", 0.85, [0.0, 0.52, 0.3, 1.0]),
            ],
            &table(),
        );
        let summary: Vec<(&str, &str, Option<&str>)> =
            fused.iter().map(|d| (d.source.as_str(), d.label.as_str(), d.item.as_deref())).collect();
        assert_eq!(
            summary,
            [(OIDV4, "Dog", None), (OIDV4, "Computer monitor", Some("monitor")), (COCO, "cup", Some("mug"))]
        );
    }

    #[test]
    fn two_monitors_apart_stay_two_and_a_tiles_part_of_one_is_dropped() {
        let fused = fuse(
            [
                seen(COCO, "tv", 0.6, [0.0, 0.0, 0.4, 0.4]),
                seen(OIDV4, "Computer monitor", 0.8, [0.6, 0.0, 1.0, 0.4]),
                seen(OIDV4, "Computer monitor", 0.7, [0.6, 0.0, 0.75, 0.3]),
                seen(OIDV4, "Mug", 0.7, [0.7, 0.7, 0.8, 0.8]),
                seen(COCO, "cup", 0.6, [0.81, 0.7, 0.9, 0.8]),
            ],
            &table(),
        );
        let boxes: Vec<[f32; 4]> = fused.iter().map(|d| d.bbox).collect();
        assert_eq!(
            boxes,
            [[0.6, 0.0, 1.0, 0.4], [0.7, 0.7, 0.8, 0.8], [0.0, 0.0, 0.4, 0.4], [0.81, 0.7, 0.9, 0.8]],
            "{fused:?}"
        );
    }
}
