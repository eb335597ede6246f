//! Signed webhook delivery (Standard Webhooks), off the caller's path.
//!
//! [`WebhookSender::enqueue`] only checks the URL and queues the message; `webhook_delivery_task`
//! posts it, retrying 408, 429, 5xx, timeouts and connection failures on a backoff schedule with
//! jitter (or the receiver's Retry-After). Redirects and other 4xx are final, and 410 Gone stops
//! all deliveries to that URL. Every attempt is signed afresh:
//! `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`, one signature
//! per active secret so receivers can rotate keys.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fetch::{FetchError, UrlPolicy, error_chain, refusal_inside};

/// Prefix of Standard Webhooks secrets.
const SECRET_PREFIX: &str = "whsec_";
/// Progress events for one task are sent at most this often (2 per second).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// A receiver's Retry-After is honoured up to this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Progress throttle entries are pruned once there are this many.
const THROTTLE_PRUNE_AT: usize = 4096;

/// How webhooks are signed and delivered.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Signing secret(s), `whsec_<base64>`; comma-separated or repeated, every one signs (key rotation).
    pub secrets: Vec<WebhookSecret>,
    /// Delays before each retry, comma-separated; its length is the number of retries.
    pub retry_schedule: Vec<Duration>,
    /// Time allowed for one delivery attempt.
    pub timeout: Duration,
    /// Most deliveries pending at once (queued or waiting to retry); more are refused.
    pub queue_capacity: usize,
    /// Most delivery attempts in flight at once.
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secrets: Vec::new(),
            retry_schedule: [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec(),
            timeout: Duration::from_secs(15),
            queue_capacity: 1024,
            concurrency: 16,
        }
    }
}

/// A webhook signing key: the bytes after `whsec_`, base64-decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// A secret from raw key bytes.
    pub fn from_bytes(key: Vec<u8>) -> Self {
        WebhookSecret(key)
    }

    /// The `v1,<base64>` signature of one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl FromStr for WebhookSecret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let encoded = text.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        match BASE64.decode(encoded) {
            Ok(key) if !key.is_empty() => Ok(WebhookSecret(key)),
            Ok(_) => Err("webhook secret is empty".into()),
            // Never echo the secret itself.
            Err(e) => Err(format!("webhook secret is not whsec_<base64>: {e}")),
        }
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// The events a client can subscribe to with `webhook_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// The task left the queue and started processing.
    Start,
    /// A processing step finished (throttled to 2 per second per task).
    Progress,
    /// The task finished: done, failed or canceled.
    Completed,
}

impl WebhookEvent {
    /// The event's name in `webhook_events`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Start => "start",
            WebhookEvent::Progress => "progress",
            WebhookEvent::Completed => "completed",
        }
    }

    /// Whether a request that asked for `requested` events wants this one; an empty list means all.
    pub fn wanted_by(self, requested: &[String]) -> bool {
        requested.is_empty() || requested.iter().any(|name| name.trim().eq_ignore_ascii_case(self.as_str()))
    }
}

impl FromStr for WebhookEvent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "start" => Ok(WebhookEvent::Start),
            "progress" => Ok(WebhookEvent::Progress),
            "completed" => Ok(WebhookEvent::Completed),
            _ => Err(format!("unknown webhook event {text:?} (expected start, progress or completed)")),
        }
    }
}

/// Why a webhook could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL is malformed, not https, or points at a blocked address.
    #[error("webhook URL refused: {0}")]
    Url(#[from] FetchError),
    /// An earlier delivery got 410 Gone from this URL.
    #[error("webhook URL {url} answered 410 Gone earlier and is disabled")]
    Disabled { url: String },
    /// Too many deliveries pending.
    #[error("webhook queue is full")]
    QueueFull,
    /// The delivery task has stopped (shutdown).
    #[error("webhook delivery has stopped")]
    Stopped,
    /// The body could not be serialized.
    #[error("cannot serialize webhook body: {0}")]
    Body(#[from] serde_json::Error),
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered { attempts: u32, status: u16 },
    /// A final error, or every retry failed.
    Failed { attempts: u32, reason: String },
    /// The receiver answered 410 Gone (now or on an earlier delivery); the URL is disabled.
    Disabled { attempts: u32 },
    /// Shutdown came before the delivery finished.
    Dropped,
}

impl DeliveryOutcome {
    fn label(&self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered { .. } => "delivered",
            DeliveryOutcome::Failed { .. } => "failed",
            DeliveryOutcome::Disabled { .. } => "disabled",
            DeliveryOutcome::Dropped => "dropped",
        }
    }
}

