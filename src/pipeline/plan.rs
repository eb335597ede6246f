//! The pipeline's editable settings (config/pipeline.toml): the category table, the recommendation
//! plan, and prompt engineering.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use crate::core::RecommendationReason;
use crate::inference::diffusion::{MAX_CONTROL_SCALE, is_guidance_window};
use crate::inference::vision::ItemTable;

/// The built-in settings file.
pub const DEFAULT_PIPELINE_CONFIG: &str = include_str!("../../config/pipeline.toml");

/// Errors reading the settings.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid settings.
    #[error("invalid pipeline settings: {0}")]
    Parse(#[from] toml::de::Error),
    /// The settings contradict themselves.
    #[error("invalid pipeline settings: {0}")]
    Invalid(String),
}

/// One item category a desk can be improved with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Stable id, e.g. "desk_lamp".
    pub id: String,
    /// Result key and shopper-facing name, e.g. "데스크 조명".
    pub display: String,
    /// Shopping search query.
    pub query: String,
    /// Words for the prompt, e.g. "a minimalist desk lamp".
    pub phrase: String,
    /// Item names from vision that mean this category is already on the desk.
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Items one of which must be on the desk for this category to make sense (empty: always).
    #[serde(default)]
    pub needs_any: Vec<String>,
    /// Words in a user's prompt that name this category.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Brands (ids of `[[brands]]`) whose Korean name goes before `query` when the photo's text
    /// shows one of them: accessories of the brand the user already has.
    #[serde(default)]
    pub brands: Vec<String>,
}

/// A brand the text read in a photo may name (`[[brands]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Brand {
    /// Stable id, e.g. "logitech".
    pub id: String,
    /// The name as it is printed and as captions give it, e.g. "Logitech".
    pub name: String,
    /// The Korean name shopping searches with, e.g. "로지텍".
    pub name_ko: String,
    /// Other ways it is printed, e.g. "Logi".
    #[serde(default)]
    pub spellings: Vec<String>,
}

impl Brand {
    /// Whether `text` names this brand: its name or a spelling, any case, where a word starts, and
    /// not followed by lower-case letters of the same word ("Applesauce" is no Apple, but OCR's
    /// "DellUltraSharp", "LGgram" and "DELLU2720Q" are Dell, LG and Dell).
    pub fn named_in(&self, text: &str) -> bool {
        std::iter::once(&self.name).chain(&self.spellings).any(|spelling| names(text, spelling))
    }
}

fn names(text: &str, spelling: &str) -> bool {
    let (lower, wanted) = (text.to_lowercase(), spelling.to_lowercase());
    if wanted.is_empty() || lower.len() != text.len() {
        return false;
    }
    lower.match_indices(&wanted).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let last = text[..at + wanted.len()].chars().next_back();
        let after = text[at + wanted.len()..].chars().next();
        let starts = !before.is_some_and(char::is_alphabetic);
        let ends = match (last, after) {
            (Some(last), Some(next)) => !(last.is_lowercase() && next.is_lowercase()),
            _ => true,
        };
        starts && ends
    })
}

/// Prompt templates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTemplates {
    /// Template when starting from a photo.
    pub img2img: String,
    /// Template for text-only requests.
    pub txt2img: String,
    /// Default negative prompt.
    pub negative: String,
}

/// The whole settings file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Most categories recommended per task.
    pub max_categories: usize,
    /// Categories for text-only requests that name none.
    pub default_categories: Vec<String>,
    /// Prompt templates.
    pub prompt: PromptTemplates,
    /// The category table, in order of preference.
    pub categories: Vec<Category>,
    /// The ControlNet guidance desk photos get by default; none for plain img2img.
    #[serde(default)]
    pub control: Option<ControlSettings>,
    /// What each model's class names mean as items; the built-in table when absent.
    #[serde(default = "ItemTable::builtin")]
    pub items: ItemTable,
    /// Brands the photo's text may name.
    #[serde(default)]
    pub brands: Vec<Brand>,
}

/// The default control of desk photos (`[control]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// The control type; applies only when the model has a ControlNet of this type.
    #[serde(rename = "type")]
    pub control_type: String,
    /// Residual scale, in [0, 2].
    pub scale: f64,
    /// Guidance window start, in [0, 1).
    pub guidance_start: f64,
    /// Guidance window end, in (0, 1].
    pub guidance_end: f64,
    /// img2img strength with this control, when the request sets none.
    pub strength: f64,
    /// Canny's lower threshold.
    pub low_threshold: f64,
    /// Canny's upper threshold.
    pub high_threshold: f64,
}

