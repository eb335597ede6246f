//! The Naver Shopping search API (`GET /v1/search/shop.json`).
//!
//! Per query: serve from cache while fresh; otherwise wait for a client-side rate-limit slot, ask
//! Naver for the most relevant candidates, keep regular products, drop accessories priced far
//! below the rest, dedupe, and order cheapest first. 5xx and timeouts are retried with jittered
//! backoff; a 429 pauses requests and serves whatever is cached, even if stale.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use reqwest::header::RETRY_AFTER;
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::{
    ApiSecret, DEFAULT_MALL, NaverSort, Offer, ShoppingConfig, ShoppingError, ShoppingProvider, format_won,
    record,
};

const PROVIDER: &str = "naver";
/// Naver's largest `display`.
const MAX_DISPLAY: usize = 100;
/// Queries kept in the cache; the least recently stored go first.
const CACHE_CAPACITY: usize = 1024;
/// Pause after a 429 that carries no Retry-After.
const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);
/// Candidates cheaper than median / this are taken for accessories (a cable in a monitor search).
const ACCESSORY_PRICE_RATIO: u64 = 5;
/// The accessory filter needs enough candidates for the median to mean something.
const ACCESSORY_FILTER_MIN_CANDIDATES: usize = 5;

/// Shopping links from the Naver Shopping search API.
#[derive(Debug)]
pub struct NaverProvider {
    client: reqwest::Client,
    endpoint: Url,
    client_id: String,
    client_secret: ApiSecret,
    sort: NaverSort,
    candidates: usize,
    cache_ttl: Duration,
    attempts: u32,
    retry_backoff: Duration,
    min_interval: Duration,
    cache: Mutex<HashMap<String, CacheEntry>>,
    next_slot: Mutex<Instant>,
    paused_until: Mutex<Option<Instant>>,
    healthy: AtomicBool,
    auth_failure_logged: AtomicBool,
}

#[derive(Debug)]
struct CacheEntry {
    stored: Instant,
    offers: Vec<Offer>,
}

/// Naver's search response (fields we use; the rest are ignored).
#[derive(Debug, Deserialize)]
struct SearchResponse {
    items: Vec<Item>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    title: String,
    link: String,
    #[serde(default)]
    image: String,
    lprice: String,
    #[serde(default)]
    mall_name: String,
    #[serde(default)]
    product_id: String,
    #[serde(default)]
    product_type: String,
    #[serde(default)]
    category3: String,
    #[serde(default)]
    category4: String,
}

/// Naver's error body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    #[serde(default)]
    error_message: String,
    #[serde(default)]
    error_code: String,
}

/// How one HTTP attempt ended.
enum Attempt {
    Offers(Vec<Offer>),
    Retry(ShoppingError),
    Fail(ShoppingError),
    RateLimited(Duration),
}

