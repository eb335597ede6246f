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

/// COCO objects that vote for a desk, with their weight.
const WORKSPACE_OBJECTS: &[(&str, f32)] =
    &[("laptop", 1.0), ("keyboard", 1.0), ("mouse", 1.0), ("tv", 1.0 / 3.0)];

/// Desk item named by a COCO label.
fn item_for_object(label: &str) -> Option<&'static str> {
    Some(match label {
        "laptop" => "laptop",
        "tv" => "monitor",
        "keyboard" => "keyboard",
        "mouse" => "mouse",
        "cup" => "mug",
        "book" => "book",
        "cell phone" => "phone",
        "chair" => "chair",
        "potted plant" => "plant",
        "clock" => "clock",
        "scissors" => "scissors",
        _ => return None,
    })
}

/// Desk item named by an ImageNet class (first synonym).
fn item_for_class(name: &str) -> Option<&'static str> {
    Some(match name {
        "desktop computer" | "monitor" | "screen" => "monitor",
        "notebook" | "laptop" => "laptop",
        "computer keyboard" | "space bar" | "typewriter keyboard" => "keyboard",
        "mouse" => "mouse",
        "table lamp" => "lamp",
        "coffee mug" | "cup" => "mug",
        "loudspeaker" => "speaker",
        "cellular telephone" => "phone",
        "pot" => "plant",
        "printer" => "printer",
        "microphone" => "microphone",
        "ballpoint" | "fountain pen" => "pen",
        _ => return None,
    })
}

/// Combines detections and the classifier's full distribution into a [`SceneAnalysis`].
pub(crate) fn analyze(
    detections: Vec<Detection>,
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
    let objects = 1.0
        - WORKSPACE_OBJECTS
            .iter()
            .map(|(label, weight)| {
                let best =
                    detections.iter().filter(|d| d.label == *label).map(|d| d.score).fold(0.0, f32::max);
                1.0 - weight * best
            })
            .product::<f32>();
    let desk_score = 1.0 - (1.0 - scene) * (1.0 - objects);

    // Detections are sorted best first, and so are the classes: items keep that order.
    let mut evidence: Vec<(&str, f32)> = detections
        .iter()
        .filter_map(|d| item_for_object(&d.label).map(|item| (item, d.score)))
        .chain(
            classes
                .iter()
                .take_while(|c| c.probability >= config.min_class_score)
                .filter_map(|c| item_for_class(c.name()).map(|item| (item, c.probability))),
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
/// "a desk with a laptop, a mug and a lamp".
pub fn compose_caption(analysis: &SceneAnalysis) -> String {
    let things: Vec<String> = if analysis.is_desk || !analysis.items.is_empty() {
        analysis.items.iter().map(|item| with_article(item)).collect()
    } else {
        let mut labels: Vec<&str> = Vec::new();
        for d in &analysis.detections {
            if !labels.contains(&d.label.as_str()) {
                labels.push(&d.label);
            }
        }
        labels.into_iter().take(3).map(with_article).collect()
    };
    let subject = if analysis.is_desk { "a desk" } else { "a photo" };
    let joiner = if analysis.is_desk { "with" } else { "of" };
    match things.as_slice() {
        [] if analysis.is_desk => subject.to_string(),
        [] => match analysis.top_classes.first() {
            Some(class) => format!("a photo of {}", with_article(class.name())),
            None => subject.to_string(),
        },
        [one] => format!("{subject} {joiner} {one}"),
        [rest @ .., last] => format!("{subject} {joiner} {} and {last}", rest.join(", ")),
    }
}

fn with_article(noun: &str) -> String {
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {noun}")
}
