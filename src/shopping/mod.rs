//! Shopping links for recommended items: the Naver Shopping search API, or a local catalog file.

mod catalog;
mod naver;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::core::Offer;
pub use catalog::CatalogProvider;
pub use naver::NaverProvider;

/// Mall name shown when Naver leaves it empty: the offer is Naver's own price comparison.
pub const DEFAULT_MALL: &str = "네이버";

/// Formats a price the way results show it: "21990원".
pub fn format_won(won: u64) -> String {
    format!("{won}원")
}

/// A source of product offers.
#[async_trait]
pub trait ShoppingProvider: Send + Sync {
    /// "naver" or "catalog", for logs, metrics and `/info`.
    fn name(&self) -> &'static str;

    /// Up to `display` offers for `query` (a Korean shopping query such as "무선 마우스"),
    /// cheapest first among the relevant ones.
    async fn search(&self, query: &str, display: usize) -> Result<Vec<Offer>, ShoppingError>;

    /// False after the provider was refused (bad credentials); health checks report it.
    fn healthy(&self) -> bool {
        true
    }
}

/// Which shopping provider to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// Naver when both API keys are set, otherwise the catalog.
    Auto,
    /// The Naver Shopping search API (keys required).
    Naver,
    /// The catalog file.
    Catalog,
}

/// Naver's result order before we re-sort by price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaverSort {
    /// Relevance: the candidates are the most relevant items, then the cheapest of them win.
    Sim,
    /// Ascending price: cheapest first, relevance left to Naver's matching alone.
    Asc,
}

impl NaverSort {
    /// The value of Naver's `sort` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            NaverSort::Sim => "sim",
            NaverSort::Asc => "asc",
        }
    }
}

/// A secret string that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiSecret(String);

impl ApiSecret {
    /// The secret itself, to put in a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for ApiSecret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(ApiSecret(text.to_owned()))
    }
}

impl fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiSecret(***)")
    }
}

/// Where shopping links come from.
#[derive(Debug, Clone)]
pub struct ShoppingConfig {
    /// Shopping source: auto (Naver when NAVER_CLIENT_ID and NAVER_CLIENT_SECRET are set, else the catalog), naver or catalog.
    pub provider: ProviderChoice,
    /// Catalog JSON file (default: the built-in sample catalog).
    pub catalog: Option<PathBuf>,
    /// Naver Open API client id.
    pub naver_client_id: Option<String>,
    /// Naver Open API client secret.
    pub naver_client_secret: Option<ApiSecret>,
    /// Base URL of the Naver Open API.
    pub naver_base_url: String,
    /// Order Naver returns candidates in before they are re-sorted by price: sim or asc.
    pub naver_sort: NaverSort,
    /// Candidates asked for per query (at most 100); the cheapest relevant ones are returned.
    pub naver_candidates: usize,
    /// Most Naver requests per second from this process.
    pub naver_qps: f64,
    /// How long a query's results are reused.
    pub naver_cache_ttl: Duration,
    /// Time allowed for one Naver request.
    pub naver_timeout: Duration,
    /// Attempts per query when Naver fails with 5xx or times out.
    pub naver_attempts: u32,
    /// Delay before the first retry; it doubles with every further attempt (with jitter).
    pub naver_retry_backoff: Duration,
}

impl Default for ShoppingConfig {
    fn default() -> Self {
        ShoppingConfig {
            provider: ProviderChoice::Auto,
            catalog: None,
            naver_client_id: None,
            naver_client_secret: None,
            naver_base_url: "https://openapi.naver.com".into(),
            naver_sort: NaverSort::Sim,
            naver_candidates: 40,
            naver_qps: 8.0,
            naver_cache_ttl: Duration::from_secs(3600),
            naver_timeout: Duration::from_secs(5),
            naver_attempts: 3,
            naver_retry_backoff: Duration::from_millis(200),
        }
    }
}

/// Shopping failures.
#[derive(Debug, thiserror::Error)]
pub enum ShoppingError {
    /// Naver refused the API keys (401/403).
    #[error("Naver Shopping refused the API keys (HTTP {status}, {code}: {message})")]
    Unauthorized { status: u16, code: String, message: String },
    /// Naver is rate limiting us and nothing is cached for the query.
    #[error("Naver Shopping rate limit reached and nothing cached for {query:?}")]
    RateLimited { query: String },
    /// Naver answered with an error status.
    #[error("Naver Shopping answered HTTP {status} ({code}: {message})")]
    Upstream { status: u16, code: String, message: String },
    /// The request did not finish in time, on every attempt.
    #[error("Naver Shopping timed out after {attempts} attempt(s)")]
    Timeout { attempts: u32 },
    /// Connecting to Naver failed on every attempt.
    #[error("cannot reach Naver Shopping: {0}")]
    Transport(String),
    /// Naver answered 200 with a body we cannot read.
    #[error("malformed Naver Shopping response: {0}")]
    Malformed(String),
    /// The catalog file cannot be read or parsed.
    #[error("catalog {source_name}: {reason}")]
    Catalog { source_name: String, reason: String },
    /// The configuration is incomplete or invalid.
    #[error("shopping misconfigured: {0}")]
    Config(String),
}

/// The provider the configuration asks for.
pub fn build(config: &ShoppingConfig) -> Result<Arc<dyn ShoppingProvider>, ShoppingError> {
    let has_keys = config.naver_client_id.as_deref().is_some_and(|id| !id.is_empty())
        && config.naver_client_secret.as_ref().is_some_and(|secret| !secret.expose().is_empty());
    let use_naver = match config.provider {
        ProviderChoice::Naver if !has_keys => {
            return Err(ShoppingError::Config(
                "--shopping-provider naver needs NAVER_CLIENT_ID and NAVER_CLIENT_SECRET".into(),
            ));
        }
        ProviderChoice::Naver => true,
        ProviderChoice::Auto => has_keys,
        ProviderChoice::Catalog => false,
    };
    if use_naver {
        return Ok(Arc::new(NaverProvider::new(config)?));
    }
    let catalog = match &config.catalog {
        Some(path) => CatalogProvider::from_file(path)?,
        None => CatalogProvider::sample(),
    };
    tracing::info!(source = catalog.source_name(), "shopping links come from a catalog file");
    Ok(Arc::new(catalog))
}

/// Counts a search: `deskgen_shopping_requests_total{provider,outcome}`.
fn record(provider: &'static str, outcome: &'static str) {
    metrics::counter!("deskgen_shopping_requests_total", "provider" => provider, "outcome" => outcome)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_serialize_exactly_seven_fields() {
        let offer = Offer {
            title: "로지텍 M650".into(),
            price: format_won(21990),
            mall: DEFAULT_MALL.into(),
            category3: "마우스".into(),
            category4: "무선마우스".into(),
            link: "https://example.com".into(),
            image: String::new(),
            price_won: 21990,
        };
        let json = serde_json::to_value(&offer).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["category3", "category4", "image", "link", "mall", "price", "title"]);
        assert_eq!(json["price"], "21990원");
        let back: Offer = serde_json::from_value(json).unwrap();
        assert_eq!(back, offer);
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let config = ShoppingConfig {
            naver_client_secret: Some("hunter2".parse().unwrap()),
            ..ShoppingConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
