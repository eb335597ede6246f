//! An API node's listener: gRPC, grpc-web and REST on one port, and the process's metrics.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceExt;

use super::node::{Node, Ready};
use crate::api::auth::ApiKeys;
use crate::api::edge::Edge;
use crate::api::fleet::{self, Fleet};
use crate::api::grpc::pb::generate_server::GenerateServer;
use crate::api::grpc::pb::info_server::InfoServer;
use crate::api::grpc::pb::result_server::ResultServer;
use crate::api::grpc::{GrpcApi, check_auth, pb};
use crate::api::guard::BrowserPolicy;
use crate::api::{self, About, AppState, ReadyPipeline};
use crate::config::{ReadTimeouts, ServeConfig};
use crate::core::Limits;
use crate::intake::Intake;

/// gRPC service names reported by the health service.
const SERVICE_NAMES: [&str; 3] = ["deskgen.v1.Generate", "deskgen.v1.Result", "deskgen.v1.Info"];

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

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish. A client has
/// `timeouts.header` to send a request's headers (HTTP/1.1; the connection closes after that).
pub(super) fn serve(
    listener: TcpListener,
    app: axum::Router,
    timeouts: ReadTimeouts,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header);
        // CONNECT for HTTP/2 websockets, as axum::serve enables it.
        builder.http2().enable_connect_protocol();
        let connections = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let service = TowerToHyperService::new(
                app.clone().map_request(|r: http::Request<Incoming>| r.map(Body::new)),
            );
            let connection =
                builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let connection = connections.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        connections.shutdown().await;
        Ok(())
    })
}

/// The API node's routes, and what turns them ready once the models are loaded. With `fleet` (an
/// API node that loads no models) readiness follows the live workers instead, read by a task
/// that runs until the node stops.
pub(super) async fn api_app(
    config: &ServeConfig,
    addr: SocketAddr,
    node: &Node,
    fleet: Option<Arc<Fleet>>,
) -> anyhow::Result<(axum::Router, Ready)> {
    let keys = ApiKeys::load(&config.api_keys, config.api_key_file.as_deref()).context("reading API keys")?;
    let open = keys.is_open();
    if open {
        tracing::warn!("no API key configured: anyone who can reach {addr} can submit tasks");
    }
    let state = Arc::new(AppState {
        queue: node.queue.clone(),
        services: node.services.clone(),
        keys,
        limits: Limits { max_side: config.pipeline.max_side, max_images: config.pipeline.max_images },
        intake: Intake {
            max_bytes: config.max_upload_bytes,
            max_pixels: config.pipeline.vision.max_image_pixels,
        },
        webhooks: node.webhooks.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics: metrics_handle(),
        pipeline: OnceLock::new(),
        fleet: fleet.clone(),
        about: About {
            queue_backend: node.queue.backend().into(),
            execution_provider: config.pipeline.runtime.execution_provider.as_str().into(),
        },
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    set_serving(&health, ServingStatus::NotServing).await;
    if let Some(fleet) = fleet {
        tokio::spawn(follow_workers(fleet, health.clone(), node.shutdown.clone()));
    }
    let grpc = grpc_routes(&state, health_service)?;
    let mut routes = api::rest_router(state.clone()).merge(grpc);
    if let Some(images) = node.services.store.router() {
        routes = routes.merge(images);
    }
    let policy = Arc::new(BrowserPolicy::new(addr, &config.cors_allow_origins, &config.public_hosts, open));
    let edge = Edge::guarded(policy.clone(), config.read_timeouts.body);
    let app = api::with_edge(routes, edge).layer(policy.cors());
    let workers = config.tasks.workers;
    let ready: Ready = Box::new(move |pipeline| {
        Box::pin(async move {
            let _ = state.pipeline.set(ReadyPipeline { info: Arc::new(pipeline.info()), pipeline });
            set_serving(&health, ServingStatus::Serving).await;
            tracing::info!(workers, "models loaded; ready");
        })
    });
    Ok((app, ready))
}

/// Reads the workers' announcements every [`fleet::REFRESH_EVERY`] until `shutdown`, and turns
/// gRPC health serving while enough workers are live.
async fn follow_workers(fleet: Arc<Fleet>, health: HealthReporter, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(fleet::REFRESH_EVERY);
    let mut was_ready = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        fleet.refresh().await;
        let ready = fleet.ready();
        if ready != was_ready {
            set_serving(&health, if ready { ServingStatus::Serving } else { ServingStatus::NotServing })
                .await;
            was_ready = ready;
        }
    }
}

/// The gRPC services (auth on Generate and Result), health, reflection, and grpc-web over them.
fn grpc_routes(
    state: &Arc<AppState>,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) -> anyhow::Result<axum::Router> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.ErrorInfo / BadRequest, so grpcurl can print error details, not raw bytes.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let services = GrpcApi::new(state.clone());
    let auth_state = state.clone();
    let auth = move |request: Request<()>| -> Result<Request<()>, Status> {
        check_auth(&auth_state, &request)?;
        Ok(request)
    };
    let max = state.max_body_bytes;
    // A Generate message may carry the photo's bytes.
    let with_photo = max + state.intake.max_bytes as usize;
    let routes = tonic::service::Routes::new(InterceptedService::new(
        GenerateServer::new(services.clone()).max_decoding_message_size(with_photo),
        auth.clone(),
    ))
    .add_service(InterceptedService::new(
        ResultServer::new(services.clone()).max_decoding_message_size(max),
        auth,
    ))
    .add_service(InfoServer::new(services))
    .add_service(health)
    .add_service(reflection().build_v1()?)
    .add_service(reflection().build_v1alpha()?);
    Ok(routes.into_axum_router().layer(tonic_web::GrpcWebLayer::new()))
}

/// Sets every gRPC service's health status, and the server's (the empty name).
async fn set_serving(health: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, status).await;
    }
}
