//! Tasks: the model and its state machine, the queue backends, and the worker loop.
//!
//! [`TaskQueue`] is the one place task state changes; the API and the workers only talk to it, so
//! neither knows which backend runs underneath.

pub mod journal;
pub mod memory;
pub mod model;
pub mod previews;
pub mod redis;
pub mod schedule;
mod shards;
pub mod store;
pub mod worker;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::core::{Failure, GenerateOutput, GenerateRequest, Preview, Progress, WorkerDescription};

pub use self::redis::{RedisOptions, RedisQueue, RedisQueueError};
pub use memory::MemoryQueue;
pub use model::{TaskRecord, TaskStatus};
pub use store::{StoreError, TaskStore};

/// The backend could not be reached or refused the operation.
#[derive(Debug, thiserror::Error)]
#[error("task backend: {0}")]
pub struct BackendError(pub String);

impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> Self {
        BackendError(e.to_string())
    }
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue holds its limit of tasks already.
    #[error("the queue is full ({0} tasks); retry later")]
    QueueFull(usize),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No task has this id.
    #[error("task {0} not found")]
    NotFound(String),
    /// The task already reached a final state.
    #[error("task {0} already finished as {1}")]
    AlreadyFinished(String, &'static str),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A task handed to a worker.
pub struct Claimed {
    /// The record as it was when claimed (status processing).
    pub record: TaskRecord,
    /// Fires when the client cancels the task.
    pub cancel: CancellationToken,
}

/// A fresh task id, which no task has yet: a random UUID (v4, as the wire contract says).
pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Where tasks wait, run and are remembered, as clients see it: submit, read, watch, cancel.
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// The backend's name for /info and health.
    fn backend(&self) -> &'static str;

    /// Queues a new task of `client` (the API key's name, empty on an open API), or returns the
    /// existing one when the client-chosen `task_id` is already known (idempotent resubmission);
    /// without one the task gets a fresh id. The flag says whether this call created the task.
    async fn submit(
        &self,
        task_id: Option<String>,
        request: GenerateRequest,
        client: String,
    ) -> Result<(TaskRecord, bool), SubmitError>;

    /// The current record of a task.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, BackendError>;

    /// A receiver that sees every change of a task, starting with its current state.
    async fn watch(&self, task_id: &str) -> Result<Option<watch::Receiver<TaskRecord>>, BackendError>;

    /// The previews of a task from now on, made for as long as someone holds a receiver.
    async fn watch_previews(&self, task_id: &str) -> broadcast::Receiver<Preview>;

    /// Where a queued task stands in the order tasks would start if no more came: 1 starts next.
    /// `None` when the task is not waiting.
    async fn queue_position(&self, task_id: &str) -> Result<Option<usize>, BackendError>;

    /// Tasks waiting to run.
    async fn queue_depth(&self) -> Result<usize, BackendError>;

    /// The queue's limit.
    fn capacity(&self) -> usize;

    /// Cancels a queued task at once, or asks a running one to stop at its next check.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, CancelError>;

    /// The worker nodes announced now (Redis); none for the embedded queue, whose workers are
    /// the node's own.
    async fn live_workers(&self) -> Result<Vec<WorkerDescription>, BackendError> {
        Ok(Vec::new())
    }
}

/// The side of the queue workers and the node's housekeeping use: claiming the next task, reporting
/// its progress and how it ended, and forgetting old ones.
#[async_trait]
pub trait WorkerQueue: TaskQueue {
    /// Waits for the next queued task and marks it processing; `None` once `shutdown` fires.
    async fn next(&self, shutdown: &CancellationToken) -> Option<Claimed>;

    /// Publishes progress of a running task.
    async fn progress(&self, task_id: &str, progress: Progress);

    /// Whether anyone watches the task's previews now; asked between denoising steps, so cheap.
    fn previews_wanted(&self, task_id: &str) -> bool;

    /// Hands a preview of a running task to its watchers; it is never stored.
    async fn preview(&self, task_id: &str, preview: Preview);

    /// Records the final state of a task a worker ran.
    async fn finish(&self, task_id: &str, outcome: Result<GenerateOutput, Failure>) -> Option<TaskRecord>;

    /// Gives the tasks this process still runs back to the queue at once, when it stops after
    /// the grace period; returns how many. The embedded queue has nothing to give back: it runs
    /// them again at its next start.
    async fn hand_back(&self) -> usize;

    /// Drops finished tasks older than `ttl`; returns how many.
    async fn purge_expired(&self, ttl: Duration) -> Result<usize, BackendError>;

    /// Tells the API nodes what this worker node serves, for `ttl` (Redis; nothing for the
    /// embedded queue).
    async fn announce(&self, _description: &WorkerDescription, _ttl: Duration) -> Result<(), BackendError> {
        Ok(())
    }

    /// Takes the announcement back at once, when the node stops.
    async fn withdraw(&self, _name: &str) {}
}
