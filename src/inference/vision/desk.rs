//! The desk decision and the desk items found, from the detector's objects and the classifier's
//! scene classes.
//!
//! Two independent sources of evidence are scored in `[0, 1]` and combined with a noisy-OR,
//! `desk_score = 1 - (1 - scene) * (1 - objects)`, so either one can carry the decision but
//! neither is required:
//!
//! - `scene`: the classifier's probability mass on workspace classes (desk, desktop computer,
//!   laptop, computer keyboard, mouse, monitor, ...). Classes that are just as common away from
//!   desks (a screen may be a TV, a lamp may be on a nightstand) count half.
//! - `objects`: computing devices the detector found, one vote per kind (two monitors are no more
//!   a desk than one): a laptop, keyboard or mouse counts its full score; a `tv` counts a third,
//!   since a screen alone is as likely a living-room TV as a monitor.
//!
//! Cups, books, phones, plants and chairs are listed as items but never vote: they are on dining
//! tables, shelves and sofas as often as on desks.

use super::items::OIDV4;
use super::{ClassScore, Detection, VisionConfig};

/// What the vision models made of one photo.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SceneAnalysis {
    /// Whether `desk_score` reached the configured threshold.
    pub is_desk: bool,
    /// Combined desk evidence in `[0, 1]`.
    pub desk_score: f32,
    /// Objects found, best first.
    pub detections: Vec<Detection>,
    /// The most probable ImageNet classes, best first.
    pub top_classes: Vec<ClassScore>,
    /// Desk items found (`laptop`, `monitor`, `mug`, ...), each once, strongest evidence first.
    pub items: Vec<String>,
}

/// ImageNet classes (first synonym) that are evidence of a workspace, with their weight.
const WORKSPACE_CLASSES: &[(&str, f32)] = &[
    ("desk", 1.0),
    ("desktop computer", 1.0),
    ("notebook", 1.0),
    ("laptop", 1.0),
    ("computer keyboard", 1.0),
    ("space bar", 1.0),
    ("mouse", 1.0),
    ("monitor", 1.0),
    ("screen", 0.5),
    ("typewriter keyboard", 0.5),
    ("printer", 0.5),
    ("table lamp", 0.5),
    ("file", 0.5),
    ("binder", 0.5),
    ("modem", 0.5),
];

/// Detected items that vote for a desk, from either detector, with their weight.
const WORKSPACE_ITEMS: &[(&str, f32)] =
    &[("laptop", 1.0), ("keyboard", 1.0), ("mouse", 1.0), ("monitor", 1.0 / 3.0)];

/// The Open Images detector's own `Desk` class, and its weight: half, since a desk-like table is
/// not always a desk (on the 28 evaluation photos it scored 0.5 or more on 6 desks and on no
/// other scene, and 0.40 on a kitchen counter, which the rest of the evidence outweighs).
const DESK_OBJECT: (&str, &str, f32) = (OIDV4, "Desk", 0.5);

/// Combines the detections (of the whole photo and its tiles, fused) and the classifier's full
/// distribution into a [`SceneAnalysis`]; the desk is decided from `voters`, the whole photo's.
pub(crate) fn analyze(
    detections: Vec<Detection>,
    voters: &[Detection],
    classes: &[ClassScore],
    config: &VisionConfig,
    top: usize,
) -> SceneAnalysis {
    let scene = classes
        .iter()
        .filter_map(|c| {
            WORKSPACE_CLASSES.iter().find(|(name, _)| *name == c.name()).map(|(_, w)| w * c.probability)
        })
        .sum::<f32>()
        .min(1.0);
    let best = |matches: &dyn Fn(&Detection) -> bool| {
        voters.iter().filter(|d| matches(d)).map(|d| d.score).fold(0.0, f32::max)
    };
    let (desk_source, desk_label, desk_weight) = DESK_OBJECT;
    let desk_object = best(&|d| d.source == desk_source && d.label == desk_label);
    let objects = 1.0
        - WORKSPACE_ITEMS
            .iter()
            .map(|(item, weight)| 1.0 - weight * best(&|d| d.item.as_deref() == Some(*item)))
            .product::<f32>()
            * (1.0 - desk_weight * desk_object);
    let desk_score = 1.0 - (1.0 - scene) * (1.0 - objects);

    // Detections are sorted best first, and so are the classes: items keep that order.
    let mut evidence: Vec<(&str, f32)> = detections
        .iter()
        .filter_map(|d| d.item.as_deref().map(|item| (item, d.score)))
        .chain(
            classes
                .iter()
                .take_while(|c| c.probability >= config.min_class_score)
                .filter_map(|c| config.items.classified(c.name()).map(|item| (item, c.probability))),
        )
        .collect();
    evidence.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut items: Vec<String> = Vec::new();
    for (item, _) in evidence {
        if !items.iter().any(|i| i == item) {
            items.push(item.to_string());
        }
    }

    SceneAnalysis {
        is_desk: desk_score >= config.desk_threshold,
        desk_score,
        detections,
        top_classes: classes.iter().take(top).cloned().collect(),
        items,
    }
}

