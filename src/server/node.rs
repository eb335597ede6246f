//! The life of a node once its listener is up: load the models, say ready, run the workers and the
//! result purge until shutdown, then give running tasks their grace period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::PipelineLoader;
use crate::config::TaskConfig;
use crate::core::WorkerDescription;
use crate::fetch::UrlPolicy;
use crate::pipeline::{Pipeline, PipelineConfig, Services};
use crate::storage::ObjectStore;
use crate::tasks::WorkerQueue;
use crate::tasks::worker::{Notifier, worker_task};
use crate::webhook::{WebhookConfig, WebhookSender};

/// Called once the models are loaded, before the workers start: the listener turns ready.
pub(super) type Ready = Box<dyn FnOnce(Arc<dyn Pipeline>) -> futures::future::BoxFuture<'static, ()> + Send>;

/// What every node opens before its models load: the queue, the outside services, webhook
/// delivery, and the token that stops it all.
pub(super) struct Node {
    /// Labels the node's workers and logs.
    pub name: String,
    pub tasks: TaskConfig,
    pub queue: Arc<dyn WorkerQueue>,
    pub services: Services,
    pub webhooks: WebhookSender,
    deliveries: JoinHandle<()>,
    pub shutdown: CancellationToken,
    /// On a worker node: what it tells the API nodes besides its pipeline's description.
    pub announce: Option<Announcement>,
}

/// What a worker node announces besides its pipeline's description and its name.
pub(super) struct Announcement {
    pub execution_provider: String,
    pub max_side: u32,
    pub max_images: u32,
}

/// How often a worker node announces itself, and how long each announcement lasts: a node killed
/// without a word drops out of the API nodes' view within [`ANNOUNCEMENT_TTL`].
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(10);

impl Node {
    /// Opens the object store and the shopping provider, and starts webhook delivery.
    pub async fn open(
        name: String,
        tasks: TaskConfig,
        queue: Arc<dyn WorkerQueue>,
        pipeline: &PipelineConfig,
        webhook: &WebhookConfig,
    ) -> anyhow::Result<Node> {
        let shutdown = CancellationToken::new();
        let store = crate::storage::build(&pipeline.storage, &tasks.data_dir).await?;
        let shopping = crate::shopping::build(&pipeline.shopping)?;
        let (webhooks, deliveries) =
            WebhookSender::spawn(webhook, UrlPolicy::from_config(&pipeline.fetch), shutdown.clone())?;
        let services = Services { store, shopping, downloads: Default::default() };
        Ok(Node { name, tasks, queue, services, webhooks, deliveries, shutdown, announce: None })
    }