impl ControlSettings {
    fn check(&self) -> Result<(), String> {
        let ControlSettings { scale, guidance_start: start, guidance_end: end, strength, .. } = *self;
        if !(0.0..=f64::from(MAX_CONTROL_SCALE)).contains(&scale) {
            return Err(format!("scale must be between 0 and {MAX_CONTROL_SCALE}"));
        }
        if !is_guidance_window(start, end) {
            return Err("guidance_start and guidance_end need 0 <= start < end <= 1".into());
        }
        if !(strength > 0.0 && strength <= 1.0) {
            return Err("strength must be in (0, 1]".into());
        }
        if !(0.0 <= self.low_threshold && self.low_threshold <= self.high_threshold) {
            return Err("thresholds need 0 <= low_threshold <= high_threshold".into());
        }
        Ok(())
    }
}

/// What the prompt is built from.
pub struct PromptInput<'a> {
    /// Caption of the photo; none for text-only requests.
    pub caption: Option<&'a str>,
    /// The categories to add.
    pub categories: &'a [&'a Category],
    /// The user's own words.
    pub user_text: Option<&'a str>,
    /// Trigger words of the LoRA adapters in use.
    pub triggers: &'a [String],
}

impl PipelineSettings {
    /// The built-in settings, or the file at `path`.
    pub fn load(path: Option<&Path>) -> Result<PipelineSettings, PlanError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| PlanError::Read { path: path.display().to_string(), source })?,
            None => DEFAULT_PIPELINE_CONFIG.to_string(),
        };
        let settings: PipelineSettings = toml::from_str(&text)?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), PlanError> {
        let mut ids = BTreeSet::new();
        for category in &self.categories {
            if !ids.insert(category.id.as_str()) {
                return Err(PlanError::Invalid(format!("category '{}' appears twice", category.id)));
            }
        }
        if let Some(unknown) = self.default_categories.iter().find(|id| !ids.contains(id.as_str())) {
            return Err(PlanError::Invalid(format!("default category '{unknown}' is not in the table")));
        }
        let brands: BTreeSet<&str> = self.brands.iter().map(|b| b.id.as_str()).collect();
        if brands.len() != self.brands.len() {
            return Err(PlanError::Invalid("a brand id appears twice".into()));
        }
        for category in &self.categories {
            if let Some(unknown) = category.brands.iter().find(|id| !brands.contains(id.as_str())) {
                return Err(PlanError::Invalid(format!(
                    "category '{}' names brand '{unknown}', which is not in [[brands]]",
                    category.id
                )));
            }
        }
        if self.max_categories == 0 {
            return Err(PlanError::Invalid("max_categories must be at least 1".into()));
        }
        if let Some(control) = &self.control {
            control.check().map_err(|reason| PlanError::Invalid(format!("[control]: {reason}")))?;
        }
        Ok(())
    }

    /// The brand `text` names, if any (the first in the table when it names several).
    pub fn brand_in(&self, text: &str) -> Option<&Brand> {
        self.brands.iter().find(|brand| brand.named_in(text))
    }

    /// The category's shopping query, after the Korean name of the first brand of `seen` (in the
    /// order the photo shows them) the category lists.
    pub fn branded_query(&self, category: &Category, seen: &[&Brand]) -> String {
        match seen.iter().find(|brand| category.brands.contains(&brand.id)) {
            Some(brand) => format!("{} {}", brand.name_ko, category.query),
            None => category.query.clone(),
        }
    }

    /// The category with this id.
    pub fn category(&self, id: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    /// Categories to recommend: those the user's text names first, then (with a photo) what is
    /// missing from the desk, then upgrades of what is there; text-only requests that name nothing
    /// get the defaults. At most `max_categories`.
    pub fn plan(&self, detected: Option<&[String]>, user_text: Option<&str>) -> Vec<&Category> {
        self.plan_with_reasons(detected, user_text).into_iter().map(|(category, _)| category).collect()
    }

    /// [`PipelineSettings::plan`], each category with why it is there: `asked` when the text names
    /// it, `upgrade` when the desk has one (its evidence was detected), else `missing`.
    pub fn plan_with_reasons(
        &self,
        detected: Option<&[String]>,
        user_text: Option<&str>,
    ) -> Vec<(&Category, RecommendationReason)> {
        let mut chosen: Vec<(&Category, RecommendationReason)> = Vec::new();
        fn push<'a>(
            category: &'a Category,
            reason: RecommendationReason,
            chosen: &mut Vec<(&'a Category, RecommendationReason)>,
        ) {
            if !chosen.iter().any(|(c, _)| c.id == category.id) {
                chosen.push((category, reason));
            }
        }
        for category in self.named_in(user_text.unwrap_or_default()) {
            push(category, RecommendationReason::Asked, &mut chosen);
        }
        match detected {
            Some(items) => {
                let has = |names: &[String]| names.iter().any(|n| items.contains(n));
                let usable = |c: &&Category| c.needs_any.is_empty() || has(&c.needs_any);
                for category in self.categories.iter().filter(usable).filter(|c| !has(&c.evidence)) {
                    push(category, RecommendationReason::Missing, &mut chosen);
                }
                for category in self.categories.iter().filter(usable).filter(|c| has(&c.evidence)) {
                    push(category, RecommendationReason::Upgrade, &mut chosen);
                }
            }
            None if chosen.is_empty() => {
                for id in &self.default_categories {
                    if let Some(category) = self.category(id) {
                        push(category, RecommendationReason::Missing, &mut chosen);
                    }
                }
            }
            None => {}
        }
        chosen.truncate(self.max_categories);
        chosen
    }

    /// Categories the text names, in the order it names them. Longer keywords win over the shorter
    /// ones inside them ("monitor light" is not also "monitor").
    fn named_in(&self, text: &str) -> Vec<&Category> {
        let mut text = text.to_lowercase();
        let mut keywords: Vec<(String, &Category)> = self
            .categories
            .iter()
            .flat_map(|c| c.keywords.iter().map(move |k| (k.to_lowercase(), c)))
            .collect();
        keywords.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        let mut found: Vec<(usize, &Category)> = Vec::new();
        for (keyword, category) in keywords {
            while let Some(at) = find_word(&text, &keyword) {
                found.push((at, category));
                text.replace_range(at..at + keyword.len(), &" ".repeat(keyword.len()));
            }
        }
        found.sort_by_key(|(at, _)| *at);
        found.into_iter().map(|(_, c)| c).collect()
    }

    /// The prompt for the diffusion model.
    pub fn prompt(&self, input: &PromptInput<'_>) -> String {
        let phrases: Vec<&str> = input.categories.iter().map(|c| c.phrase.as_str()).collect();
        let items =
            if phrases.is_empty() { "a few well-chosen accessories".to_string() } else { and_list(&phrases) };
        let template = if input.caption.is_some() { &self.prompt.img2img } else { &self.prompt.txt2img };
        let text = template
            .replace("{caption}", input.caption.unwrap_or("a desk"))
            .replace("{items}", &items)
            .replace("{user}", input.user_text.map(str::trim).unwrap_or(""))
            .replace("{triggers}", &input.triggers.join(", "));
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// "a", "a and b", "a, b and c".
pub fn and_list(parts: &[&str]) -> String {
    match parts {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Where `needle` first occurs in `text` as whole words (Korean words may carry particles).
fn find_word(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.match_indices(needle).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + needle.len()..].chars().next();
        let ascii_word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        // Latin keywords must stand alone ("mat" is not in "format"); Hangul may be followed by a particle.
        !ascii_word(before) && (!needle.is_ascii() || !ascii_word(after))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PipelineSettings {
        PipelineSettings::load(None).expect("built-in settings parse")
    }

    fn ids(categories: &[&Category]) -> Vec<String> {
        categories.iter().map(|c| c.id.clone()).collect()
    }

    #[test]
    fn a_desk_with_a_monitor_is_offered_a_monitor_only_as_an_upgrade() {
        let s = settings();
        let detected = vec!["monitor".to_string(), "keyboard".to_string(), "laptop".to_string()];
        let planned = s.plan_with_reasons(Some(&detected), None);
        assert!(
            planned.iter().all(|(c, r)| c.id != "monitor" || *r == RecommendationReason::Upgrade),
            "{planned:?}"
        );
        assert!(
            planned.iter().all(|(_, r)| *r == RecommendationReason::Missing),
            "three missing kinds come first"
        );
        let asked = s.plan_with_reasons(Some(&detected), Some("a bigger monitor please"));
        assert_eq!((asked[0].0.id.as_str(), asked[0].1), ("monitor", RecommendationReason::Asked));
        let everything: Vec<String> = s.categories.iter().flat_map(|c| c.evidence.clone()).collect();
        let full = s.plan_with_reasons(Some(&everything), None);
        assert!(full.iter().all(|(_, r)| *r == RecommendationReason::Upgrade), "{full:?}");
    }

    #[test]
    fn missing_items_come_before_upgrades() {
        let s = settings();
        let detected = vec!["laptop".to_string(), "mug".to_string(), "mouse".to_string()];
        let plan = s.plan(Some(&detected), None);
        assert_eq!(ids(&plan), ["keyboard", "monitor", "laptop_stand"]);
        assert!(
            !ids(&plan).contains(&"mouse".to_string()),
            "present items are upgrades, after the missing ones"
        );
    }

    #[test]
    fn a_monitor_light_needs_a_monitor() {
        let s = settings();
        let plan = s.plan(Some(&["laptop".to_string()]), Some("I want a monitor light"));
        assert_eq!(plan[0].id, "monitor_light", "named by the user, so it comes first");
        let plan = s.plan(Some(&["laptop".to_string()]), None);
        assert!(!ids(&plan).contains(&"monitor_light".to_string()));
    }

    #[test]
    fn text_only_requests_use_named_categories_or_defaults() {
        let s = settings();
        assert_eq!(ids(&s.plan(None, Some("cozy desk with a plant and a 스탠드"))), ["plant", "desk_lamp"]);
        assert_eq!(ids(&s.plan(None, Some("minimal wooden desk setup"))), s.default_categories);
        assert_eq!(
            ids(&s.plan(None, Some("format"))),
            s.default_categories,
            "'mat' inside a word is no keyword"
        );
    }

    #[test]
    fn prompt_follows_the_product_spec() {
        let s = settings();
        let lamp = s.category("desk_lamp").unwrap();
        let plant = s.category("plant").unwrap();
        let prompt = s.prompt(&PromptInput {
            caption: Some("a desk with a laptop and a mug"),
            categories: &[lamp, plant],
            user_text: Some("  warm wooden tones "),
            triggers: &["cozydesk".to_string()],
        });
        assert!(prompt.starts_with("a realistic image of a desk with a laptop and a mug"));
        assert!(prompt.contains("a minimalist desk lamp and a small potted plant"));
        assert!(prompt.contains("aesthetically matches and complements"));
        assert!(prompt.contains("warm wooden tones cozydesk"));
        assert!(!prompt.contains("  "));
        assert!(s.prompt.negative.starts_with("blurry, low resolution, distorted, deformed, people, human"));
    }

    #[test]
    fn brands_are_found_as_words_in_what_is_read() {
        let s = settings();
        let brand = |text: &str| s.brand_in(text).map(|b| b.id.as_str());
        assert_eq!(brand("Logitech G502"), Some("logitech"));
        assert_eq!(brand("DellUltraSharp27"), Some("dell"), "run into the next word, the case changes");
        assert_eq!(brand("LGgram16"), Some("lg"));
        assert_eq!(brand("LG27GP850"), Some("lg"));
        assert_eq!(brand("DELLU2720Q"), Some("dell"), "a model number run into the brand");
        assert_eq!(brand("ASUSROG"), Some("asus"));
        assert_eq!(brand("ALGORITHM"), None, "LG inside a word");
        assert_eq!(brand("Applesauce"), None);
        assert_eq!(brand("SAMSUNG"), Some("samsung"));
        let keyboard = s.category("keyboard").unwrap();
        let (logitech, dell) = (s.brand_in("logitech").unwrap(), s.brand_in("DELL").unwrap());
        assert_eq!(s.branded_query(keyboard, &[dell, logitech]), "로지텍 기계식 키보드");
        assert_eq!(
            s.branded_query(keyboard, &[dell]),
            "기계식 키보드",
            "Dell is not among the keyboard's brands"
        );
    }

    #[test]
    fn broken_settings_are_refused() {
        let text = DEFAULT_PIPELINE_CONFIG
            .replace("default_categories = [\"desk_lamp\"", "default_categories = [\"nope\"");
        let parsed: PipelineSettings = toml::from_str(&text).unwrap();
        assert!(matches!(parsed.check(), Err(PlanError::Invalid(_))));
        let text = DEFAULT_PIPELINE_CONFIG.replacen("brands = [\"logitech\"", "brands = [\"nobody\"", 1);
        let parsed: PipelineSettings = toml::from_str(&text).unwrap();
        assert!(matches!(parsed.check(), Err(PlanError::Invalid(m)) if m.contains("nobody")));
    }
}
