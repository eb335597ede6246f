//! What a generation produced: the image, what the photo shows, and where to buy the items.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A box in normalised image coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    /// Left edge in [0, 1].
    pub x_min: f32,
    /// Top edge in [0, 1].
    pub y_min: f32,
    /// Right edge in [0, 1].
    pub x_max: f32,
    /// Bottom edge in [0, 1].
    pub y_max: f32,
}

/// An item found in the photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectedItem {
    /// The detector's own class name, e.g. COCO's "tv" or Open Images' "Computer monitor".
    pub label: String,
    /// Detector confidence.
    pub score: f32,
    /// Where it is.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
    /// deskgen's item name for the label (e.g. "monitor"), none when it means no item. Records from
    /// before it existed read as none.
    #[serde(default)]
    pub item: Option<String>,
    /// The model that saw it, by its /info id. Records from before it existed read as "".
    #[serde(default)]
    pub source: String,
}

/// A line of text read in the photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectedText {
    /// What it says, as read.
    pub text: String,
    /// Mean probability of its characters.
    pub score: f32,
    /// Where it is (the upright bounds of the line).
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
    /// The brand of the pipeline settings' brand table it names, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
}

/// Why a category is recommended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecommendationReason {
    /// Nothing of the kind was seen on the desk (or there is no photo to look at).
    #[default]
    Missing,
    /// The desk has one already; the plan recommends a better one.
    Upgrade,
    /// The user's text names it.
    Asked,
}

impl RecommendationReason {
    /// The reason as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RecommendationReason::Missing => "missing",
            RecommendationReason::Upgrade => "upgrade",
            RecommendationReason::Asked => "asked",
        }
    }
}

/// Offers for one recommended category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Why the category is recommended. Records from before it existed read as missing.
    #[serde(default)]
    pub reason: RecommendationReason,
    /// Category id, e.g. "desk_lamp".
    pub category: String,
    /// Display name and REST result key, e.g. "데스크 조명".
    pub display_name: String,
    /// The offers, cheapest first.
    pub items: Vec<Offer>,
}

/// What a finished (or fallen-back) pipeline produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// Public URL of the photo the task started from.
    pub initial_image_url: Option<String>,
    /// URL of the generated PNG (the first, when there are several); none when generation was
    /// skipped or failed.
    pub processed_image_url: Option<String>,
    /// URLs of every generated PNG, in seed order. Records from before it existed read as none.
    #[serde(default)]
    pub processed_image_urls: Vec<String>,
    /// Inpainting: the mask the images were made with (PNG, white repainted), stored beside them.
    #[serde(default)]
    pub mask_url: Option<String>,
    /// Whether the photo shows a desk; none for text-only requests.
    pub is_desk: Option<bool>,
    /// Caption of the photo.
    pub caption: Option<String>,
    /// Items found in the photo.
    pub detected_items: Vec<DetectedItem>,
    /// Text read in the photo, top to bottom, left to right. Records from before it existed read
    /// as none.
    #[serde(default)]
    pub detected_text: Vec<DetectedText>,
    /// Shopping offers per recommended category.
    pub recommendations: Vec<Recommendation>,
    /// The prompt the diffusion model saw.
    pub prompt_used: Option<String>,
    /// The negative prompt the diffusion model saw.
    pub negative_prompt_used: Option<String>,
    /// Milliseconds per stage.
    pub timings_ms: BTreeMap<String, f64>,
    /// Problems that did not fail the task.
    pub warnings: Vec<String>,
    /// The seed generation used.
    pub seed: Option<u64>,
    /// The ControlNet guidance the image was made with (empty for none). Records from before it
    /// existed read as empty.
    #[serde(default)]
    pub control: Vec<ControlUsed>,
}

/// One ControlNet unit a generation used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlUsed {
    /// The control type.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Its scale.
    pub scale: f64,
}

/// One product offer, in the result's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OfferFields")]
pub struct Offer {
    /// Product title, plain text.
    pub title: String,
    /// Lowest price as shown to users, e.g. "21990원".
    pub price: String,
    /// Seller (mall) name.
    pub mall: String,
    /// Third-level shopping category, e.g. "마우스".
    pub category3: String,
    /// Fourth-level shopping category, e.g. "무선마우스".
    pub category4: String,
    /// Product page.
    pub link: String,
    /// Product image URL (may be empty).
    pub image: String,
    /// The price in won, for sorting; not serialized (it is `price` without the unit).
    #[serde(skip_serializing)]
    pub price_won: u64,
}

/// The serialized fields of [`Offer`]; `price_won` is derived from `price` when reading.
#[derive(Deserialize)]
struct OfferFields {
    title: String,
    price: String,
    mall: String,
    category3: String,
    category4: String,
    link: String,
    image: String,
}

impl From<OfferFields> for Offer {
    fn from(fields: OfferFields) -> Self {
        let price_won = fields.price.trim_end_matches('원').replace(',', "").trim().parse().unwrap_or(0);
        Offer {
            title: fields.title,
            price: fields.price,
            mall: fields.mall,
            category3: fields.category3,
            category4: fields.category4,
            link: fields.link,
            image: fields.image,
            price_won,
        }
    }
}
