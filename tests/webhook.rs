//! Webhook delivery to a real local receiver that checks signatures on its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use deskgen::fetch::{FetchError, UrlPolicy};
use deskgen::webhook::{DeliveryOutcome, WebhookConfig, WebhookError, WebhookEvent, WebhookSender};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_b2xkLXNlY3JldC1zdGlsbC1hY3RpdmU=";

#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn hits(&self, path: &str) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }
}

/// Behaviour by path: `ok`, `flaky` (503 with Retry-After once), `slow` (first answer too late),
/// `redirect`, `gone`, `bad`.
async fn receive(
    State(receiver): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let earlier = receiver.hits(&path).len();
    receiver.received.lock().unwrap().push(Received {
        path: path.clone(),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
    });
    match path.as_str() {
        "flaky" if earlier == 0 => (StatusCode::SERVICE_UNAVAILABLE, [("Retry-After", "1")]).into_response(),
        "slow" if earlier == 0 => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            StatusCode::OK.into_response()
        }
        "redirect" => (StatusCode::FOUND, [("Location", "/ok")]).into_response(),
        "gone" => StatusCode::GONE.into_response(),
        "bad" => StatusCode::BAD_REQUEST.into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn start_receiver_on(listener: tokio::net::TcpListener) -> Receiver {
    let receiver = Receiver::default();
    let router = Router::new().route("/{path}", post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    receiver
}

async fn start_receiver() -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, start_receiver_on(listener).await)
}

fn sender(shutdown: &CancellationToken) -> WebhookSender {
    let config = WebhookConfig {
        secrets: vec![SECRET.parse().unwrap(), OLD_SECRET.parse().unwrap()],
        retry_schedule: vec![
            Duration::from_millis(50),
            Duration::from_millis(100),
            Duration::from_millis(200),
        ],
        timeout: Duration::from_millis(300),
        ..WebhookConfig::default()
    };
    let policy = UrlPolicy::new(true, vec!["127.0.0.1".parse().unwrap()]);
    WebhookSender::spawn(&config, policy, shutdown.clone()).unwrap().0
}

/// Standard Webhooks verification, written from the specification rather than from our sender.
fn verify(secret: &str, received: &Received) -> bool {
    let key = BASE64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(received.id.as_bytes());
    mac.update(b".");
    mac.update(received.timestamp.as_bytes());
    mac.update(b".");
    mac.update(&received.body);
    let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    received.signature.split(' ').any(|signature| signature == expected)
}

fn assert_fresh_timestamp(received: &Received) {
    let sent: i64 = received.timestamp.parse().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now - sent).abs() <= 5, "timestamp {sent} vs now {now}");
}

#[tokio::test]
async fn delivers_signed_with_every_active_secret() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let body =
        json!({"task_id": "t-1", "status": "done", "마우스": [{"title": "로지텍 M650", "price": "39000원"}]});
    let receipt = sender(&shutdown)
        .enqueue(&format!("http://{addr}/ok"), "t-1", WebhookEvent::Completed, &body)
        .unwrap()
        .unwrap();
    let webhook_id = receipt.webhook_id.clone();
    assert_eq!(receipt.outcome().await, DeliveryOutcome::Delivered { attempts: 1, status: 204 });
    let hits = receiver.hits("ok");
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert_eq!(hit.id, webhook_id);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&hit.body).unwrap(), body);
    assert_eq!(hit.signature.split(' ').count(), 2);
    assert!(verify(SECRET, hit) && verify(OLD_SECRET, hit));
    assert!(!verify("whsec_d3Jvbmcgc2VjcmV0", hit));
    assert_fresh_timestamp(hit);
}

#[tokio::test]
async fn receiver_down_then_up_gets_the_retry() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let shutdown = CancellationToken::new();
    let receipt = sender(&shutdown)
        .enqueue(&format!("http://{addr}/ok"), "t-2", WebhookEvent::Start, &json!({"task_id": "t-2"}))
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let receiver = start_receiver_on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let outcome = receipt.outcome().await;
    assert!(matches!(outcome, DeliveryOutcome::Delivered { attempts: 2.., status: 204 }), "{outcome:?}");
    let hits = receiver.hits("ok");
    assert_eq!(hits.len(), 1);
    assert!(verify(SECRET, &hits[0]));
}

#[tokio::test]
async fn slow_receiver_times_out_and_is_retried_with_the_same_id() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let receipt = sender(&shutdown)
        .enqueue(&format!("http://{addr}/slow"), "t-3", WebhookEvent::Completed, &json!({"task_id": "t-3"}))
        .unwrap()
        .unwrap();
    assert_eq!(receipt.outcome().await, DeliveryOutcome::Delivered { attempts: 2, status: 204 });
    let hits = receiver.hits("slow");
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].id, hits[1].id);
    assert!(hits.iter().all(|hit| verify(SECRET, hit)));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let receipt = sender(&shutdown)
        .enqueue(&format!("http://{addr}/flaky"), "t-4", WebhookEvent::Completed, &json!({"task_id": "t-4"}))
        .unwrap()
        .unwrap();
    assert_eq!(receipt.outcome().await, DeliveryOutcome::Delivered { attempts: 2, status: 204 });
    // The schedule says 50 ms; the receiver asked for a second.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(receiver.hits("flaky").len(), 2);
}

