//! The health document, one builder for an API node's `/healthcheck` and a worker node's.
//!
//! Ready means the models are loaded, the queue answers and the object store is usable; a refused
//! shopping provider is reported but does not take the node out of service (tasks still finish,
//! with a warning instead of offers). While a model pulled from the hub downloads, `download`
//! says how far it is.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::hub::Downloads;
use crate::shopping::ShoppingProvider;
use crate::storage::ObjectStore;
use crate::tasks::TaskQueue;

/// What one node's health is read from.
pub struct Probe<'a> {
    /// The task queue the node serves or works from.
    pub queue: &'a dyn TaskQueue,
    /// Where images go.
    pub store: &'a dyn ObjectStore,
    /// Where offers come from.
    pub shopping: &'a dyn ShoppingProvider,
    /// Whether the models are loaded.
    pub models_loaded: bool,
    /// The hub pulls of the models while they load.
    pub downloads: &'a Downloads,
    /// The worker's name on a worker node; `None` on an API node, which also reports the queue's
    /// capacity.
    pub worker: Option<&'a str>,
    /// On an API node that loads no models: live workers, and how many readiness needs.
    pub fleet: Option<(usize, usize)>,
}

impl Probe<'_> {
    /// 200 with `status: ok` when ready, else 503 with `status: starting`; per-component state.
    pub async fn respond(&self) -> Response {
        let (ready, body) = self.document().await;
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, Json(body)).into_response()
    }

    /// Whether the node is ready, and the document that says why.
    pub async fn document(&self) -> (bool, Value) {
        let backend = self.queue.backend();
        let depth = self.queue.queue_depth().await;
        let mut queue = match &depth {
            Ok(depth) => json!({"backend": backend, "state": "ok", "depth": depth}),
            Err(e) => json!({"backend": backend, "state": "unreachable", "error": e.to_string()}),
        };
        if self.worker.is_none() && depth.is_ok() {
            queue["capacity"] = json!(self.queue.capacity());
        }
        let checked = self.store.check().await;
        let storage = match &checked {
            Ok(()) => json!({"backend": self.store.kind(), "state": "ok"}),
            Err(e) => json!({"backend": self.store.kind(), "state": "unreachable", "error": e.to_string()}),
        };
        let shopping_state = if self.shopping.healthy() { "ok" } else { "refused" };
        let shopping = json!({"provider": self.shopping.name(), "state": shopping_state});
        let ready = self.models_loaded && depth.is_ok() && checked.is_ok();
        let models = match (self.fleet, self.models_loaded) {
            (Some(_), true) => "on workers",
            (Some(_), false) => "no live workers",
            (None, true) => "ready",
            (None, false) => "loading",
        };
        let mut body = json!({
            "status": if ready { "ok" } else { "starting" },
            "components": {
                "models": models,
                "queue": queue,
                "storage": storage,
                "shopping": shopping,
            },
        });
        if let Some((live, min)) = self.fleet {
            body["components"]["workers"] = json!({"live": live, "min": min});
        }
        if let Some(worker) = self.worker {
            body["worker"] = json!(worker);
        }
        // A model pulled from the hub at start: how far its download is while the models load.
        if let Some(download) =
            self.downloads.report().filter(|_| !self.models_loaded && self.fleet.is_none())
        {
            body["download"] = json!(download);
        }
        (ready, body)
    }
}
