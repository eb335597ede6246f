//! The worker loop: claim a task, run the pipeline with progress and cancellation, record the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use super::{ErrorCode, Progress, TaskError, TaskQueue, TaskRecord};
use crate::pipeline::Pipeline;
use crate::webhook::{WebhookEvent, WebhookSender};

/// What a pipeline stage sees of its task: progress reporting, cancellation and the deadline.
///
/// Progress is latest-wins and never blocks: stages call it from blocking inference threads, and
/// a forwarder publishes it to the queue backend. Clones share the task (blocking stages take one
/// to their thread).
#[derive(Clone)]
pub struct TaskContext {
    task_id: String,
    progress: Arc<watch::Sender<Option<Progress>>>,
    cancel: CancellationToken,
    deadline: Instant,
}

impl TaskContext {
    /// A context for `task_id` that cancels when `cancel` fires or `deadline` passes, and a receiver
    /// of its progress.
    pub fn new(
        task_id: String,
        cancel: CancellationToken,
        deadline: Instant,
    ) -> (TaskContext, watch::Receiver<Option<Progress>>) {
        let (progress, updates) = watch::channel(None);
        (TaskContext { task_id, progress: Arc::new(progress), cancel, deadline }, updates)
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Publishes progress: `step` of `steps` done in `stage`.
    pub fn progress(&self, stage: &str, step: u32, steps: u32) {
        self.progress.send_replace(Some(Progress { stage: stage.to_string(), step, steps }));
    }

    /// Err when the client canceled or the deadline passed; stages call it between units of work.
    pub fn check(&self) -> Result<(), TaskError> {
        if self.cancel.is_cancelled() {
            return Err(TaskError { code: ErrorCode::Canceled, message: "Canceled by the client.".into() });
        }
        if Instant::now() >= self.deadline {
            return Err(TaskError {
                code: ErrorCode::Timeout,
                message: "The task ran past its deadline.".into(),
            });
        }
        Ok(())
    }
}

/// Runs tasks from `queue` until `shutdown` fires; the task in hand is finished first. `name`
/// labels its logs and its `deskgen_worker_tasks_total` series.
pub async fn worker_task(
    name: String,
    queue: Arc<dyn TaskQueue>,
    pipeline: Arc<dyn Pipeline>,
    webhooks: WebhookSender,
    deadline: Duration,
    shutdown: CancellationToken,
) {
    tracing::debug!(worker = %name, "worker started");
    while let Some(claimed) = queue.next(&shutdown).await {
        let task_id = claimed.record.task_id.clone();
        let started = Instant::now();
        let (ctx, updates) = TaskContext::new(task_id.clone(), claimed.cancel, started + deadline);
        let forwarder =
            tokio::spawn(progress_task(queue.clone(), webhooks.clone(), claimed.record.clone(), updates));
        tracing::info!(%task_id, attempt = claimed.record.attempts, worker = %name, "task started");
        notify(&webhooks, &claimed.record, WebhookEvent::Start);
        let outcome = pipeline.run(&claimed.record, &ctx).await;
        let outcome = match (outcome, ctx.check()) {
            // A stage that noticed cancellation late still ends the task as canceled.
            (Err(_), Err(interrupted)) => Err(interrupted),
            (outcome, _) => outcome,
        };
        drop(ctx);
        // The last progress is published before the final state, never after it.
        let _ = forwarder.await;
        release_freed_memory();
        if let Some(record) = queue.finish(&task_id, outcome).await {
            let secs = started.elapsed().as_secs_f64();
            metrics::counter!("deskgen_worker_tasks_total", "worker" => name.clone()).increment(1);
            metrics::histogram!("deskgen_task_seconds", "status" => record.status.as_str()).record(secs);
            if let Some(output) = &record.output {
                for (stage, ms) in &output.timings_ms {
                    metrics::histogram!("deskgen_stage_seconds", "stage" => stage.clone())
                        .record(ms / 1000.0);
                }
            }
            tracing::info!(%task_id, status = record.status.as_str(), secs, "task finished");
            notify(&webhooks, &record, WebhookEvent::Completed);
        }
    }
    tracing::debug!(worker = %name, "worker stopped");
}

/// Hands the memory a task freed back to the system. A task allocates and frees hundreds of
/// megabytes in buffers of many sizes on several threads; glibc keeps freed pages in per-thread
/// arenas, and a long-running process grew by tens of MiB per thousand tasks without this.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes the allocator's own
    // locks and touches no memory the program owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Publishes a task's progress to the queue (and its webhook) until the task's context is dropped.
async fn progress_task(
    queue: Arc<dyn TaskQueue>,
    webhooks: WebhookSender,
    mut record: TaskRecord,
    mut updates: watch::Receiver<Option<Progress>>,
) {
    while updates.changed().await.is_ok() {
        let latest = updates.borrow_and_update().clone();
        if let Some(progress) = latest {
            queue.progress(&record.task_id, progress.clone()).await;
            record.progress = Some(progress);
            notify(&webhooks, &record, WebhookEvent::Progress);
        }
    }
}

/// Queues a webhook for `record` when its request asked for `event`; delivery never blocks a worker.
fn notify(webhooks: &WebhookSender, record: &TaskRecord, event: WebhookEvent) {
    let Some(url) = &record.request.webhook_url else { return };
    if !event.wanted_by(&record.request.webhook_events) {
        return;
    }
    let mut body = record.to_result_json();
    body["event"] = serde_json::json!(event.as_str());
    if let Err(e) = webhooks.enqueue(url, &record.task_id, event, &body) {
        tracing::warn!(task_id = %record.task_id, error = %e, "webhook not queued");
    }
}