/// A caption made from the analysis, for when no captioner is configured:
/// "a desk with a laptop, a mug and a lamp", or for other photos "a photo of a dog and a bicycle".
pub fn compose_caption(analysis: &SceneAnalysis) -> String {
    let (subject, things): (&str, Vec<&str>) = if analysis.is_desk {
        ("a desk with", analysis.items.iter().map(String::as_str).collect())
    } else {
        let mut labels: Vec<&str> = Vec::new();
        for d in &analysis.detections {
            if !labels.contains(&d.label.as_str()) {
                labels.push(&d.label);
            }
        }
        labels.truncate(3);
        if labels.is_empty() {
            labels.extend(analysis.top_classes.first().map(ClassScore::name));
        }
        ("a photo of", labels)
    };
    let things: Vec<String> = things.into_iter().map(with_article).collect();
    match things.as_slice() {
        [] if analysis.is_desk => "a desk".to_string(),
        [] => "a photo".to_string(),
        [one] => format!("{subject} {one}"),
        [rest @ .., last] => format!("{subject} {} and {last}", rest.join(", ")),
    }
}

fn with_article(noun: &str) -> String {
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {noun}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::vision::items::COCO;

    fn detection(label: &str, score: f32) -> Detection {
        let item = VisionConfig::default().items.detected(COCO, label).map(str::to_string);
        Detection { label: label.to_string(), score, bbox: [0.1, 0.1, 0.5, 0.5], source: COCO.into(), item }
    }

    fn class(label: &str, probability: f32) -> ClassScore {
        ClassScore { label: label.to_string(), probability }
    }

    fn decide(detections: Vec<Detection>, classes: &[ClassScore]) -> SceneAnalysis {
        analyze(detections.clone(), &detections, classes, &VisionConfig::default(), 5)
    }

    #[test]
    fn computing_devices_make_a_desk() {
        let analysis = decide(
            vec![detection("laptop", 0.9), detection("cup", 0.8)],
            &[class("notebook, notebook computer", 0.3)],
        );
        assert!(analysis.is_desk);
        assert!((analysis.desk_score - (1.0 - 0.7 * 0.1)).abs() < 1e-6, "{}", analysis.desk_score);
        assert_eq!(analysis.items, ["laptop", "mug"]);
    }

    #[test]
    fn a_workspace_scene_alone_makes_a_desk() {
        let analysis = decide(
            vec![],
            &[class("desk", 0.4), class("desktop computer", 0.2), class("tabby, tabby cat", 0.1)],
        );
        assert!(analysis.is_desk, "{}", analysis.desk_score);
        assert_eq!(analysis.items, ["monitor"]);
    }

    #[test]
    fn a_living_room_tv_is_not_a_desk() {
        let detections = vec![
            detection("tv", 0.95),
            detection("tv", 0.9),
            detection("couch", 0.9),
            detection("book", 0.8),
        ];
        let classes = [
            class("home theater, home theatre", 0.4),
            class("television, television system", 0.3),
            class("screen, CRT screen", 0.1),
        ];
        let analysis = decide(detections, &classes);
        assert!(!analysis.is_desk, "{}", analysis.desk_score);
        assert_eq!(analysis.items, ["monitor", "book"]);
    }

    #[test]
    fn everyday_objects_do_not_vote() {
        let detections = ["cup", "book", "cell phone", "potted plant", "chair", "dining table"]
            .map(|l| detection(l, 0.99));
        let analysis = decide(detections.to_vec(), &[class("dining table, board", 0.8)]);
        assert_eq!(analysis.desk_score, 0.0);
        assert!(!analysis.is_desk);
    }

    #[test]
    fn the_threshold_comes_from_the_config() {
        let config = VisionConfig { desk_threshold: 0.95, ..VisionConfig::default() };
        let laptop = vec![detection("laptop", 0.9)];
        let analysis = analyze(laptop.clone(), &laptop, &[], &config, 5);
        assert!(!analysis.is_desk);
        assert!((analysis.desk_score - 0.9).abs() < 1e-6);
    }

    #[test]
    fn captions_list_items_or_objects() {
        let mut analysis =
            decide(vec![detection("laptop", 0.9), detection("cup", 0.8)], &[class("table lamp", 0.5)]);
        assert_eq!(compose_caption(&analysis), "a desk with a laptop, a mug and a lamp");
        analysis.items.truncate(1);
        assert_eq!(compose_caption(&analysis), "a desk with a laptop");
        let other =
            decide(vec![detection("dog", 0.9), detection("dog", 0.8), detection("bicycle", 0.7)], &[]);
        assert_eq!(compose_caption(&other), "a photo of a dog and a bicycle");
        let empty = decide(vec![], &[class("valley, vale", 0.8)]);
        assert_eq!(compose_caption(&empty), "a photo of a valley");
        let unknown = decide(
            vec![
                detection("orange", 0.9),
                detection("apple", 0.9),
                detection("umbrella", 0.8),
                detection("kite", 0.7),
            ],
            &[],
        );
        assert_eq!(compose_caption(&unknown), "a photo of an orange, an apple and an umbrella");
    }
}