/// A queued delivery; await [`Receipt::outcome`] to learn how it ended, or drop it.
#[derive(Debug)]
pub struct Receipt {
    /// The `webhook-id` header, the same on every attempt.
    pub webhook_id: String,
    outcome: oneshot::Receiver<DeliveryOutcome>,
}

impl Receipt {
    /// Waits until the delivery succeeded or gave up.
    pub async fn outcome(self) -> DeliveryOutcome {
        self.outcome.await.unwrap_or(DeliveryOutcome::Dropped)
    }
}

/// Queues webhooks for `webhook_delivery_task`. Cheap to clone.
#[derive(Clone)]
pub struct WebhookSender {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Delivery>,
}

struct Shared {
    policy: UrlPolicy,
    client: reqwest::Client,
    secrets: Vec<WebhookSecret>,
    retry_schedule: Vec<Duration>,
    pending: Arc<Semaphore>,
    in_flight: Semaphore,
    disabled: Mutex<HashSet<String>>,
    last_progress: Mutex<HashMap<String, Instant>>,
}

struct Delivery {
    id: String,
    url: Url,
    body: Bytes,
    /// The trace of the span that queued it (the task's), when traces are exported.
    trace: Option<opentelemetry::Context>,
    done: oneshot::Sender<DeliveryOutcome>,
    _pending: OwnedSemaphorePermit,
}

/// How one POST ended.
enum AttemptResult {
    Delivered(u16),
    Gone,
    Final(String),
    Retry { reason: String, retry_after: Option<Duration> },
}

impl WebhookSender {
    /// Starts `webhook_delivery_task`, which runs until `shutdown` is cancelled, then gives up
    /// on pending retries and waits for attempts in flight. Await the handle to know it is done.
    pub fn spawn(
        config: &WebhookConfig,
        policy: UrlPolicy,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), WebhookError> {
        let client = policy
            .client_builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| FetchError::Client(error_chain(&e)))?;
        if config.secrets.is_empty() {
            tracing::warn!("no --webhook-secret configured: webhooks are sent unsigned");
        }
        let shared = Arc::new(Shared {
            policy,
            client,
            secrets: config.secrets.clone(),
            retry_schedule: config.retry_schedule.clone(),
            pending: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            in_flight: Semaphore::new(config.concurrency.max(1)),
            disabled: Mutex::new(HashSet::new()),
            last_progress: Mutex::new(HashMap::new()),
        });
        let (queue, deliveries) = mpsc::unbounded_channel();
        let handle = tokio::spawn(webhook_delivery_task(shared.clone(), deliveries, shutdown));
        Ok((WebhookSender { shared, queue }, handle))
    }

    /// Checks a webhook URL completely, DNS included; for validating it when a task is submitted.
    pub async fn check_url(&self, url: &str) -> Result<(), WebhookError> {
        let url = self.shared.policy.parse(url)?;
        self.shared.policy.resolve(&url).await?;
        if self.is_disabled(url.as_str()) {
            return Err(WebhookError::Disabled { url: url.into() });
        }
        Ok(())
    }

    /// Queues `body` as JSON for `url` and returns at once. Progress events arriving less than
    /// half a second after the previous one for `task_id` are skipped (`Ok(None)`).
    pub fn enqueue(
        &self,
        url: &str,
        task_id: &str,
        event: WebhookEvent,
        body: &impl Serialize,
    ) -> Result<Option<Receipt>, WebhookError> {
        let url = self.shared.policy.parse(url)?;
        if self.is_disabled(url.as_str()) {
            return Err(WebhookError::Disabled { url: url.into() });
        }
        if !self.shared.progress_due(task_id, event) {
            return Ok(None);
        }
        let body = Bytes::from(serde_json::to_vec(body)?);
        let permit = self.shared.pending.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("deskgen_webhook_deliveries_total", "outcome" => "rejected").increment(1);
            WebhookError::QueueFull
        })?;
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let (done, outcome) = oneshot::channel();
        let trace = crate::telemetry::enabled().then(|| {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            tracing::Span::current().context()
        });
        let delivery = Delivery { id: id.clone(), url, body, trace, done, _pending: permit };
        self.queue.send(delivery).map_err(|_| WebhookError::Stopped)?;
        tracing::debug!(webhook_id = %id, task_id, event = event.as_str(), "webhook queued");
        Ok(Some(Receipt { webhook_id: id, outcome }))
    }

    fn is_disabled(&self, url: &str) -> bool {
        self.shared.is_disabled(url)
    }
}

