//! The worker loop: claim a task, run the pipeline with progress and cancellation, record the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{TaskRecord, WorkerQueue};
use crate::core::Progress;
use crate::inference::release_freed_memory;
use crate::pipeline::{Pipeline, RunContext};
use crate::webhook::{WebhookEvent, WebhookSender};

/// Renders a task as a webhook body; the API's function, so webhooks and results cannot drift.
pub type RenderWebhook = fn(&TaskRecord, WebhookEvent) -> serde_json::Value;

/// How workers send webhooks: the delivery queue and the body's renderer.
#[derive(Clone)]
pub struct Notifier {
    /// The delivery queue.
    pub sender: WebhookSender,
    /// Renders a record as the body of one event.
    pub render: RenderWebhook,
}

/// Runs tasks from `queue` until `shutdown` fires; the task in hand is finished first. `name`
/// labels its logs and its `deskgen_worker_tasks_total` series.
pub async fn worker_task(
    name: String,
    queue: Arc<dyn WorkerQueue>,
    pipeline: Arc<dyn Pipeline>,
    webhooks: Notifier,
    deadline: Duration,
    shutdown: CancellationToken,
) {
    tracing::debug!(worker = %name, "worker started");
    while let Some(claimed) = queue.next(&shutdown).await {
        let task_id = claimed.record.task_id.clone();
        let started = Instant::now();
        let (mut ctx, updates) = RunContext::new(task_id.clone(), claimed.cancel, started + deadline);
        let wanted = {
            let (queue, task_id) = (queue.clone(), task_id.clone());
            Arc::new(move || queue.previews_wanted(&task_id))
        };
        let previews = ctx.watch_previews(wanted);
        let forwarder =
            tokio::spawn(progress_task(queue.clone(), webhooks.clone(), claimed.record.clone(), updates));
        let preview_forwarder = tokio::spawn(preview_task(queue.clone(), task_id.clone(), previews));
        tracing::info!(%task_id, attempt = claimed.record.attempts, worker = %name, "task started");
        let span = tracing::info_span!("task", %task_id, attempt = claimed.record.attempts, worker = %name);
        crate::telemetry::adopt(&span, claimed.record.request.trace.as_deref());
        span.in_scope(|| {
            let waited = (chrono::Utc::now() - claimed.record.created_at).to_std().unwrap_or_default();
            crate::telemetry::past_span("queue_wait", std::time::SystemTime::now() - waited, waited);
            notify(&webhooks, &claimed.record, WebhookEvent::Start);
        });
        let outcome = pipeline.run(&claimed.record.request, &ctx).instrument(span.clone()).await;
        let outcome = match (outcome, ctx.check()) {
            // A stage that noticed cancellation late still ends the task as canceled.
            (Err(_), Err(interrupted)) => Err(interrupted),
            (outcome, _) => outcome,
        };
        drop(ctx);
        // The last progress is published before the final state, never after it.
        let _ = forwarder.await;
        let _ = preview_forwarder.await;
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
            span.in_scope(|| notify(&webhooks, &record, WebhookEvent::Completed));
        }
    }
    tracing::debug!(worker = %name, "worker stopped");
}

/// Publishes a task's progress to the queue (and its webhook) until the task's context is dropped.
async fn progress_task(
    queue: Arc<dyn WorkerQueue>,
    webhooks: Notifier,
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

/// Hands a task's previews to the queue's watchers until the task's context is dropped; they go
/// nowhere else (no webhook, no stored record).
async fn preview_task(
    queue: Arc<dyn WorkerQueue>,
    task_id: String,
    mut previews: mpsc::Receiver<crate::core::Preview>,
) {
    while let Some(preview) = previews.recv().await {
        queue.preview(&task_id, preview).await;
    }
}

/// Queues a webhook for `record` when its request asked for `event`; delivery never blocks a worker.
fn notify(webhooks: &Notifier, record: &TaskRecord, event: WebhookEvent) {
    let Some(url) = &record.request.webhook_url else { return };
    if !event.wanted_by(&record.request.webhook_events) {
        return;
    }
    let body = (webhooks.render)(record, event);
    if let Err(e) = webhooks.sender.enqueue(url, &record.task_id, event, &body) {
        tracing::warn!(task_id = %record.task_id, error = %e, "webhook not queued");
    }
}
