//! Starting and stopping the service: one listener for gRPC, grpc-web and REST, the workers, and
//! the background upkeep.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::api::auth::ApiKeys;
use crate::api::grpc::pb::generate_server::GenerateServer;
use crate::api::grpc::pb::info_server::InfoServer;
use crate::api::grpc::pb::result_server::ResultServer;
use crate::api::grpc::{Services, check_auth, pb};
use crate::api::{self, About, AppState};
use crate::config::{QueueBackend, RedisUrl, ServeConfig, TaskConfig, WorkerConfig};
use crate::core::{Limits, PipelineInfo};
use crate::fetch::UrlPolicy;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::storage::ObjectStore;
use crate::tasks::worker::{Notifier, worker_task};
use crate::tasks::{MemoryQueue, RedisOptions, RedisQueue, TaskQueue};
use crate::webhook::{WebhookConfig, WebhookSender};

/// Builds the pipeline over the service's object store; runs on a blocking thread while the
/// listener already answers health checks.
pub type PipelineLoader = Box<dyn FnOnce(Arc<dyn ObjectStore>) -> anyhow::Result<Arc<dyn Pipeline>> + Send>;

/// gRPC service names reported by the health service.
const SERVICE_NAMES: [&str; 3] = ["deskgen.v1.Generate", "deskgen.v1.Result", "deskgen.v1.Info"];

