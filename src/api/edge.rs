//! What every request passes on its way to a handler and back, in one layer: the browser rules
//! ([`BrowserPolicy`]), the body's read deadline, and the request metrics by route and status.
//! One service does all three because a middleware per concern costs an allocation or more each
//! per request, for cloning the rest of the stack and boxing its future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
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
        EdgeService { edge: self.clone(), inner }
    }
}

/// [`Edge`] in front of one route.
#[derive(Clone)]
pub struct EdgeService<S> {
    edge: Edge,
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
        if let Some(refused) = self.edge.policy.as_ref().and_then(|policy| policy.refusal(&request)) {
            let response = refused.into_response();
            record(route, &response, started);
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
            record(route, &response, started);
            Ok(response)
        })
    }
}

/// Counts a request and its latency by route and status.
fn record(route: Option<MatchedPath>, response: &Response, started: Instant) {
    let route = route.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let status = response.status().as_u16().to_string();
    metrics::counter!("deskgen_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("deskgen_http_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
}
