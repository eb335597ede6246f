//! The Redis backend: any number of API nodes and GPU workers share one Redis.
//!
//! Layout in Redis (every name starts with `deskgen:`):
//! - `task:{id}`: a hash with the JSON `record`, its `status`, a `version` bumped on every write,
//!   the `owner` token of the worker running it, its work-stream `entry`, and a `cancel` flag.
//!   Final records expire after the result TTL.
//! - `queued`: the set of queued task ids; its size is the global queue depth.
//! - `waiting:{level}` (`high`, `normal`, `low`): the clients with tasks waiting at that level, in
//!   the order of their turns; `waiting:{level}:{client}`: that client's waiting task ids, oldest
//!   first; `passed`: per level, how many tasks of higher levels started while it waited (see
//!   [`crate::tasks::schedule`]); `doorbell`: a one-element list an idle worker blocks on.
//! - `work`: a stream with one entry per started task, read by the consumer group
//!   `deskgen-workers`. A worker's `claim.lua` picks the next waiting task, adds its entry and
//!   delivers it to that worker in one step; the worker keeps the entry with a heartbeat while it
//!   runs the task and acknowledges it with the final state; entries idle past the visibility
//!   timeout (their worker died) are taken over with XAUTOCLAIM.
//! - channels `updates:{db}` (every record write, for watchers on any node) and `cancels:{db}`;
//!   channels are not per database in Redis, so the name carries it.
//!
//! Every write goes through one Lua script guarded by the version the writer read or by the
//! worker's owner token, so a task reaches exactly one final state even when a worker that was
//! presumed dead wakes up.

mod events;
mod work;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{Client, Script};
use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::events::Watched;
use self::work::Running;
use super::previews::PreviewHub;
use super::schedule::Schedule;
use super::{
    BackendError, CancelError, Claimed, SubmitError, TaskQueue, TaskRecord, TaskStatus, WorkerQueue,
    new_task_id,
};
use crate::config::RedisUrl;
use crate::core::{Failure, GenerateOutput, GenerateRequest, Preview, Priority, Progress, WorkerDescription};

const PREFIX: &str = "deskgen:";
const QUEUED: &str = "deskgen:queued";
const WORK: &str = "deskgen:work";
const PASSED: &str = "deskgen:passed";
const DOORBELL: &str = "deskgen:doorbell";
const GROUP: &str = "deskgen-workers";
/// Worker nodes' descriptions by name, and when each announcement runs out (ms, Redis' clock).
const WORKERS: &str = "deskgen:workers";
const WORKERS_EXPIRY: &str = "deskgen:workers:expiry";

/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest Redis may take to answer one command.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a compare-and-set is retried when another writer got there first.
const CAS_ATTEMPTS: usize = 8;

fn task_key(task_id: &str) -> String {
    format!("deskgen:task:{task_id}")
}

/// The clients with tasks waiting at a level, in turn order.
fn turns_key(priority: Priority) -> String {
    format!("deskgen:waiting:{}", priority.as_str())
}

/// One client's tasks waiting at a level.
fn waiting_key(priority: Priority, client: &str) -> String {
    format!("deskgen:waiting:{}:{client}", priority.as_str())
}

/// Errors of the Redis backend.
#[derive(Debug, thiserror::Error)]
pub enum RedisQueueError {
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A stored record could not be read back.
    #[error("redis: corrupt record of task {task_id}: {source}")]
    Corrupt {
        /// The task whose record is corrupt.
        task_id: String,
        /// Why it did not parse.
        source: serde_json::Error,
    },
    /// Redis did not answer in time.
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    /// The record kept changing under a compare-and-set.
    #[error("redis: task {0} changed too often to update it; retry")]
    Contended(String),
}

impl From<RedisQueueError> for BackendError {
    fn from(e: RedisQueueError) -> Self {
        BackendError(e.to_string())
    }
}

/// Settings of a Redis queue node.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Most queued tasks across all nodes.
    pub capacity: usize,
    /// Starts a task gets before it fails instead of being taken over again.
    pub max_attempts: u32,
    /// How long a running task may go without a heartbeat before another worker takes it over.
    pub visibility_timeout: Duration,
    /// How long final records are kept.
    pub result_ttl: Duration,
    /// This process's consumer name in the consumer group.
    pub consumer: String,
    /// Tasks of higher levels that may start while a lower level waits before it gets a turn
    /// (the same on every node).
    pub starvation_bound: u32,
    /// How long a consumer with nothing pending may go without reading before it is removed from
    /// the group.
    pub consumer_expiry: Duration,
}

