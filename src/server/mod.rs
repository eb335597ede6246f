//! Starting and stopping the service. An API node ([`start`]) serves gRPC, grpc-web and REST on
//! one listener and may run workers; a worker node ([`start_worker`]) runs tasks from Redis and
//! serves only health and metrics. Both open the same [`node::Node`]: queue, object store, shopping
//! and webhook delivery, then load the models in the background.

mod listener;
mod node;
mod queue;
mod worker;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::fleet::Fleet;
use crate::config::{ServeConfig, WorkerConfig};
use crate::pipeline::{Pipeline, Services};

pub use listener::metrics_handle;
pub use queue::host_name;

/// Builds the pipeline over the node's outside services; runs on a blocking thread while the
/// listener already answers health checks.
pub type PipelineLoader = Box<dyn FnOnce(Services) -> anyhow::Result<Arc<dyn Pipeline>> + Send>;

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

/// Starts an API node on `listener`; models load in the background (health reports NOT_SERVING
/// until then). With the Redis queue and no workers of its own it loads none: it serves what the
/// live worker nodes announce (`loader` is not called).
pub async fn start(
    mut config: ServeConfig,
    listener: TcpListener,
    loader: PipelineLoader,
) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    config.pipeline.storage.image_base_url.get_or_insert_with(|| own_base_url(addr));
    let queue = queue::open_for_api(&config).await?;
    let model_free = config.tasks.workers == 0 && queue.backend() == "redis";
    let fleet = model_free.then(|| Arc::new(Fleet::new(queue.clone(), config.min_workers as usize)));
    let node =
        node::Node::open(queue::host_name(), config.tasks.clone(), queue, &config.pipeline, &config.webhook)
            .await?;
    let (app, ready) = listener::api_app(&config, addr, &node, fleet).await?;
    let shutdown = node.shutdown.clone();
    let server = listener::serve(listener, app, config.read_timeouts, &shutdown);
    let loader = if model_free { None } else { Some(loader) };
    let handle = tokio::spawn(node.run(server, loader, ready));
    Ok(RunningServer { addr, shutdown, handle })
}

/// The URL this node's images are reached at when `--image-base-url` is not given: the address
/// the listener is bound to, with loopback in place of an unspecified address.
fn own_base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Starts a worker node: runs tasks from the Redis queue with `config.tasks.workers` workers and
/// serves `/healthcheck` and `/metrics` on `listener`; models load in the background.
pub async fn start_worker(
    config: WorkerConfig,
    listener: TcpListener,
    loader: PipelineLoader,
) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let name = config.name.clone().unwrap_or_else(queue::host_name);
    let queue = queue::open_for_worker(&config, &name).await?;
    let mut node =
        node::Node::open(name, config.tasks.clone(), queue, &config.pipeline, &config.webhook).await?;
    node.announce = Some(node::Announcement {
        execution_provider: config.pipeline.runtime.execution_provider.as_str().to_string(),
        max_side: config.pipeline.max_side,
        max_images: config.pipeline.max_images,
    });
    let (app, ready) = worker::app(&node, config.tasks.workers);
    let shutdown = node.shutdown.clone();
    let server = listener::serve(listener, app, config.read_timeouts, &shutdown);
    let handle = tokio::spawn(node.run(server, Some(loader), ready));
    Ok(RunningServer { addr, shutdown, handle })
}