impl Shared {
    fn is_disabled(&self, url: &str) -> bool {
        self.disabled.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(url)
    }

    /// Throttles progress events per task; a completed event forgets the task.
    fn progress_due(&self, task_id: &str, event: WebhookEvent) -> bool {
        let mut last = self.last_progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match event {
            WebhookEvent::Start => true,
            WebhookEvent::Completed => {
                last.remove(task_id);
                true
            }
            WebhookEvent::Progress => {
                let now = Instant::now();
                if last.get(task_id).is_some_and(|sent| now.duration_since(*sent) < PROGRESS_INTERVAL) {
                    return false;
                }
                if last.len() >= THROTTLE_PRUNE_AT {
                    last.retain(|_, sent| now.duration_since(*sent) < PROGRESS_INTERVAL);
                }
                last.insert(task_id.to_owned(), now);
                true
            }
        }
    }

    /// Posts `delivery` until it succeeds, fails for good, or shutdown comes.
    async fn deliver(&self, delivery: &Delivery, shutdown: &CancellationToken) -> DeliveryOutcome {
        let traced = delivery.trace.as_ref().map(|task| crate::telemetry::webhook_span(task, &delivery.id));
        let traceparent = traced.as_ref().and_then(|(_, traceparent)| traceparent.clone());
        let outcome = self.attempts(delivery, traceparent.as_deref(), shutdown).await;
        if let Some((mut span, _)) = traced {
            use opentelemetry::trace::Span as _;
            span.set_attribute(opentelemetry::KeyValue::new("webhook.outcome", outcome.label()));
            span.end();
        }
        outcome
    }

    /// [`Self::deliver`]'s attempts, each sending `traceparent` when given.
    async fn attempts(
        &self,
        delivery: &Delivery,
        traceparent: Option<&str>,
        shutdown: &CancellationToken,
    ) -> DeliveryOutcome {
        let mut attempts = 0;
        loop {
            if self.is_disabled(delivery.url.as_str()) {
                return DeliveryOutcome::Disabled { attempts };
            }
            attempts += 1;
            let result = {
                let Ok(_permit) = self.in_flight.acquire().await else { return DeliveryOutcome::Dropped };
                self.attempt(delivery, traceparent).await
            };
            let (reason, retry_after) = match result {
                AttemptResult::Delivered(status) => return DeliveryOutcome::Delivered { attempts, status },
                AttemptResult::Gone => {
                    tracing::warn!(url = %delivery.url, "webhook receiver answered 410 Gone; disabling the URL");
                    self.disabled
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(delivery.url.to_string());
                    return DeliveryOutcome::Disabled { attempts };
                }
                AttemptResult::Final(reason) => return DeliveryOutcome::Failed { attempts, reason },
                AttemptResult::Retry { reason, retry_after } => (reason, retry_after),
            };
            let Some(&scheduled) = self.retry_schedule.get(attempts as usize - 1) else {
                return DeliveryOutcome::Failed { attempts, reason };
            };
            let delay = retry_after.unwrap_or_else(|| jitter(scheduled));
            tracing::info!(webhook_id = %delivery.id, attempts, ?delay, %reason, "webhook attempt failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return DeliveryOutcome::Dropped,
            }
        }
    }