/// A task as stored: its record, the version it was read at, and whether a cancel was requested.
struct Stored {
    version: u64,
    record: TaskRecord,
    cancel_requested: bool,
}

/// Who may write a record: whoever read this version, or the worker holding this owner token.
enum Guard<'a> {
    Version(u64),
    Owner(&'a str),
}

struct Scripts {
    submit: Script,
    claim: Script,
    unqueue: Script,
    waiting: Script,
    forget_consumers: Script,
    hand_back: Script,
    commit: Script,
    heartbeat: Script,
    request_cancel: Script,
    announce: Script,
    live_workers: Script,
}

/// State shared by the queue and its background tasks.
struct Shared {
    client: Client,
    conn: ConnectionManager,
    /// Connections for blocking stream reads, which would stall every other command on the shared
    /// multiplexed connection.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    options: RedisOptions,
    scripts: Scripts,
    /// Tasks this process runs, by id.
    running: Mutex<HashMap<String, Running>>,
    /// Tasks watched on this node, by id.
    watchers: Mutex<HashMap<String, Watched>>,
    /// Where every record write is published.
    updates_channel: String,
    /// Where cancels of running tasks are published.
    cancels_channel: String,
    /// Where workers publish previews: "<task id> <step> <steps> " and the JPEG's bytes.
    previews_channel: String,
    /// Where API nodes say, again and again while it lasts, that a task's previews are watched.
    preview_interest_channel: String,
    /// The preview watchers on this node.
    previews: PreviewHub,
    /// Until when someone watches each task's previews, by id, as API nodes last said.
    preview_interest: Mutex<HashMap<String, Instant>>,
    /// Cancelled when the queue is dropped; stops the background tasks.
    stop: CancellationToken,
}

/// The task queue and store in Redis, shared by every API node and worker.
pub struct RedisQueue {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RedisQueue {
    /// Connects to Redis, creates the consumer group if needed, and starts listening for task
    /// updates and cancels. Fails when Redis cannot be reached now; later outages are retried.
    pub async fn connect(url: &RedisUrl, options: RedisOptions) -> Result<RedisQueue, RedisQueueError> {
        let client = Client::open(url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let db = client.get_connection_info().redis_settings().db();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            client,
            conn,
            blocking: Mutex::new(Vec::new()),
            options,
            scripts: Scripts {
                submit: Script::new(include_str!("submit.lua")),
                claim: Script::new(include_str!("claim.lua")),
                unqueue: Script::new(include_str!("unqueue.lua")),
                waiting: Script::new(include_str!("waiting.lua")),
                forget_consumers: Script::new(include_str!("forget_consumers.lua")),
                announce: Script::new(include_str!("announce.lua")),
                live_workers: Script::new(include_str!("live_workers.lua")),
                hand_back: Script::new(include_str!("hand_back.lua")),
                commit: Script::new(include_str!("commit.lua")),
                heartbeat: Script::new(include_str!("heartbeat.lua")),
                request_cancel: Script::new(include_str!("request_cancel.lua")),
            },
            running: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            updates_channel: format!("deskgen:updates:{db}"),
            cancels_channel: format!("deskgen:cancels:{db}"),
            previews_channel: format!("deskgen:previews:{db}"),
            preview_interest_channel: format!("deskgen:preview-interest:{db}"),
            previews: PreviewHub::default(),
            preview_interest: Mutex::new(HashMap::new()),
            stop: stop.clone(),
        });
        shared.ensure_group().await?;
        tracing::info!(redis = %url, consumer = %shared.options.consumer, "connected to the Redis task queue");
        tokio::spawn(events::events_task(shared.clone()));
        tokio::spawn(gauges_task(shared.clone()));
        Ok(RedisQueue { shared, _stop: stop.drop_guard() })
    }
}