#[tokio::test]
async fn redirects_and_client_errors_are_final() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let sender = sender(&shutdown);
    for path in ["redirect", "bad"] {
        let receipt = sender
            .enqueue(&format!("http://{addr}/{path}"), "t-5", WebhookEvent::Completed, &json!({}))
            .unwrap()
            .unwrap();
        let outcome = receipt.outcome().await;
        assert!(matches!(outcome, DeliveryOutcome::Failed { attempts: 1, .. }), "{path}: {outcome:?}");
        assert_eq!(receiver.hits(path).len(), 1);
    }
    assert!(receiver.hits("ok").is_empty(), "the redirect must not be followed");
}

#[tokio::test]
async fn gone_disables_the_url() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let sender = sender(&shutdown);
    let url = format!("http://{addr}/gone");
    let receipt = sender.enqueue(&url, "t-6", WebhookEvent::Completed, &json!({})).unwrap().unwrap();
    assert_eq!(receipt.outcome().await, DeliveryOutcome::Disabled { attempts: 1 });
    let error = sender.enqueue(&url, "t-7", WebhookEvent::Completed, &json!({})).unwrap_err();
    assert!(matches!(error, WebhookError::Disabled { .. }), "{error}");
    assert!(matches!(sender.check_url(&url).await, Err(WebhookError::Disabled { .. })));
    assert_eq!(receiver.hits("gone").len(), 1);
}

#[tokio::test]
async fn blocked_urls_are_refused_at_enqueue() {
    let shutdown = CancellationToken::new();
    let (sender, _task) =
        WebhookSender::spawn(&WebhookConfig::default(), UrlPolicy::new(false, Vec::new()), shutdown.clone())
            .unwrap();
    for url in [
        "https://127.0.0.1/hook",
        "https://169.254.169.254/hook",
        "http://example.com/hook",
        "ftp://example.com/",
    ] {
        let error = sender.enqueue(url, "t-8", WebhookEvent::Completed, &json!({})).unwrap_err();
        assert!(matches!(error, WebhookError::Url(_)), "{url}: {error}");
    }
    // A name is checked when it resolves: at submission with check_url, and again at connect.
    let error = sender.check_url("https://localhost/hook").await.unwrap_err();
    assert!(matches!(error, WebhookError::Url(FetchError::Blocked(_))), "{error}");
    let receipt = sender
        .enqueue("https://localhost/hook", "t-8", WebhookEvent::Completed, &json!({}))
        .unwrap()
        .unwrap();
    let outcome = receipt.outcome().await;
    assert!(
        matches!(outcome, DeliveryOutcome::Failed { attempts: 1, ref reason } if reason.contains("loopback")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn progress_is_throttled_per_task() {
    let (addr, receiver) = start_receiver().await;
    let shutdown = CancellationToken::new();
    let sender = sender(&shutdown);
    let url = format!("http://{addr}/ok");
    let first = sender.enqueue(&url, "t-9", WebhookEvent::Progress, &json!({"step": 1})).unwrap();
    assert!(first.is_some());
    assert!(sender.enqueue(&url, "t-9", WebhookEvent::Progress, &json!({"step": 2})).unwrap().is_none());
    assert!(sender.enqueue(&url, "t-10", WebhookEvent::Progress, &json!({"step": 1})).unwrap().is_some());
    let completed =
        sender.enqueue(&url, "t-9", WebhookEvent::Completed, &json!({"status": "done"})).unwrap().unwrap();
    completed.outcome().await;
    first.unwrap().outcome().await;
    assert_eq!(receiver.hits("ok").len(), 2 + 1);
}

#[tokio::test]
async fn shutdown_drops_pending_retries_and_ends_the_task() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let shutdown = CancellationToken::new();
    let config = WebhookConfig { retry_schedule: vec![Duration::from_secs(60)], ..WebhookConfig::default() };
    let (sender, task) = WebhookSender::spawn(
        &config,
        UrlPolicy::new(true, vec!["127.0.0.1".parse().unwrap()]),
        shutdown.clone(),
    )
    .unwrap();
    let receipt = sender
        .enqueue(&format!("http://{addr}/ok"), "t-11", WebhookEvent::Completed, &json!({}))
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap();
    assert_eq!(receipt.outcome().await, DeliveryOutcome::Dropped);
    let error = sender
        .enqueue(&format!("http://{addr}/ok"), "t-11", WebhookEvent::Completed, &json!({}))
        .unwrap_err();
    assert!(matches!(error, WebhookError::Stopped), "{error}");
}
