//! What every request passes on its way to a handler and back, in one layer: the browser rules
//! ([`BrowserPolicy`]), the body's read deadline, and the request metrics by route and status.
//! One service does all three because a middleware per concern costs an allocation or more each
//! per request, for cloning the rest of the stack and boxing its future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};
use tower::{Layer, Service};

use super::errors::ApiError;
use super::guard::{self, BrowserPolicy};

/// The layer; an API node has all of it, a worker's metrics listener the metrics only.
#[derive(Clone, Default)]
pub struct Edge {
    policy: Option<Arc<BrowserPolicy>>,
    body_timeout: Option<Duration>,
}

impl Edge {
    /// The browser rules of `policy`, and `body_timeout` for a request body to arrive in full.
    pub fn guarded(policy: Arc<BrowserPolicy>, body_timeout: Duration) -> Edge {
        Edge { policy: Some(policy), body_timeout: Some(body_timeout) }
    }
}

impl<S> Layer<S> for Edge {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService { edge: self.clone(), metrics: Arc::default(), inner }
    }
}

/// [`Edge`] in front of one route.
#[derive(Clone)]
pub struct EdgeService<S> {
    edge: Edge,
    /// The route's metric handles, shared by the clones that serve its requests.
    metrics: Arc<RouteMetrics>,
    inner: S,
}

impl<S> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let metrics = self.metrics.clone();
        if let Some(refused) = self.edge.policy.as_ref().and_then(|policy| policy.refusal(&request)) {
            let response = refused.into_response();
            metrics.record(route, &response, started);
            return Box::pin(std::future::ready(Ok(response)));
        }
        let (request, deadline) = match self.edge.body_timeout {
            Some(timeout) => guard::with_body_deadline(request, timeout),
            None => (request, None),
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            if let Some(deadline) = deadline
                && deadline.expired()
            {
                response = ApiError::BodyTimeout(deadline.timeout.as_secs()).into_response();
            }
            metrics.record(route, &response, started);
            Ok(response)
        })
    }
}

/// One route's request count by status and its latency, registered at its first request: looking
/// a labelled metric up by name costs allocations and hashing every time.
#[derive(Default)]
pub struct RouteMetrics {
    handles: OnceLock<(String, Histogram)>,
    by_status: RwLock<Vec<(StatusCode, Counter)>>,
}

impl RouteMetrics {
    /// Counts a request and its latency by route and status.
    fn record(&self, route: Option<MatchedPath>, response: &Response, started: Instant) {
        let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let status = response.status();
        let (name, seconds) = self.handles.get_or_init(|| (route.to_string(), latency(route)));
        if name != route {
            // Not the route this service was first asked for: look the handles up by name.
            requests(route, status).increment(1);
            latency(route).record(started.elapsed().as_secs_f64());
            return;
        }
        seconds.record(started.elapsed().as_secs_f64());
        let counted = |known: &[(StatusCode, Counter)]| {
            known.iter().find(|(code, _)| *code == status).map(|(_, counter)| counter.increment(1)).is_some()
        };
        if counted(&self.by_status.read().unwrap_or_else(|e| e.into_inner())) {
            return;
        }
        let mut known = self.by_status.write().unwrap_or_else(|e| e.into_inner());
        if counted(&known) {
            return;
        }
        let counter = requests(route, status);
        counter.increment(1);
        known.push((status, counter));
    }
}

fn requests(route: &str, status: StatusCode) -> Counter {
    let labels = [("route", route.to_string()), ("status", status.as_u16().to_string())];
    metrics::counter!("deskgen_http_requests_total", &labels)
}

fn latency(route: &str) -> Histogram {
    metrics::histogram!("deskgen_http_request_seconds", "route" => route.to_string())
}