impl Shared {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Creates the work stream and its consumer group unless they exist (again, after Redis lost
    /// its data).
    async fn ensure_group(&self) -> Result<(), RedisQueueError> {
        let created: Result<(), _> = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(WORK)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// The stored task, if any.
    async fn load(&self, task_id: &str) -> Result<Option<Stored>, RedisQueueError> {
        let (version, record, cancel): (Option<u64>, Option<String>, Option<String>) = ::redis::cmd("HMGET")
            .arg(task_key(task_id))
            .arg("version")
            .arg("record")
            .arg("cancel")
            .query_async(&mut self.conn())
            .await?;
        let (Some(version), Some(record)) = (version, record) else { return Ok(None) };
        let record = serde_json::from_str(&record)
            .map_err(|source| RedisQueueError::Corrupt { task_id: task_id.to_string(), source })?;
        Ok(Some(Stored { version, record, cancel_requested: cancel.as_deref() == Some("1") }))
    }

    /// Writes `record` if `guard` still holds; the new version, or `None` when it did not.
    async fn commit(
        &self,
        guard: Guard<'_>,
        record: &TaskRecord,
        owner: &str,
    ) -> Result<Option<u64>, RedisQueueError> {
        let (kind, value) = match guard {
            Guard::Version(version) => ("version", version.to_string()),
            Guard::Owner(owner) => ("owner", owner.to_string()),
        };
        let json = serde_json::to_string(record).expect("task records serialise");
        let ttl = self.options.result_ttl.as_secs().max(1);
        let version: u64 = self
            .scripts
            .commit
            .key(task_key(&record.task_id))
            .key(QUEUED)
            .key(WORK)
            .arg(kind)
            .arg(value)
            .arg(&record.task_id)
            .arg(json)
            .arg(record.status.as_str())
            .arg(owner)
            .arg(if record.status.is_final() { "1" } else { "0" })
            .arg(ttl)
            .arg(GROUP)
            .arg(&self.updates_channel)
            .invoke_async(&mut self.conn())
            .await?;
        if version > 0 && record.status.is_final() {
            metrics::counter!("deskgen_tasks_finished_total", "status" => record.status.as_str())
                .increment(1);
        }
        Ok((version > 0).then_some(version))
    }

    async fn submit(
        &self,
        task_id: Option<String>,
        request: GenerateRequest,
        client: String,
    ) -> Result<(TaskRecord, bool), SubmitError> {
        let record = TaskRecord::new(task_id.unwrap_or_else(new_task_id), request, client);
        let json = serde_json::to_string(&record).expect("task records serialise");
        let priority = record.request.priority;
        let (outcome, existing): (i64, String) = self
            .scripts
            .submit
            .key(task_key(&record.task_id))
            .key(QUEUED)
            .key(waiting_key(priority, &record.client))
            .key(turns_key(priority))
            .key(DOORBELL)
            .arg(&record.task_id)
            .arg(json)
            .arg(self.options.capacity)
            .arg(&record.client)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| BackendError::from(RedisQueueError::from(e)))?;
        match outcome {
            1 => {
                metrics::counter!("deskgen_tasks_submitted_total").increment(1);
                Ok((record, true))
            }
            0 => {
                let existing = serde_json::from_str(&existing).map_err(|source| {
                    BackendError::from(RedisQueueError::Corrupt { task_id: record.task_id.clone(), source })
                })?;
                Ok((existing, false))
            }
            _ => {
                metrics::counter!("deskgen_tasks_rejected_total").increment(1);
                Err(SubmitError::QueueFull(self.options.capacity))
            }
        }
    }

    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, CancelError> {
        for _ in 0..CAS_ATTEMPTS {
            let stored = self.load(task_id).await.map_err(BackendError::from)?;
            let Some(Stored { version, mut record, .. }) = stored else {
                return Err(CancelError::NotFound(task_id.to_string()));
            };
            match record.status {
                TaskStatus::Queued => {
                    record.status = TaskStatus::Canceled;
                    record.completed_at = Some(Utc::now());
                    record.error = Some(Failure::canceled());
                    let committed = self
                        .commit(Guard::Version(version), &record, "")
                        .await
                        .map_err(BackendError::from)?;
                    if committed.is_some() {
                        self.unqueue(&record).await.map_err(BackendError::from)?;
                        return Ok(record);
                    }
                }
                TaskStatus::Processing => {
                    let flagged: i64 = self
                        .scripts
                        .request_cancel
                        .key(task_key(task_id))
                        .arg(task_id)
                        .arg(&self.cancels_channel)
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(|e| BackendError::from(RedisQueueError::from(e)))?;
                    if flagged == 1 {
                        return Ok(record);
                    }
                }
                status @ (TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled) => {
                    return Err(CancelError::AlreadyFinished(task_id.to_string(), status.as_str()));
                }
            }
        }
        Err(BackendError::from(RedisQueueError::Contended(task_id.to_string())).into())
    }

    /// Takes a canceled task off the waiting lists (claims skip it anyway; this keeps the places
    /// of the others right).
    async fn unqueue(&self, record: &TaskRecord) -> Result<(), RedisQueueError> {
        let priority = record.request.priority;
        let _: i64 = self
            .scripts
            .unqueue
            .key(waiting_key(priority, &record.client))
            .key(turns_key(priority))
            .arg(&record.task_id)
            .arg(&record.client)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The waiting tasks, read from Redis in one step, as a [`Schedule`] to tell places in.
    async fn schedule(&self) -> Result<Schedule, RedisQueueError> {
        type Level = Vec<(String, Vec<String>)>;
        let (high_passed, normal_passed, low_passed, high, normal, low): (
            u32,
            u32,
            u32,
            Level,
            Level,
            Level,
        ) = self.scripts.waiting.key(PASSED).arg(PREFIX).invoke_async(&mut self.conn()).await?;
        Ok(Schedule::from_parts(
            self.options.starvation_bound,
            [high, normal, low],
            [high_passed, normal_passed, low_passed],
        ))
    }

    /// Queued tasks across all nodes.
    async fn queue_depth(&self) -> Result<usize, RedisQueueError> {
        let depth: usize = ::redis::cmd("SCARD").arg(QUEUED).query_async(&mut self.conn()).await?;
        metrics::gauge!("deskgen_queue_depth").set(depth as f64);
        Ok(depth)
    }

    /// Removes consumers with nothing pending that have not read for `--consumer-expiry`, and
    /// publishes the tasks pending with each one kept and in all.
    async fn forget_idle_consumers(&self) -> Result<(), RedisQueueError> {
        let (removed, kept): (Vec<String>, Vec<(String, u64)>) = self
            .scripts
            .forget_consumers
            .key(WORK)
            .arg(GROUP)
            .arg(self.options.consumer_expiry.as_millis() as u64)
            .arg(&self.options.consumer)
            .invoke_async(&mut self.conn())
            .await?;
        for consumer in removed {
            tracing::info!(%consumer, "removed a worker's consumer that has been gone past --consumer-expiry");
            metrics::counter!("deskgen_consumers_removed_total").increment(1);
            metrics::gauge!("deskgen_queue_pending_by_consumer", "consumer" => consumer).set(0.0);
        }
        let mut pending = 0;
        for (consumer, held) in kept {
            metrics::gauge!("deskgen_queue_pending_by_consumer", "consumer" => consumer).set(held as f64);
            pending += held;
        }
        metrics::gauge!("deskgen_queue_pending").set(pending as f64);
        Ok(())
    }
}

/// Keeps the queue gauges current on every node, whether or not anything scrapes health, and
/// removes the consumers of workers that are gone.
async fn gauges_task(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        // Errors show in health; the gauges just keep their last value.
        let _ = shared.queue_depth().await;
        if let Err(e) = shared.forget_idle_consumers().await {
            tracing::debug!(error = %e, "cannot look over the consumer group");
        }
    }
}

#[async_trait]
impl TaskQueue for RedisQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    /// Queues a new task unless its id is known or the global queue is full, atomically.
    async fn submit(
        &self,
        task_id: Option<String>,
        request: GenerateRequest,
        client: String,
    ) -> Result<(TaskRecord, bool), SubmitError> {
        self.shared.submit(task_id, request, client).await
    }