impl NaverProvider {
    /// A provider with the keys, endpoint, cache and limits in `config`.
    pub fn new(config: &ShoppingConfig) -> Result<Self, ShoppingError> {
        let (Some(client_id), Some(client_secret)) = (&config.naver_client_id, &config.naver_client_secret)
        else {
            return Err(ShoppingError::Config("Naver needs NAVER_CLIENT_ID and NAVER_CLIENT_SECRET".into()));
        };
        let endpoint =
            Url::parse(&config.naver_base_url).and_then(|base| base.join("/v1/search/shop.json")).map_err(
                |e| ShoppingError::Config(format!("--naver-base-url {:?}: {e}", config.naver_base_url)),
            )?;
        if !(config.naver_qps.is_finite() && config.naver_qps > 0.0) {
            return Err(ShoppingError::Config(format!(
                "--naver-qps must be positive, not {}",
                config.naver_qps
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(config.naver_timeout)
            .user_agent(concat!("deskgen/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ShoppingError::Config(e.to_string()))?;
        Ok(NaverProvider {
            client,
            endpoint,
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            sort: config.naver_sort,
            candidates: config.naver_candidates.clamp(1, MAX_DISPLAY),
            cache_ttl: config.naver_cache_ttl,
            attempts: config.naver_attempts.max(1),
            retry_backoff: config.naver_retry_backoff,
            min_interval: Duration::from_secs_f64(1.0 / config.naver_qps),
            cache: Mutex::new(HashMap::new()),
            next_slot: Mutex::new(Instant::now()),
            paused_until: Mutex::new(None),
            healthy: AtomicBool::new(true),
            auth_failure_logged: AtomicBool::new(false),
        })
    }

    fn cached(&self, query: &str, fresh_only: bool) -> Option<Vec<Offer>> {
        let cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = cache.get(query)?;
        (!fresh_only || entry.stored.elapsed() < self.cache_ttl).then(|| entry.offers.clone())
    }

    fn store(&self, query: &str, offers: &[Offer]) {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(query) {
            let oldest = cache.iter().min_by_key(|(_, entry)| entry.stored).map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                cache.remove(&oldest);
            }
        }
        cache.insert(query.to_owned(), CacheEntry { stored: Instant::now(), offers: offers.to_vec() });
    }

    fn paused(&self) -> bool {
        let paused_until = self.paused_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        paused_until.is_some_and(|until| Instant::now() < until)
    }

    fn pause(&self, pause: Duration) {
        *self.paused_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(Instant::now() + pause);
    }

    /// Waits for this request's slot so the process stays under `--naver-qps`.
    async fn wait_for_slot(&self) {
        let slot = {
            let mut next = self.next_slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + self.min_interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    /// What to serve while Naver is rate limiting us: stale results if any, else the error.
    fn rate_limited(&self, query: &str) -> Result<Vec<Offer>, ShoppingError> {
        match self.cached(query, false) {
            Some(offers) => {
                record(PROVIDER, "stale");
                tracing::warn!(query, "Naver Shopping rate limit; serving cached results");
                Ok(offers)
            }
            None => {
                record(PROVIDER, "rate_limited");
                tracing::warn!(query, "Naver Shopping rate limit; nothing cached");
                Err(ShoppingError::RateLimited { query: query.to_owned() })
            }
        }
    }

    async fn attempt(&self, query: &str) -> Attempt {
        self.wait_for_slot().await;
        let started = Instant::now();
        let sent = self
            .client
            .get(self.endpoint.clone())
            .query(&[
                ("query", query),
                ("display", &self.candidates.to_string()),
                ("start", "1"),
                ("sort", self.sort.as_str()),
                ("exclude", "used:rental:cbshop"),
            ])
            .header("X-Naver-Client-Id", &self.client_id)
            .header("X-Naver-Client-Secret", self.client_secret.expose())
            .send()
            .await;
        metrics::histogram!("deskgen_shopping_request_duration_seconds", "provider" => PROVIDER)
            .record(started.elapsed().as_secs_f64());
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(ShoppingError::Timeout { attempts: self.attempts });
            }
            Err(e) => return Attempt::Retry(ShoppingError::Transport(crate::fetch::error_chain(&e))),
        };
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let pause = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_RATE_LIMIT_PAUSE, Duration::from_secs);
            return Attempt::RateLimited(pause);
        }
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Attempt::Retry(ShoppingError::Transport(crate::fetch::error_chain(&e))),
        };
        if status.is_success() {
            return match serde_json::from_slice::<SearchResponse>(&body) {
                Ok(parsed) => Attempt::Offers(rank(parsed.items)),
                Err(e) => Attempt::Fail(ShoppingError::Malformed(e.to_string())),
            };
        }
        let ErrorBody { error_message: message, error_code: code } =
            serde_json::from_slice(&body).unwrap_or_default();
        let status = status.as_u16();
        match status {
            401 | 403 => Attempt::Fail(ShoppingError::Unauthorized { status, code, message }),
            500.. => Attempt::Retry(ShoppingError::Upstream { status, code, message }),
            _ => Attempt::Fail(ShoppingError::Upstream { status, code, message }),
        }
    }

    fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponential = self.retry_backoff.saturating_mul(1 << failed_attempts.saturating_sub(1).min(16));
        exponential / 2 + exponential.mul_f64(rand::rng().random_range(0.0..0.5))
    }

    fn note_auth_failure(&self, error: &ShoppingError) {
        self.healthy.store(false, Ordering::Relaxed);
        // Every search would log the same refusal; once is enough until keys work again.
        if !self.auth_failure_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(%error, "Naver Shopping refused the API keys; check NAVER_CLIENT_ID / NAVER_CLIENT_SECRET");
        }
    }
}

