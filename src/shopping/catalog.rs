//! Offers from a JSON catalog file: the default when no Naver keys are configured.
//!
//! The file maps Naver-style queries to items:
//! `{"sample_data": true, "queries": {"무선 마우스": [{"title": …, "price": 21990, "mall": …,
//! "category3": …, "category4": …, "link": …, "image": …}]}}`.

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use serde::Deserialize;

use super::{DEFAULT_MALL, Offer, ShoppingError, ShoppingProvider, format_won, record};

/// The sample catalog shipped with the binary.
const SAMPLE_CATALOG: &str = include_str!("../../data/catalog.json");

const PROVIDER: &str = "catalog";

/// Offers read from a catalog file, indexed by query.
#[derive(Debug, Clone)]
pub struct CatalogProvider {
    source_name: String,
    sample_data: bool,
    queries: HashMap<String, Vec<Offer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    sample_data: bool,
    #[serde(default, rename = "description")]
    _description: String,
    queries: HashMap<String, Vec<CatalogItem>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogItem {
    title: String,
    price: u64,
    #[serde(default)]
    mall: String,
    category3: String,
    #[serde(default)]
    category4: String,
    link: String,
    #[serde(default)]
    image: String,
}

impl CatalogProvider {
    /// The built-in sample catalog (illustrative items and prices, not live data).
    pub fn sample() -> Self {
        // The sample is compiled in and checked by the tests, so it always parses.
        CatalogProvider::from_json(SAMPLE_CATALOG, "built-in sample catalog")
            .unwrap_or_else(|e| panic!("the built-in catalog is invalid: {e}"))
    }

    /// Reads a catalog file.
    pub fn from_file(path: &Path) -> Result<Self, ShoppingError> {
        let text = std::fs::read_to_string(path).map_err(|e| ShoppingError::Catalog {
            source_name: path.display().to_string(),
            reason: e.to_string(),
        })?;
        CatalogProvider::from_json(&text, &path.display().to_string())
    }

    /// Parses catalog JSON; `source_name` names it in errors and logs.
    pub fn from_json(text: &str, source_name: &str) -> Result<Self, ShoppingError> {
        let file: CatalogFile = serde_json::from_str(text).map_err(|e| ShoppingError::Catalog {
            source_name: source_name.to_owned(),
            reason: e.to_string(),
        })?;
        let queries = file
            .queries
            .into_iter()
            .map(|(query, items)| {
                let mut offers: Vec<Offer> = items.into_iter().map(CatalogItem::into_offer).collect();
                offers.sort_by_key(|offer| offer.price_won);
                (normalize_query(&query), offers)
            })
            .collect();
        Ok(CatalogProvider { source_name: source_name.to_owned(), sample_data: file.sample_data, queries })
    }

    /// Where the catalog came from: a path, or the built-in sample.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Whether the file declares itself sample data (`"sample_data": true`).
    pub fn is_sample_data(&self) -> bool {
        self.sample_data
    }

    /// The queries the catalog has items for.
    pub fn queries(&self) -> impl Iterator<Item = &str> {
        self.queries.keys().map(String::as_str)
    }
}

impl CatalogItem {
    fn into_offer(self) -> Offer {
        Offer {
            title: self.title,
            price: format_won(self.price),
            mall: if self.mall.trim().is_empty() { DEFAULT_MALL.to_owned() } else { self.mall },
            category3: self.category3,
            category4: self.category4,
            link: self.link,
            image: self.image,
            price_won: self.price,
        }
    }
}

/// Queries match regardless of spacing: "무선마우스" finds "무선 마우스".
fn normalize_query(query: &str) -> String {
    query.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect()
}

#[async_trait]
impl ShoppingProvider for CatalogProvider {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    async fn search(&self, query: &str, display: usize) -> Result<Vec<Offer>, ShoppingError> {
        let offers = self.queries.get(&normalize_query(query));
        record(PROVIDER, if offers.is_some() { "ok" } else { "no_match" });
        Ok(offers.map(|offers| offers.iter().take(display).cloned().collect()).unwrap_or_default())
    }
}