    /// The current record of a task.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, BackendError> {
        Ok(self.shared.load(task_id).await?.map(|stored| stored.record))
    }

    /// A receiver fed by this node's subscription to task updates; it closes after the final state.
    async fn watch(&self, task_id: &str) -> Result<Option<watch::Receiver<TaskRecord>>, BackendError> {
        Ok(self.shared.watch(task_id).await?)
    }

    /// Previews from whichever worker runs the task, through this node's subscription.
    async fn watch_previews(&self, task_id: &str) -> broadcast::Receiver<Preview> {
        let (receiver, first) = self.shared.previews.subscribe(task_id);
        if first {
            tokio::spawn(events::announce_interest(self.shared.clone(), task_id.to_string()));
        }
        receiver
    }

    /// The task's place among the tasks waiting in Redis now (entries left in the work stream by
    /// earlier versions are not counted).
    async fn queue_position(&self, task_id: &str) -> Result<Option<usize>, BackendError> {
        Ok(self.shared.schedule().await?.position(task_id))
    }

    /// Queued tasks across all nodes.
    async fn queue_depth(&self) -> Result<usize, BackendError> {
        Ok(self.shared.queue_depth().await?)
    }

    /// The global queue limit.
    fn capacity(&self) -> usize {
        self.shared.options.capacity
    }

    /// Cancels a queued task at once, or flags a running one and tells its worker, on any node.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, CancelError> {
        self.shared.cancel(task_id).await
    }

    /// The worker nodes whose last announcement has not run out, by name; an unreadable
    /// description (from another version) is skipped.
    async fn live_workers(&self) -> Result<Vec<WorkerDescription>, BackendError> {
        let shared = &self.shared;
        let found: Vec<Option<String>> = shared
            .scripts
            .live_workers
            .key(WORKERS)
            .key(WORKERS_EXPIRY)
            .invoke_async(&mut shared.conn())
            .await
            .map_err(RedisQueueError::from)?;
        let live: Vec<WorkerDescription> =
            found.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect();
        metrics::gauge!("deskgen_live_workers").set(live.len() as f64);
        Ok(live)
    }
}

