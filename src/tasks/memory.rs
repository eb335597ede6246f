//! The embedded backend: a bounded in-process FIFO queue over the redb task store.
//!
//! Every known task sits in memory behind a `watch` channel (so pollers, SSE and `WatchResult` see
//! each change); every change of status is persisted before it is published.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{
    BackendError, CancelError, Claimed, ErrorCode, Progress, StoreError, SubmitError, TaskError, TaskOutput,
    TaskQueue, TaskRecord, TaskRequest, TaskStatus, TaskStore,
};

struct Live {
    record: watch::Sender<TaskRecord>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct HubState {
    tasks: HashMap<String, Live>,
    queue: VecDeque<String>,
    /// Submissions holding a queue slot while their record is being made durable; the receiver
    /// says whether that worked.
    admitting: HashMap<String, (TaskRecord, watch::Receiver<Option<bool>>)>,
}

/// A new record to make durable, and where to say whether it was.
type Admission = (TaskRecord, watch::Sender<Option<bool>>);

/// The embedded task queue and store.
pub struct MemoryQueue {
    store: Arc<TaskStore>,
    state: Arc<Mutex<HubState>>,
    work_available: Arc<Notify>,
    capacity: usize,
    admissions: std::sync::mpsc::Sender<Admission>,
    admission_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MemoryQueue {
    /// Closes the store before returning, as a queue without the admission thread would: a new
    /// queue can open the same data directory right after.
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.admissions, closed));
        if let Some(thread) = self.admission_thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<HubState>) -> std::sync::MutexGuard<'_, HubState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes submitted tasks durable in groups, then queues them: each commit takes every record
/// waiting at that moment, so concurrent submissions share one disk flush instead of queueing for
/// one each. Runs on its own thread (a flush blocks); a submitter that goes away meanwhile does not
/// stop its task from being queued. Ends when the queue is dropped.
fn admission_worker(
    store: Arc<TaskStore>,
    state: Arc<Mutex<HubState>>,
    work_available: Arc<Notify>,
    admissions: std::sync::mpsc::Receiver<Admission>,
) {
    while let Ok(first) = admissions.recv() {
        let mut group = vec![first];
        group.extend(admissions.try_iter());
        let records: Vec<TaskRecord> = group.iter().map(|(record, _)| record.clone()).collect();
        let stored = store.put_all(&records);
        if let Err(e) = &stored {
            tracing::error!(error = %e, tasks = records.len(), "cannot persist submitted tasks");
        }
        let mut hub = lock(&state);
        for (record, done) in group {
            hub.admitting.remove(&record.task_id);
            if stored.is_ok() {
                let task_id = record.task_id.clone();
                let (tx, _) = watch::channel(record);
                hub.tasks.insert(task_id.clone(), Live { record: tx, cancel: CancellationToken::new() });
                hub.queue.push_back(task_id);
                metrics::counter!("deskgen_tasks_submitted_total").increment(1);
                work_available.notify_one();
            }
            done.send_replace(Some(stored.is_ok()));
        }
        metrics::gauge!("deskgen_queue_depth").set(hub.queue.len() as f64);
    }
}