#[async_trait]
impl ShoppingProvider for NaverProvider {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    async fn search(&self, query: &str, display: usize) -> Result<Vec<Offer>, ShoppingError> {
        let query = query.split_whitespace().collect::<Vec<_>>().join(" ");
        if query.is_empty() || display == 0 {
            return Ok(Vec::new());
        }
        let take = |mut offers: Vec<Offer>| {
            offers.truncate(display);
            offers
        };
        if let Some(offers) = self.cached(&query, true) {
            record(PROVIDER, "cache_hit");
            return Ok(take(offers));
        }
        if self.paused() {
            return self.rate_limited(&query).map(take);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(&query).await {
                Attempt::Offers(offers) => {
                    record(PROVIDER, "ok");
                    self.healthy.store(true, Ordering::Relaxed);
                    self.auth_failure_logged.store(false, Ordering::Relaxed);
                    self.store(&query, &offers);
                    return Ok(take(offers));
                }
                Attempt::RateLimited(pause) => {
                    tracing::warn!(?pause, "Naver Shopping answered 429; pausing requests");
                    self.pause(pause);
                    return self.rate_limited(&query).map(take);
                }
                Attempt::Fail(error) => {
                    if let ShoppingError::Unauthorized { .. } = error {
                        record(PROVIDER, "unauthorized");
                        self.note_auth_failure(&error);
                    } else {
                        record(PROVIDER, "error");
                        tracing::warn!(query, %error, "Naver Shopping search failed");
                    }
                    return Err(error);
                }
                Attempt::Retry(error) if attempt >= self.attempts => {
                    record(PROVIDER, "error");
                    tracing::warn!(query, attempt, %error, "Naver Shopping search failed; giving up");
                    return Err(match error {
                        ShoppingError::Timeout { .. } => ShoppingError::Timeout { attempts: attempt },
                        other => other,
                    });
                }
                Attempt::Retry(error) => {
                    let delay = self.backoff(attempt);
                    tracing::info!(query, attempt, ?delay, %error, "Naver Shopping search failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Turns Naver's candidates into offers: regular products preferred, accessories and duplicates
/// dropped, cheapest first.
fn rank(items: Vec<Item>) -> Vec<Offer> {
    let priced: Vec<(u8, Item, u64)> = items
        .into_iter()
        .filter_map(|item| {
            let price = item.lprice.trim().parse::<u64>().ok().filter(|&price| price > 0)?;
            let product_type = item.product_type.trim().parse::<u8>().unwrap_or(0);
            Some((product_type, item, price))
        })
        .collect();
    // Types 1–3 are regular products; 4–6 used, 7–9 discontinued, 10–12 pre-order.
    let has_regular = priced.iter().any(|(product_type, ..)| (1..=3).contains(product_type));
    let mut kept: Vec<(Item, u64)> = priced
        .into_iter()
        .filter(|(product_type, ..)| !has_regular || (1..=3).contains(product_type))
        .map(|(_, item, price)| (item, price))
        .collect();
    if kept.len() >= ACCESSORY_FILTER_MIN_CANDIDATES {
        let mut prices: Vec<u64> = kept.iter().map(|(_, price)| *price).collect();
        prices.sort_unstable();
        let floor = prices[prices.len() / 2] / ACCESSORY_PRICE_RATIO;
        kept.retain(|(_, price)| *price >= floor);
    }
    // Stable: equal prices keep Naver's relevance order.
    kept.sort_by_key(|(_, price)| *price);
    let mut seen = HashSet::new();
    kept.into_iter()
        .filter(|(item, _)| item.product_id.is_empty() || seen.insert(item.product_id.clone()))
        .map(|(item, price)| Offer {
            title: clean_title(&item.title),
            price: format_won(price),
            mall: if item.mall_name.trim().is_empty() { DEFAULT_MALL.to_owned() } else { item.mall_name },
            category3: item.category3,
            category4: item.category4,
            link: item.link,
            image: item.image,
            price_won: price,
        })
        .collect()
}

/// Naver marks query matches with `<b>…</b>` and HTML-escapes titles; results want plain text.
fn clean_title(title: &str) -> String {
    unescape_html(&title.replace("<b>", "").replace("</b>", "")).trim().to_owned()
}

/// Decodes the character references Naver emits: the common named ones and numeric ones.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let decoded = rest
            .find(';')
            .filter(|&end| end <= 10)
            .and_then(|end| Some((decode_entity(&rest[1..end])?, end)));
        match decoded {
            Some((character, end)) => {
                out.push(character);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entity(name: &str) -> Option<char> {
    let named = match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        _ => {
            let number = name.strip_prefix('#')?;
            let code = match number.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => number.parse().ok()?,
            };
            return char::from_u32(code);
        }
    };
    Some(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_lose_markup_and_entities() {
        assert_eq!(
            clean_title("<b>로지텍</b> M650 &amp; 패드 &quot;블랙&quot; &#39;정품&#x27;"),
            "로지텍 M650 & 패드 \"블랙\" '정품'"
        );
        assert_eq!(unescape_html("AT&T &bogus; &"), "AT&T &bogus; &");
        assert_eq!(unescape_html("&lt;b&gt;"), "<b>");
    }
}