#[async_trait]
impl WorkerQueue for RedisQueue {
    /// Takes over a task whose worker died, or waits for a new one; retries while Redis is down.
    async fn next(&self, shutdown: &CancellationToken) -> Option<Claimed> {
        self.shared.next(shutdown).await
    }

    /// Publishes progress of a task this process runs (best effort: progress is latest-wins).
    async fn progress(&self, task_id: &str, progress: Progress) {
        self.shared.progress(task_id, progress).await
    }

    /// Whether an API node said lately that someone watches the task's previews.
    fn previews_wanted(&self, task_id: &str) -> bool {
        lock(&self.shared.preview_interest).get(task_id).is_some_and(|until| *until > Instant::now())
    }

    /// Publishes a preview to every node (best effort: a lost one is followed by the next).
    async fn preview(&self, task_id: &str, preview: Preview) {
        self.shared.publish_preview(task_id, preview).await
    }

    /// Records the final state unless another worker took the task over meanwhile.
    async fn finish(&self, task_id: &str, outcome: Result<GenerateOutput, Failure>) -> Option<TaskRecord> {
        lock(&self.shared.preview_interest).remove(task_id);
        self.shared.finish(task_id, outcome).await
    }

    /// Queues the tasks this process still runs again, first of their clients' waiting tasks.
    async fn hand_back(&self) -> usize {
        self.shared.hand_back().await
    }

    /// Redis expires final records by itself; nothing to do here.
    async fn purge_expired(&self, _ttl: Duration) -> Result<usize, BackendError> {
        Ok(0)
    }

    /// Writes the description, live for `ttl` from now.
    async fn announce(&self, description: &WorkerDescription, ttl: Duration) -> Result<(), BackendError> {
        let shared = &self.shared;
        let json = serde_json::to_string(description).expect("a description serialises");
        let _: i64 = shared
            .scripts
            .announce
            .key(WORKERS)
            .key(WORKERS_EXPIRY)
            .arg(&description.name)
            .arg(json)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut shared.conn())
            .await
            .map_err(RedisQueueError::from)?;
        Ok(())
    }

    /// Removes the description at once.
    async fn withdraw(&self, name: &str) {
        let removed: Result<(), _> = ::redis::pipe()
            .hdel(WORKERS, name)
            .zrem(WORKERS_EXPIRY, name)
            .query_async(&mut self.shared.conn())
            .await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "cannot withdraw this worker's description; it runs out by itself");
        }
    }
}
