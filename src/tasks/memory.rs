//! The embedded backend: a bounded in-process queue over the redb task store, served in the order
//! of [`Schedule`] (priority levels, and clients in turn within a level).
//!
//! Live tasks (queued or running) sit in memory, where pollers read them; one that is watched (SSE,
//! `WatchResult`) gets a `watch` channel at its first watcher, which sees each change from then on.
//! Finished tasks leave memory and are read from the store. A new task is journaled before it is
//! acknowledged and committed to the store at the next checkpoint (see [`super::journal`]); every
//! later change of status is committed before it is published.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::journal::{self, CHECKPOINT_INTERVAL, Journal};
use super::previews::PreviewHub;
use super::schedule::Schedule;
use super::shards::Shards;
use super::store::{Stored, Submission, encode};
use super::{
    BackendError, CancelError, Claimed, StoreError, SubmitError, TaskQueue, TaskRecord, TaskStatus,
    TaskStore, WorkerQueue, new_task_id,
};
use crate::core::{Failure, FailureCode, GenerateOutput, GenerateRequest, Preview, Progress};

struct Live {
    /// Boxed: a map's slots stay small, and a map keeps up to twice the slots it fills.
    record: Box<TaskRecord>,
    /// Those who watch it see each change; made at the first watch, as most tasks have none.
    watchers: Option<watch::Sender<TaskRecord>>,
    /// What stops it once it runs; made when a worker claims it.
    cancel: Option<CancellationToken>,
    /// Its submission number while it waits in the store's `queued` table.
    queued: Option<u64>,
}

impl Live {
    fn new(record: TaskRecord, queued: Option<u64>) -> Live {
        Live { record: Box::new(record), watchers: None, cancel: None, queued }
    }

    /// Makes `record` the task's current state, and shows it to its watchers.
    fn publish(&mut self, record: TaskRecord) {
        *self.record = record;
        self.show();
    }

    /// Shows the current state to the task's watchers.
    fn show(&self) {
        if let Some(watchers) = &self.watchers {
            watchers.send_replace(TaskRecord::clone(&self.record));
        }
    }

    /// A receiver that sees every change from now on, starting with the current state.
    fn subscribe(&mut self) -> watch::Receiver<TaskRecord> {
        self.watchers.get_or_insert_with(|| watch::channel(TaskRecord::clone(&self.record)).0).subscribe()
    }
}

struct HubState {
    /// Queued and running tasks (and a finished one whose final state could not be stored).
    tasks: Shards<Live>,
    /// The queued tasks, in the order they start.
    queue: Schedule,
    journal: Journal,
    /// Tasks appended to the journal since the last checkpoint, as submitted.
    journaled: Vec<Submission>,
    /// The next submission's number.
    next_number: u64,
}

/// The embedded task queue and store.
pub struct MemoryQueue {
    store: Arc<TaskStore>,
    state: Arc<Mutex<HubState>>,
    work_available: Arc<Notify>,
    capacity: usize,
    stop_checkpoints: Option<std::sync::mpsc::Sender<()>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    previews: PreviewHub,
}