/// A running service.
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
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
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().expect("no other metrics recorder");
            // Histogram samples wait in buckets until drained; with nobody scraping /metrics they
            // would pile up for the life of the process.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the metrics upkeep thread");
            handle
        })
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
    let queue: Arc<dyn TaskQueue> = match &config.queue {
        QueueBackend::Memory => {
            if config.tasks.workers == 0 {
                tracing::warn!("--workers 0 with the memory queue: nothing will run the tasks");
            }
            let queue =
                MemoryQueue::open(&config.tasks.data_dir, config.max_queue_depth, config.tasks.max_attempts)
                    .with_context(|| format!("opening {}", config.tasks.data_dir.display()))?;
            Arc::new(queue)
        }
        QueueBackend::Redis(url) => {
            let options = RedisOptions {
                capacity: config.max_queue_depth,
                max_attempts: config.tasks.max_attempts,
                visibility_timeout: config.tasks.visibility_timeout,
                result_ttl: config.tasks.result_ttl,
                consumer: consumer_name(&host_name()),
            };
            Arc::new(connect_redis(url, options).await?)
        }
    };
    let shutdown = CancellationToken::new();
    let background =
        Background::start(queue, &config.pipeline, &config.webhook, &config.tasks, &shutdown).await?;
    let state = Arc::new(AppState {
        queue: background.queue.clone(),
        keys,
        limits: Limits { max_side: config.max_side },
        webhooks: background.webhooks.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics: metrics_handle(),
        pipeline: OnceLock::new(),
        about: About {
            queue_backend: background.queue.backend().into(),
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
    if let Some(images) = background.objects.router() {
        routes = routes.merge(images);
    }
    let app = api::with_request_metrics(routes).layer(api::cors());

    let workers = config.tasks.workers;
    let ready = move |info| async move {
        let _ = state.pipeline.set(info);
        for name in SERVICE_NAMES.into_iter().chain([""]) {
            health.set_service_status(name, ServingStatus::Serving).await;
        }
        tracing::info!(workers, "models loaded; ready");
    };
    let server = serve(listener, app, &shutdown);
    let node = run_node(config.tasks, host_name(), server, background, loader, shutdown.clone(), ready);
    let handle = tokio::spawn(node);
    Ok(RunningServer { addr, shutdown, handle })
}

/// What the workers share besides the pipeline.
struct Background {
    queue: Arc<dyn TaskQueue>,
    objects: Arc<dyn ObjectStore>,
    webhooks: WebhookSender,
    deliveries: JoinHandle<()>,
}

impl Background {
    /// Opens the object store and starts webhook delivery, which ends with `shutdown`.
    async fn start(
        queue: Arc<dyn TaskQueue>,
        pipeline: &PipelineConfig,
        webhook: &WebhookConfig,
        tasks: &TaskConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Background> {
        let objects = crate::storage::build(&pipeline.storage, &tasks.data_dir).await?;
        let (webhooks, deliveries) =
            WebhookSender::spawn(webhook, UrlPolicy::from_config(&pipeline.fetch), shutdown.clone())?;
        Ok(Background { queue, objects, webhooks, deliveries })
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish.
fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    })
}

/// The life of a node once its listener is up: load the models, say ready, run the workers and the
/// result purge until shutdown (or until the listener ends), then give running tasks the grace
/// period and let queued webhooks go out.
async fn run_node<Ready: Future<Output = ()>>(
    tasks: TaskConfig,
    name: String,
    mut server: JoinHandle<std::io::Result<()>>,
    services: Background,
    loader: PipelineLoader,
    shutdown: CancellationToken,
    ready: impl FnOnce(PipelineInfo) -> Ready,
) -> anyhow::Result<()> {
    let Background { queue, objects, webhooks, deliveries } = services;
    let Some(pipeline) = load_pipeline(loader, objects, &shutdown).await? else {
        finish(Some(server), JoinSet::new(), tasks.shutdown_grace).await;
        return Ok(());
    };
    ready(pipeline.info()).await;
    let workers =
        spawn_workers(&name, tasks.workers, &queue, &pipeline, &webhooks, tasks.task_deadline, &shutdown);
    let upkeep = tokio::spawn(purge_task(queue, tasks.result_ttl, shutdown.clone()));
    let listener_ended = tokio::select! {
        _ = shutdown.cancelled() => None,
        ended = &mut server => {
            shutdown.cancel();
            Some(ended)
        }
    };
    upkeep.abort();
    let still_serving = if listener_ended.is_none() { Some(server) } else { None };
    finish(still_serving, workers, tasks.shutdown_grace).await;
    // Completed-task webhooks queued during the grace period go out before the process ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), deliveries).await;
    match listener_ended {
        Some(ended) => Ok(ended.context("listener task panicked")??),
        None => Ok(()),
    }
}

/// Loads the models on a blocking thread; `None` when shutdown comes first.
async fn load_pipeline(
    loader: PipelineLoader,
    objects: Arc<dyn ObjectStore>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<dyn Pipeline>>> {
    tokio::select! {
        loaded = tokio::task::spawn_blocking(move || loader(objects)) => {
            Ok(Some(loaded.context("model loading panicked")?.context("loading models")?))
        }
        _ = shutdown.cancelled() => Ok(None),
    }
}

/// Starts `count` workers named `{node}-{index}`.
fn spawn_workers(
    node: &str,
    count: usize,
    queue: &Arc<dyn TaskQueue>,
    pipeline: &Arc<dyn Pipeline>,
    webhooks: &WebhookSender,
    deadline: Duration,
    shutdown: &CancellationToken,
) -> JoinSet<()> {
    let mut workers = JoinSet::new();
    let notifier = Notifier { sender: webhooks.clone(), render: api::render::webhook_body };
    for index in 0..count {
        workers.spawn(worker_task(
            format!("{node}-{index}"),
            queue.clone(),
            pipeline.clone(),
            notifier.clone(),
            deadline,
            shutdown.clone(),
        ));
    }
    workers
}

/// After shutdown: stop accepting, let running tasks finish within `grace`; what is left runs
/// again at the next start (memory) or on another worker after the visibility timeout (Redis).
async fn finish(server: Option<JoinHandle<std::io::Result<()>>>, mut workers: JoinSet<()>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async { while workers.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(?grace, "tasks still running after the grace period; they will run again");
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

/// This host's name, for worker names and Redis consumer names.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "deskgen".to_string())
}

/// A consumer name unique to this process, so two processes on one host never share pending work.
fn consumer_name(node: &str) -> String {
    format!("{node}-{}", std::process::id())
}

async fn connect_redis(url: &RedisUrl, options: RedisOptions) -> anyhow::Result<RedisQueue> {
    RedisQueue::connect(url, options).await.with_context(|| format!("connecting to the Redis queue at {url}"))
}

/// What a worker node's health and metrics endpoints see.
struct WorkerState {
    name: String,
    queue: Arc<dyn TaskQueue>,
    models_loaded: OnceLock<()>,
    metrics: PrometheusHandle,
}

/// Starts a worker-only node: runs tasks from the Redis queue with `config.tasks.workers` workers and
/// serves `/healthcheck` and `/metrics` on `listener`; models load in the background.
pub async fn start_worker(
    config: WorkerConfig,
    listener: TcpListener,
    loader: PipelineLoader,
) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let name = config.name.clone().unwrap_or_else(host_name);
    let options = RedisOptions {
        // Workers never submit; the queue limit is the API nodes' setting.
        capacity: 0,
        max_attempts: config.tasks.max_attempts,
        visibility_timeout: config.tasks.visibility_timeout,
        result_ttl: config.tasks.result_ttl,
        consumer: consumer_name(&name),
    };
    let queue: Arc<dyn TaskQueue> = Arc::new(connect_redis(&config.queue, options).await?);
    let shutdown = CancellationToken::new();
    let background =
        Background::start(queue, &config.pipeline, &config.webhook, &config.tasks, &shutdown).await?;
    let state = Arc::new(WorkerState {
        name,
        queue: background.queue.clone(),
        models_loaded: OnceLock::new(),
        metrics: metrics_handle(),
    });
    let app = api::with_request_metrics(
        axum::Router::new()
            .route("/healthcheck", get(worker_health))
            .route("/metrics", get(worker_metrics))
            .with_state(state.clone()),
    );
    let name = state.name.clone();
    let ready = move |_| async move {
        let _ = state.models_loaded.set(());
        tracing::info!(worker = %state.name, workers = config.tasks.workers, "models loaded; taking tasks");
    };
    let server = serve(listener, app, &shutdown);
    let node = run_node(config.tasks.clone(), name, server, background, loader, shutdown.clone(), ready);
    let handle = tokio::spawn(node);
    Ok(RunningServer { addr, shutdown, handle })
}

/// GET /healthcheck on a worker: 200 once its models are loaded and Redis answers, else 503.
async fn worker_health(State(state): State<Arc<WorkerState>>) -> Response {
    let models = state.models_loaded.get().is_some();
    let depth = state.queue.queue_depth().await;
    let queue = match &depth {
        Ok(depth) => serde_json::json!({"backend": state.queue.backend(), "state": "ok", "depth": depth}),
        Err(e) => {
            serde_json::json!({"backend": state.queue.backend(), "state": "unreachable", "error": e.to_string()})
        }
    };
    let ready = models && depth.is_ok();
    let body = serde_json::json!({
        "status": if ready { "ok" } else { "starting" },
        "worker": state.name,
        "components": {"models": if models { "ready" } else { "loading" }, "queue": queue},
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// GET /metrics on a worker: Prometheus text.
async fn worker_metrics(State(state): State<Arc<WorkerState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