impl MemoryQueue {
    /// Opens the store and restores its tasks: queued ones are queued again; ones that were running
    /// when the process stopped run again, up to `max_attempts` starts, then fail.
    pub fn open(store: TaskStore, capacity: usize, max_attempts: u32) -> Result<MemoryQueue, StoreError> {
        let mut state = HubState::default();
        for mut record in store.load_all()? {
            match record.status {
                TaskStatus::Queued => state.queue.push_back(record.task_id.clone()),
                TaskStatus::Processing if record.attempts < max_attempts => {
                    tracing::warn!(task_id = %record.task_id, "task was interrupted; running it again");
                    record.status = TaskStatus::Queued;
                    record.progress = None;
                    store.put(&record)?;
                    state.queue.push_back(record.task_id.clone());
                }
                TaskStatus::Processing => {
                    record.status = TaskStatus::Failed;
                    record.progress = None;
                    record.completed_at = Some(Utc::now());
                    record.error = Some(TaskError {
                        code: ErrorCode::Internal,
                        message: format!("Interrupted {} times; not retried again.", record.attempts),
                    });
                    store.put(&record)?;
                }
                TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled => {}
            }
            let (tx, _) = watch::channel(record.clone());
            state.tasks.insert(record.task_id.clone(), Live { record: tx, cancel: CancellationToken::new() });
        }
        metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
        let store = Arc::new(store);
        let state = Arc::new(Mutex::new(state));
        let work_available = Arc::new(Notify::new());
        let (admissions, pending) = std::sync::mpsc::channel();
        let (writer, hub, notify) = (store.clone(), state.clone(), work_available.clone());
        let admission_thread = std::thread::Builder::new()
            .name("task-admission".into())
            .spawn(move || admission_worker(writer, hub, notify, pending))
            .map_err(|e| StoreError::Database(e.to_string()))?;
        Ok(MemoryQueue {
            store,
            state,
            work_available,
            capacity,
            admissions,
            admission_thread: Some(admission_thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        lock(&self.state)
    }

    fn try_claim(&self) -> Option<Claimed> {
        let mut state = self.lock();
        while let Some(task_id) = state.queue.pop_front() {
            metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
            let Some(live) = state.tasks.get(&task_id) else { continue };
            let mut record = live.record.borrow().clone();
            if record.status != TaskStatus::Queued {
                continue;
            }
            record.status = TaskStatus::Processing;
            record.attempts += 1;
            record.started_at = Some(Utc::now());
            record.progress = Some(Progress { stage: "queued".into(), step: 0, steps: 0 });
            if let Err(e) = self.store.put(&record) {
                tracing::error!(error = %e, %task_id, "cannot persist task start; leaving it queued");
                state.queue.push_front(task_id);
                return None;
            }
            live.record.send_replace(record.clone());
            let cancel = live.cancel.clone();
            // More work may be waiting; let another idle worker look.
            if !state.queue.is_empty() {
                self.work_available.notify_one();
            }
            return Some(Claimed { record, cancel });
        }
        None
    }
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    fn backend(&self) -> &'static str {
        "memory"
    }

    /// Queues a new task, or returns the existing one when `task_id` is already known (idempotent
    /// resubmission). The flag says whether the task was created by this call.
    async fn submit(&self, task_id: String, request: TaskRequest) -> Result<(TaskRecord, bool), SubmitError> {
        let (record, mut stored, created) = {
            let mut state = self.lock();
            if let Some(live) = state.tasks.get(&task_id) {
                return Ok((live.record.borrow().clone(), false));
            }
            if let Some((record, stored)) = state.admitting.get(&task_id) {
                // The same id is being admitted by another call: answer as it will be answered.
                (record.clone(), stored.clone(), false)
            } else {
                // Tasks being admitted hold their queue slot, so the limit holds under concurrency.
                if state.queue.len() + state.admitting.len() >= self.capacity {
                    metrics::counter!("deskgen_tasks_rejected_total").increment(1);
                    return Err(SubmitError::QueueFull(self.capacity));
                }
                let record = TaskRecord::new(task_id.clone(), request);
                let (done, stored) = watch::channel(None);
                state.admitting.insert(task_id.clone(), (record.clone(), stored.clone()));
                if self.admissions.send((record.clone(), done)).is_err() {
                    state.admitting.remove(&task_id);
                    return Err(BackendError("the task admission thread stopped".into()).into());
                }
                (record, stored, true)
            }
        };
        // Acknowledged only once durable (the admission thread has queued it by then): a kill -9
        // loses nothing that was acknowledged.
        let durable = matches!(stored.wait_for(Option::is_some).await.as_deref(), Ok(Some(true)));
        if durable {
            Ok((record, created))
        } else {
            Err(BackendError("the task could not be stored".into()).into())
        }
    }

    /// The current record of a task.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, BackendError> {
        Ok(self.lock().tasks.get(task_id).map(|live| live.record.borrow().clone()))
    }

    /// A receiver that sees every change of a task, starting with its current state.
    async fn watch(&self, task_id: &str) -> Result<Option<watch::Receiver<TaskRecord>>, BackendError> {
        Ok(self.lock().tasks.get(task_id).map(|live| live.record.subscribe()))
    }

    /// Tasks waiting in the queue.
    async fn queue_depth(&self) -> Result<usize, BackendError> {
        Ok(self.lock().queue.len())
    }

    /// The queue's limit.
    fn capacity(&self) -> usize {
        self.capacity
    }

    /// Waits for the next queued task and marks it processing; `None` once `shutdown` fires.
    async fn next(&self, shutdown: &CancellationToken) -> Option<Claimed> {
        loop {
            let notified = self.work_available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(claimed) = self.try_claim() {
                return Some(claimed);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// Publishes progress of a running task (kept in memory only).
    async fn progress(&self, task_id: &str, progress: Progress) {
        if let Some(live) = self.lock().tasks.get(task_id) {
            live.record.send_if_modified(|record| {
                if record.status != TaskStatus::Processing || record.progress.as_ref() == Some(&progress) {
                    return false;
                }
                record.progress = Some(progress);
                true
            });
        }
    }

    /// Records the final state of a task a worker ran.
    async fn finish(&self, task_id: &str, outcome: Result<TaskOutput, TaskError>) -> Option<TaskRecord> {
        let state = self.lock();
        let live = state.tasks.get(task_id)?;
        let mut record = live.record.borrow().clone();
        record.progress = None;
        record.completed_at = Some(Utc::now());
        match outcome {
            Ok(output) => {
                record.status = TaskStatus::Done;
                record.output = Some(output);
            }
            Err(error) => {
                record.status =
                    if error.code == ErrorCode::Canceled { TaskStatus::Canceled } else { TaskStatus::Failed };
                record.error = Some(error);
            }
        }
        if let Err(e) = self.store.put(&record) {
            tracing::error!(error = %e, %task_id, "cannot persist the final state of a task");
        }
        metrics::counter!("deskgen_tasks_finished_total", "status" => record.status.as_str()).increment(1);
        live.record.send_replace(record.clone());
        Some(record)
    }

    /// Cancels a queued task at once, or asks a running one to stop at its next check.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, CancelError> {
        let mut state = self.lock();
        let live = state.tasks.get(task_id).ok_or_else(|| CancelError::NotFound(task_id.to_string()))?;
        let mut record = live.record.borrow().clone();
        match record.status {
            TaskStatus::Queued => {
                record.status = TaskStatus::Canceled;
                record.completed_at = Some(Utc::now());
                record.error =
                    Some(TaskError { code: ErrorCode::Canceled, message: "Canceled by the client.".into() });
                self.store.put(&record).map_err(BackendError::from)?;
                live.record.send_replace(record.clone());
                state.queue.retain(|id| id != task_id);
                metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
                metrics::counter!("deskgen_tasks_finished_total", "status" => "canceled").increment(1);
                Ok(record)
            }
            TaskStatus::Processing => {
                live.cancel.cancel();
                Ok(record)
            }
            status @ (TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled) => {
                Err(CancelError::AlreadyFinished(task_id.to_string(), status.as_str()))
            }
        }
    }

    /// Drops finished tasks older than `ttl` from memory and the store.
    async fn purge_expired(&self, ttl: Duration) -> Result<usize, BackendError> {
        let cutoff = Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let expired = self.store.purge_completed_before(cutoff).map_err(BackendError::from)?;
        let mut state = self.lock();
        for id in &expired {
            state.tasks.remove(id);
        }
        Ok(expired.len())
    }
}