    /// Loads the models (none without a `loader`: an API node that serves what the workers
    /// announce), calls `ready`, and runs the workers and the result purge until shutdown (or until
    /// the listener ends); then lets running tasks finish within the grace period and queued
    /// webhooks go out.
    pub async fn run(
        self,
        mut server: JoinHandle<std::io::Result<()>>,
        loader: Option<PipelineLoader>,
        ready: Ready,
    ) -> anyhow::Result<()> {
        let mut workers = JoinSet::new();
        let mut announcer = None;
        if let Some(loader) = loader {
            let Some(pipeline) = load_pipeline(loader, self.services.clone(), &self.shutdown).await? else {
                finish(Some(server), JoinSet::new(), self.tasks.shutdown_grace).await;
                return Ok(());
            };
            announcer = self.start_announcing(&pipeline).await;
            ready(pipeline.clone()).await;
            workers = self.spawn_workers(&pipeline);
        }
        let upkeep = tokio::spawn(purge_task(
            self.queue.clone(),
            self.services.store.clone(),
            Ttls { results: self.tasks.result_ttl, uploads: self.tasks.upload_ttl },
            self.shutdown.clone(),
        ));
        let listener_ended = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            ended = &mut server => {
                self.shutdown.cancel();
                Some(ended)
            }
        };
        upkeep.abort();
        if let Some(announcer) = announcer {
            announcer.abort();
            self.queue.withdraw(&self.name).await;
        }
        let still_serving = if listener_ended.is_none() { Some(server) } else { None };
        finish(still_serving, workers, self.tasks.shutdown_grace).await;
        self.queue.hand_back().await;
        // Completed-task webhooks queued during the grace period go out before the process ends.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.deliveries).await;
        match listener_ended {
            Some(ended) => Ok(ended.context("listener task panicked")??),
            None => Ok(()),
        }
    }

    /// On a worker node: announces it once, before it turns ready (a healthy worker is one the API
    /// nodes can see), then every [`ANNOUNCE_EVERY`] until the returned task is aborted.
    async fn start_announcing(&self, pipeline: &Arc<dyn Pipeline>) -> Option<JoinHandle<()>> {
        let describe = self.describer(self.announce.as_ref()?, pipeline.clone());
        announce(self.queue.as_ref(), &describe).await;
        let queue = self.queue.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                announce(queue.as_ref(), &describe).await;
            }
        }))
    }

    /// What this worker node serves now, each time it is called.
    fn describer(&self, announcement: &Announcement, pipeline: Arc<dyn Pipeline>) -> Describe {
        let (name, slots) = (self.name.clone(), self.tasks.workers);
        let (execution_provider, max_side, max_images) =
            (announcement.execution_provider.clone(), announcement.max_side, announcement.max_images);
        Box::new(move || WorkerDescription {
            name: name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            execution_provider: execution_provider.clone(),
            slots,
            max_side,
            max_images,
            pipeline: pipeline.info(),
            loaded_models: pipeline.loaded_models(),
        })
    }

    /// Starts the node's workers, named `{node}-{index}`.
    fn spawn_workers(&self, pipeline: &Arc<dyn Pipeline>) -> JoinSet<()> {
        let mut workers = JoinSet::new();
        let notifier = Notifier { sender: self.webhooks.clone(), render: crate::api::render::webhook_body };
        for index in 0..self.tasks.workers {
            workers.spawn(worker_task(
                format!("{}-{index}", self.name),
                self.queue.clone(),
                pipeline.clone(),
                notifier.clone(),
                self.tasks.task_deadline,
                self.shutdown.clone(),
            ));
        }
        workers
    }
}

/// Builds a worker node's description.
type Describe = Box<dyn Fn() -> WorkerDescription + Send + Sync>;

/// Tells the API nodes what this worker serves, for [`ANNOUNCEMENT_TTL`]; a failure is logged
/// and the next announcement tries again.
async fn announce(queue: &dyn WorkerQueue, describe: &Describe) {
    if let Err(e) = queue.announce(&describe(), ANNOUNCEMENT_TTL).await {
        tracing::warn!(error = %e, "cannot announce this worker to the API nodes");
    }
}

/// Loads the models on a blocking thread; `None` when shutdown comes first.
async fn load_pipeline(
    loader: PipelineLoader,
    services: Services,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<dyn Pipeline>>> {
    tokio::select! {
        loaded = tokio::task::spawn_blocking(move || loader(services)) => {
            Ok(Some(loaded.context("model loading panicked")?.context("loading models")?))
        }
        _ = shutdown.cancelled() => Ok(None),
    }
}

/// After shutdown: stop accepting, let running tasks finish within `grace`; what is left is
/// stopped here, then handed back to the queue (Redis) or runs again at the next start (memory).
async fn finish(server: Option<JoinHandle<std::io::Result<()>>>, mut workers: JoinSet<()>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async { while workers.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(?grace, "tasks still running after the grace period; they will run again");
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }
    // Long-lived streams (SSE, WatchResult) would hold graceful shutdown open; bound the wait.
    if let Some(server) = server {
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), server).await.is_err() {
            abort.abort();
        }
    }
}

/// How long finished results and uploaded photos are kept.
struct Ttls {
    results: Duration,
    uploads: Duration,
}

/// Drops expired results and stale uploads every few minutes.
async fn purge_task(
    queue: Arc<dyn WorkerQueue>,
    store: Arc<dyn ObjectStore>,
    ttls: Ttls,
    shutdown: CancellationToken,
) {
    let shortest = ttls.results.min(ttls.uploads).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(Duration::from_secs(300).min(shortest));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match queue.purge_expired(ttls.results).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired results removed"),
            Err(e) => tracing::warn!(error = %e, "cannot purge expired results"),
        }
        match store.purge_uploads(ttls.uploads).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "stale uploads removed"),
            Err(e) => tracing::warn!(error = %e, "cannot purge stale uploads"),
        }
    }
}