impl Drop for MemoryQueue {
    /// Checkpoints the journal and closes the store before returning: a new queue can open the same
    /// data directory right after.
    fn drop(&mut self) {
        drop(self.stop_checkpoints.take());
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<HubState>) -> std::sync::MutexGuard<'_, HubState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Commits the tasks journaled since the last checkpoint to the store in one transaction (one disk
/// flush). A task that has since been claimed or canceled is in the store already, newer, and stays
/// as it is. On failure the tasks stay journaled for the next try.
fn checkpoint(store: &TaskStore, state: &Mutex<HubState>) {
    let (submissions, rotated) = {
        let mut hub = lock(state);
        if hub.journaled.is_empty() {
            return;
        }
        if let Err(e) = hub.journal.rotate() {
            tracing::error!(error = %e, "cannot rotate the submission journal");
            return;
        }
        (std::mem::take(&mut hub.journaled), hub.journal.rotated().to_path_buf())
    };
    match store.append_queued(&submissions) {
        // Only this thread rotates the journal, so the file aside is removed without the lock:
        // dropping its pages takes a while, and submissions need not wait for it.
        Ok(()) => {
            if let Err(e) = journal::remove_if_present(&rotated) {
                tracing::warn!(error = %e, "cannot remove a checkpointed journal");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, tasks = submissions.len(), "cannot commit journaled tasks; retrying");
            lock(state).journaled.extend(submissions);
        }
    }
}

/// Checkpoints every [`CHECKPOINT_INTERVAL`] on its own thread (a commit blocks on the disk), and
/// once more when the queue is dropped.
fn checkpoints(store: Arc<TaskStore>, state: Arc<Mutex<HubState>>, stop: std::sync::mpsc::Receiver<()>) {
    loop {
        let stopping = !matches!(stop.recv_timeout(CHECKPOINT_INTERVAL), Err(RecvTimeoutError::Timeout));
        checkpoint(&store, &state);
        if stopping {
            return;
        }
    }
}

impl MemoryQueue {
    /// Opens the store and journal in `dir` and restores their tasks, oldest first: queued ones are
    /// queued again; ones that were running when the process stopped run again, up to
    /// `max_attempts` starts, then fail. `starvation_bound` is the [`Schedule`]'s.
    pub fn open(
        dir: &Path,
        capacity: usize,
        max_attempts: u32,
        starvation_bound: u32,
    ) -> Result<MemoryQueue, StoreError> {
        let store = TaskStore::open(dir)?;
        let (mut journal, journaled) = Journal::open(dir)?;
        let mut stored = store.load_all()?;
        let mut next_number = stored.iter().filter_map(|s| s.queued).max().map_or(0, |n| n + 1);
        // What a checkpoint had committed before the process stopped is stored already.
        let known: HashSet<String> = stored.iter().map(|s| s.record.task_id.clone()).collect();
        let mut replayed = Vec::new();
        for record in journaled.into_iter().filter(|record| !known.contains(&record.task_id)) {
            replayed.push(Submission::new(next_number, &record)?);
            stored.push(Stored { record, queued: Some(next_number) });
            next_number += 1;
        }
        store.append_queued(&replayed)?;
        journal.reset()?;
        // Oldest first: the order they are queued again in.
        stored.sort_by_key(|s| s.record.created_at);
        let mut state = HubState {
            tasks: Shards::default(),
            queue: Schedule::new(starvation_bound),
            journal,
            journaled: Vec::new(),
            next_number,
        };
        for Stored { mut record, queued } in stored {
            match record.status {
                TaskStatus::Queued => {
                    state.queue.push(record.request.priority, &record.client, record.task_id.clone())
                }
                TaskStatus::Processing if record.attempts < max_attempts => {
                    tracing::warn!(task_id = %record.task_id, "task was interrupted; running it again");
                    record.status = TaskStatus::Queued;
                    record.progress = None;
                    store.put(&record, None)?;
                    state.queue.push(record.request.priority, &record.client, record.task_id.clone());
                }
                TaskStatus::Processing => {
                    record.status = TaskStatus::Failed;
                    record.progress = None;
                    record.completed_at = Some(Utc::now());
                    record.error = Some(Failure {
                        code: FailureCode::Internal,
                        message: format!("Interrupted {} times; not retried again.", record.attempts),
                    });
                    store.put(&record, None)?;
                    continue;
                }
                TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled => continue,
            }
            state.tasks.insert(record.task_id.clone(), Live::new(record, queued));
        }
        metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
        let store = Arc::new(store);
        let state = Arc::new(Mutex::new(state));
        let (stop_checkpoints, stop) = std::sync::mpsc::channel();
        let (writer, hub) = (store.clone(), state.clone());
        let checkpointer = std::thread::Builder::new()
            .name("task-checkpoint".into())
            .spawn(move || checkpoints(writer, hub, stop))
            .map_err(|e| StoreError::Database(e.to_string()))?;
        Ok(MemoryQueue {
            store,
            state,
            work_available: Arc::new(Notify::new()),
            capacity,
            stop_checkpoints: Some(stop_checkpoints),
            checkpointer: Some(checkpointer),
            previews: PreviewHub::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        lock(&self.state)
    }

    fn try_claim(&self) -> Option<Claimed> {
        let mut state = self.lock();
        while let Some(task_id) = state.queue.pop() {
            metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
            let Some(live) = state.tasks.get_mut(&task_id) else { continue };
            let mut record = TaskRecord::clone(&live.record);
            if record.status != TaskStatus::Queued {
                continue;
            }
            record.status = TaskStatus::Processing;
            record.attempts += 1;
            record.started_at = Some(Utc::now());
            record.progress = Some(Progress { stage: "queued".into(), step: 0, steps: 0 });
            if let Err(e) = self.store.put(&record, live.queued) {
                tracing::error!(error = %e, %task_id, "cannot persist task start; leaving it queued");
                state.queue.unpop(record.request.priority, &record.client, task_id);
                return None;
            }
            live.queued = None;
            live.publish(record.clone());
            let cancel = live.cancel.insert(CancellationToken::new()).clone();
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

    /// Queues a new task, or returns the existing one when the client-chosen `task_id` is already
    /// known (idempotent resubmission). The flag says whether the task was created by this call.
    async fn submit(
        &self,
        task_id: Option<String>,
        request: GenerateRequest,
        client: String,
    ) -> Result<(TaskRecord, bool), SubmitError> {
        // Everything that needs no lock is done before taking it.
        let chosen = task_id.is_some();
        let task_id = task_id.unwrap_or_else(new_task_id);
        let record = TaskRecord::new(task_id.clone(), request, client);
        let json = encode(&record).map_err(BackendError::from)?;
        let mut live = Live::new(record.clone(), None);
        let mut state = self.lock();
        if chosen {
            if let Some(live) = state.tasks.get(&task_id) {
                return Ok((TaskRecord::clone(&live.record), false));
            }
            if let Some(record) = self.store.get(&task_id).map_err(BackendError::from)? {
                return Ok((record, false));
            }
        }
        if state.queue.len() >= self.capacity {
            drop(state);
            metrics::counter!("deskgen_tasks_rejected_total").increment(1);
            return Err(SubmitError::QueueFull(self.capacity));
        }
        let number = state.next_number;
        // Acknowledged only once journaled: a kill -9 loses nothing that was acknowledged.
        state.journal.append(&json).map_err(BackendError::from)?;
        state.next_number += 1;
        state.journaled.push(Submission { number, task_id: task_id.clone(), json });
        live.queued = Some(number);
        state.tasks.insert(task_id.clone(), live);
        state.queue.push(record.request.priority, &record.client, task_id);
        metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
        drop(state);
        metrics::counter!("deskgen_tasks_submitted_total").increment(1);
        self.work_available.notify_one();
        Ok((record, true))
    }

    /// The current record of a task.
    async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, BackendError> {
        if let Some(live) = self.lock().tasks.get(task_id) {
            return Ok(Some(TaskRecord::clone(&live.record)));
        }
        Ok(self.store.get(task_id)?)
    }

    /// A receiver that sees every change of a task, starting with its current state.
    /// A finished task's receiver holds its final state and sees no further change.
    async fn watch(&self, task_id: &str) -> Result<Option<watch::Receiver<TaskRecord>>, BackendError> {
        if let Some(live) = self.lock().tasks.get_mut(task_id) {
            return Ok(Some(live.subscribe()));
        }
        Ok(self.store.get(task_id)?.map(|record| watch::channel(record).1))
    }

    async fn watch_previews(&self, task_id: &str) -> broadcast::Receiver<Preview> {
        self.previews.subscribe(task_id).0
    }

    async fn queue_position(&self, task_id: &str) -> Result<Option<usize>, BackendError> {
        let state = self.lock();
        let Some(live) = state.tasks.get(task_id) else { return Ok(None) };
        let record = &live.record;
        Ok(state.queue.position_at(task_id, record.request.priority, &record.client))
    }

    /// Tasks waiting in the queue.
    async fn queue_depth(&self) -> Result<usize, BackendError> {
        Ok(self.lock().queue.len())
    }

    /// The queue's limit.
    fn capacity(&self) -> usize {
        self.capacity
    }

    /// Cancels a queued task at once, or asks a running one to stop at its next check.
    async fn cancel(&self, task_id: &str) -> Result<TaskRecord, CancelError> {
        let mut state = self.lock();
        let Some(live) = state.tasks.get_mut(task_id) else {
            return match self.store.get(task_id).map_err(BackendError::from)? {
                Some(record) => {
                    Err(CancelError::AlreadyFinished(task_id.to_string(), record.status.as_str()))
                }
                None => Err(CancelError::NotFound(task_id.to_string())),
            };
        };
        let mut record = TaskRecord::clone(&live.record);
        match record.status {
            TaskStatus::Queued => {
                record.status = TaskStatus::Canceled;
                record.completed_at = Some(Utc::now());
                record.error = Some(Failure::canceled());
                self.store.put(&record, live.queued).map_err(BackendError::from)?;
                live.publish(record.clone());
                state.tasks.remove(task_id);
                state.queue.remove(task_id);
                metrics::gauge!("deskgen_queue_depth").set(state.queue.len() as f64);
                metrics::counter!("deskgen_tasks_finished_total", "status" => "canceled").increment(1);
                Ok(record)
            }
            TaskStatus::Processing => {
                if let Some(cancel) = &live.cancel {
                    cancel.cancel();
                }
                Ok(record)
            }
            status @ (TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled) => {
                Err(CancelError::AlreadyFinished(task_id.to_string(), status.as_str()))
            }
        }
    }
}

#[async_trait]
impl WorkerQueue for MemoryQueue {
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
        if let Some(live) = self.lock().tasks.get_mut(task_id) {
            if live.record.status != TaskStatus::Processing
                || live.record.progress.as_ref() == Some(&progress)
            {
                return;
            }
            live.record.progress = Some(progress);
            live.show();
        }
    }

    fn previews_wanted(&self, task_id: &str) -> bool {
        self.previews.watched(task_id)
    }

    async fn preview(&self, task_id: &str, preview: Preview) {
        self.previews.publish(task_id, preview);
    }

    /// Records the final state of a task a worker ran.
    async fn finish(&self, task_id: &str, outcome: Result<GenerateOutput, Failure>) -> Option<TaskRecord> {
        let mut state = self.lock();
        let live = state.tasks.get_mut(task_id)?;
        let mut record = TaskRecord::clone(&live.record);
        record.complete(outcome);
        let stored = self.store.put(&record, live.queued);
        if let Err(e) = &stored {
            tracing::error!(error = %e, %task_id, "cannot persist the final state of a task; keeping it in memory");
        }
        metrics::counter!("deskgen_tasks_finished_total", "status" => record.status.as_str()).increment(1);
        live.publish(record.clone());
        if stored.is_ok() {
            state.tasks.remove(task_id);
        }
        Some(record)
    }

    /// Nothing: a task this process was running is queued again when the store is next opened.
    async fn hand_back(&self) -> usize {
        0
    }

    /// Drops finished tasks older than `ttl` from the store (memory holds none).
    async fn purge_expired(&self, ttl: Duration) -> Result<usize, BackendError> {
        let cutoff = Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        Ok(self.store.purge_completed_before(cutoff)?.len())
    }
}
