//! Starting and stopping the service: one listener for gRPC, grpc-web and REST, the workers, and
//! the background upkeep.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::api::auth::ApiKeys;
use crate::api::grpc::pb::generate_server::GenerateServer;
use crate::api::grpc::pb::info_server::InfoServer;
use crate::api::grpc::pb::result_server::ResultServer;
use crate::api::grpc::{Services, check_auth, pb};
use crate::api::validate::Limits;
use crate::api::{self, About, AppState};
use crate::config::ServeConfig;
use crate::fetch::UrlPolicy;
use crate::pipeline::Pipeline;
use crate::storage::ObjectStore;
use crate::tasks::worker::worker_task;
use crate::tasks::{MemoryQueue, TaskQueue, TaskStore};
use crate::webhook::WebhookSender;

/// Builds the pipeline over the service's object store; runs on a blocking thread while the
/// listener already answers health checks.
pub type PipelineLoader = Box<dyn FnOnce(Arc<dyn ObjectStore>) -> anyhow::Result<Arc<dyn Pipeline>> + Send>;

/// gRPC service names reported by the health service.
const SERVICE_NAMES: [&str; 3] = ["deskgen.v1.Generate", "deskgen.v1.Result", "deskgen.v1.Info"];

/// A running service.
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A token that stops the service gracefully when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether the service has stopped (after shutdown, or because models failed to load).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Runs until the service stops (shutdown, or models failed to load).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("server task panicked")?
    }

    /// Stops gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// The process-wide Prometheus recorder (installed once, shared by every server in the process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().expect("no other metrics recorder"))
        .clone()
}

/// Starts serving on `listener`; models load in the background (health reports NOT_SERVING until then).
pub async fn start(
    config: ServeConfig,
    listener: TcpListener,
    loader: PipelineLoader,
) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let keys = ApiKeys::load(&config.api_keys, config.api_key_file.as_deref()).context("reading API keys")?;
    if keys.is_open() {
        tracing::warn!("no API key configured: anyone who can reach {addr} can submit tasks");
    }
    let store = TaskStore::open(&config.data_dir)
        .with_context(|| format!("opening {}", config.data_dir.display()))?;
    let queue: Arc<dyn TaskQueue> =
        Arc::new(MemoryQueue::open(store, config.max_queue_depth, config.max_attempts)?);
    let objects = crate::storage::build(&config.pipeline.storage, &config.data_dir).await?;
    let shutdown = CancellationToken::new();
    let (webhooks, deliveries) = WebhookSender::spawn(
        &config.webhook,
        UrlPolicy::from_config(&config.pipeline.fetch),
        shutdown.clone(),
    )?;
    let state = Arc::new(AppState {
        queue: queue.clone(),
        keys,
        limits: Limits { max_side: config.max_side },
        webhooks: webhooks.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics: metrics_handle(),
        pipeline: OnceLock::new(),
        about: About {
            queue_backend: queue.backend().into(),
            execution_provider: config.pipeline.runtime.execution_provider.as_str().into(),
        },
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.ErrorInfo / BadRequest, so grpcurl can print error details, not raw bytes.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let services = Services::new(state.clone());
    let auth_state = state.clone();
    let auth = move |request: Request<()>| -> Result<Request<()>, Status> {
        check_auth(&auth_state, &request)?;
        Ok(request)
    };
    let max = config.max_body_bytes;
    let grpc = tonic::service::Routes::new(InterceptedService::new(
        GenerateServer::new(services.clone()).max_decoding_message_size(max),
        auth.clone(),
    ))
    .add_service(InterceptedService::new(
        ResultServer::new(services.clone()).max_decoding_message_size(max),
        auth,
    ))
    .add_service(InfoServer::new(services))
    .add_service(health_service)
    .add_service(reflection().build_v1()?)
    .add_service(reflection().build_v1alpha()?)
    .into_axum_router()
    .layer(tonic_web::GrpcWebLayer::new());
    let mut routes = api::rest_router(state.clone()).merge(grpc);
    if let Some(images) = objects.router() {
        routes = routes.merge(images);
    }
    let app = api::with_request_metrics(routes).layer(api::cors());

    let services = Background { queue, objects, webhooks, deliveries };
    let handle = tokio::spawn(run(config, listener, app, state, services, health, loader, shutdown.clone()));
    Ok(RunningServer { addr, shutdown, handle })
}

/// What the workers share besides the pipeline.
struct Background {
    queue: Arc<dyn TaskQueue>,
    objects: Arc<dyn ObjectStore>,
    webhooks: WebhookSender,
    deliveries: tokio::task::JoinHandle<()>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: ServeConfig,
    listener: TcpListener,
    app: axum::Router,
    state: Arc<AppState>,
    services: Background,
    health: tonic_health::server::HealthReporter,
    loader: PipelineLoader,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Background { queue, objects, webhooks, deliveries } = services;
    let serve_shutdown = shutdown.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(serve_shutdown.cancelled_owned()).await
    });

    let mut workers = JoinSet::new();
    let loading = tokio::task::spawn_blocking(move || loader(objects));
    let pipeline = tokio::select! {
        loaded = loading => loaded.context("model loading panicked")?.context("loading models")?,
        _ = shutdown.cancelled() => {
            finish(Some(server), workers, config.shutdown_grace).await;
            return Ok(());
        }
    };
    let _ = state.pipeline.set(pipeline.info());
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    tracing::info!(workers = config.workers, "models loaded; ready");
    for index in 0..config.workers {
        workers.spawn(worker_task(
            index,
            queue.clone(),
            pipeline.clone(),
            webhooks.clone(),
            config.task_deadline,
            shutdown.clone(),
        ));
    }
    let upkeep = tokio::spawn(purge_task(queue, config.result_ttl, shutdown.clone()));
    let listener_ended = tokio::select! {
        _ = shutdown.cancelled() => None,
        ended = &mut server => {
            shutdown.cancel();
            Some(ended)
        }
    };
    upkeep.abort();
    let still_serving = if listener_ended.is_none() { Some(server) } else { None };
    finish(still_serving, workers, config.shutdown_grace).await;
    // Completed-task webhooks queued during the grace period go out before the process ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), deliveries).await;
    match listener_ended {
        Some(ended) => Ok(ended.context("listener task panicked")??),
        None => Ok(()),
    }
}

/// After shutdown: stop accepting, let running tasks finish within `grace`; what is left stays
/// persisted as processing and runs again at the next start.
async fn finish(
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    mut workers: JoinSet<()>,
    grace: Duration,
) {
    let drained = tokio::time::timeout(grace, async { while workers.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "tasks still running after the grace period; they will run again at the next start"
        );
        workers.abort_all();
    }
    // Long-lived streams (SSE, WatchResult) would hold graceful shutdown open; bound the wait.
    if let Some(server) = server {
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), server).await.is_err() {
            abort.abort();
        }
    }
}

/// Drops expired results every few minutes.
async fn purge_task(queue: Arc<dyn TaskQueue>, ttl: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(300).min(ttl.max(Duration::from_secs(1))));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match queue.purge_expired(ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired results removed"),
            Err(e) => tracing::warn!(error = %e, "cannot purge expired results"),
        }
    }
}