    async fn attempt(&self, delivery: &Delivery, traceparent: Option<&str>) -> AttemptResult {
        let timestamp =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs() as i64);
        let mut request = self
            .client
            .post(delivery.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        if !self.secrets.is_empty() {
            let signatures: Vec<String> = self
                .secrets
                .iter()
                .map(|secret| secret.sign(&delivery.id, timestamp, &delivery.body))
                .collect();
            request = request.header("webhook-signature", signatures.join(" "));
        }
        let response = match request.body(delivery.body.clone()).send().await {
            Ok(response) => response,
            Err(error) => return classify_error(&delivery.url, &error),
        };
        let status = response.status();
        let result = if status.is_success() {
            AttemptResult::Delivered(status.as_u16())
        } else if status == StatusCode::GONE {
            AttemptResult::Gone
        } else if status.is_redirection() {
            let location =
                response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("nowhere");
            AttemptResult::Final(format!("HTTP {status} redirect to {location} (redirects are not followed)"))
        } else if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            let retry_after =
                response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            AttemptResult::Retry { reason: format!("HTTP {status}"), retry_after }
        } else {
            AttemptResult::Final(format!("HTTP {status}"))
        };
        let label = match &result {
            AttemptResult::Delivered(_) => "ok",
            AttemptResult::Gone => "gone",
            AttemptResult::Final(_) => "final_error",
            AttemptResult::Retry { .. } => "retryable_error",
        };
        metrics::counter!("deskgen_webhook_attempts_total", "result" => label).increment(1);
        result
    }
}

/// The delivery loop: one task per queued webhook, stopped by `shutdown`.
async fn webhook_delivery_task(
    shared: Arc<Shared>,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    shutdown: CancellationToken,
) {
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            delivery = deliveries.recv() => {
                let Some(delivery) = delivery else { break };
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                running.spawn(async move {
                    let outcome = shared.deliver(&delivery, &shutdown).await;
                    metrics::counter!("deskgen_webhook_deliveries_total", "outcome" => outcome.label()).increment(1);
                    match &outcome {
                        DeliveryOutcome::Delivered { attempts, .. } => {
                            tracing::debug!(webhook_id = %delivery.id, attempts, "webhook delivered");
                        }
                        DeliveryOutcome::Failed { attempts, reason } => {
                            tracing::warn!(webhook_id = %delivery.id, url = %delivery.url, attempts, %reason, "webhook delivery failed");
                        }
                        DeliveryOutcome::Disabled { .. } | DeliveryOutcome::Dropped => {}
                    }
                    let _ = delivery.done.send(outcome);
                });
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    deliveries.close();
    let mut dropped = 0;
    while let Some(delivery) = deliveries.recv().await {
        dropped += 1;
        let _ = delivery.done.send(DeliveryOutcome::Dropped);
    }
    if dropped > 0 {
        metrics::counter!("deskgen_webhook_deliveries_total", "outcome" => "dropped").increment(dropped);
        tracing::warn!(dropped, "webhooks still queued at shutdown were dropped");
    }
    while running.join_next().await.is_some() {}
}

fn classify_error(url: &Url, error: &reqwest::Error) -> AttemptResult {
    if let Some(refused) = refusal_inside(error) {
        metrics::counter!("deskgen_webhook_attempts_total", "result" => "final_error").increment(1);
        return AttemptResult::Final(refused.to_string());
    }
    let reason = if error.is_timeout() { format!("timed out posting to {url}") } else { error_chain(error) };
    metrics::counter!("deskgen_webhook_attempts_total", "result" => "retryable_error").increment(1);
    AttemptResult::Retry { reason, retry_after: None }
}

/// Retry-After as delay-seconds or an HTTP date, capped.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or_default()
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// ±20 % so that receivers coming back up are not hit by every sender at once.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_reference() {
        // Test vector from the Standard Webhooks specification's reference libraries.
        let secret: WebhookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_parse_and_stay_hidden() {
        assert!("whsec_".parse::<WebhookSecret>().is_err());
        assert!("whsec_not base64!".parse::<WebhookSecret>().is_err());
        let secret: WebhookSecret = "whsec_c2VjcmV0".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "WebhookSecret(***)");
    }

    #[test]
    fn events_filter() {
        assert!(WebhookEvent::Progress.wanted_by(&[]));
        assert!(WebhookEvent::Completed.wanted_by(&["start".into(), "COMPLETED".into()]));
        assert!(!WebhookEvent::Progress.wanted_by(&["start".into(), "completed".into()]));
        assert_eq!("progress".parse(), Ok(WebhookEvent::Progress));
        assert!("output".parse::<WebhookEvent>().is_err());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
