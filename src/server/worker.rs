//! A worker node's listener: health and metrics only.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use super::listener::metrics_handle;
use super::node::{Node, Ready};
use crate::api;
use crate::api::edge::Edge;
use crate::api::health::Probe;
use crate::pipeline::Services;
use crate::tasks::WorkerQueue;

/// What a worker node's health and metrics endpoints see.
struct WorkerState {
    name: String,
    queue: Arc<dyn WorkerQueue>,
    services: Services,
    models_loaded: OnceLock<()>,
    metrics: PrometheusHandle,
}

/// The worker node's routes, and what marks it ready once the models are loaded.
pub(super) fn app(node: &Node, workers: usize) -> (axum::Router, Ready) {
    let state = Arc::new(WorkerState {
        name: node.name.clone(),
        queue: node.queue.clone(),
        services: node.services.clone(),
        models_loaded: OnceLock::new(),
        metrics: metrics_handle(),
    });
    let app = api::with_edge(
        axum::Router::new()
            .route("/healthcheck", get(health))
            .route("/metrics", get(metrics))
            .with_state(state.clone()),
        Edge::default(),
    );
    let ready: Ready = Box::new(move |_| {
        Box::pin(async move {
            let _ = state.models_loaded.set(());
            tracing::info!(worker = %state.name, workers, "models loaded; taking tasks");
        })
    });
    (app, ready)
}

/// GET /healthcheck on a worker: 200 once its models are loaded and Redis and the store answer.
async fn health(State(state): State<Arc<WorkerState>>) -> Response {
    let probe = Probe {
        queue: state.queue.as_ref(),
        store: state.services.store.as_ref(),
        shopping: state.services.shopping.as_ref(),
        models_loaded: state.models_loaded.get().is_some(),
        downloads: &state.services.downloads,
        worker: Some(&state.name),
        fleet: None,
    };
    probe.respond().await
}

/// GET /metrics on a worker: Prometheus text.
async fn metrics(State(state): State<Arc<WorkerState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
