//! The worker side: claiming the next task, heartbeats while it runs, and its end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::AsyncConnectionConfig;
use ::redis::aio::MultiplexedConnection;
use ::redis::streams::{StreamAutoClaimReply, StreamId};
use chrono::Utc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    CAS_ATTEMPTS, CONNECT_TIMEOUT, DOORBELL, GROUP, Guard, PASSED, PREFIX, QUEUED, RESPONSE_TIMEOUT,
    RedisQueueError, Shared, Stored, WORK, lock, task_key, turns_key, waiting_key,
};
use crate::core::{Failure, FailureCode, GenerateOutput, Progress};
use crate::tasks::{Claimed, TaskRecord, TaskStatus};

/// How long an idle worker waits on the doorbell for new work; also bounds how late shutdown and
/// take-overs are noticed by an idle worker.
const BLOCK: Duration = Duration::from_secs(1);
/// Longest pause between retries while Redis is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A task this process runs.
pub(super) struct Running {
    /// Token proving this claim; writes with another token are refused.
    owner: String,
    /// The latest record (progress is written from it).
    record: TaskRecord,
    /// Fires when the client cancels or the task was taken over.
    cancel: CancellationToken,
    /// Stops the heartbeat when the task leaves this process.
    _heartbeat: DropGuard,
}

/// An entry read from the work stream.
struct Entry {
    id: String,
    task_id: Option<String>,
}

impl From<StreamId> for Entry {
    fn from(entry: StreamId) -> Self {
        Entry { task_id: entry.get("task_id"), id: entry.id }
    }
}

/// Exponential backoff with jitter for retrying while Redis is unreachable.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { next: Duration::from_millis(100) }
    }

    /// The pause before the next retry.
    pub(super) fn pause(&mut self) -> Duration {
        let pause = self.next.mul_f64(rand::random_range(0.5..1.0));
        self.next = (self.next * 2).min(MAX_BACKOFF);
        pause
    }
}

impl Shared {
    pub(super) async fn next(self: &Arc<Self>, shutdown: &CancellationToken) -> Option<Claimed> {
        let mut backoff = Backoff::new();
        // Not raced against shutdown: a read that returns an entry must be run, or the entry would
        // wait for the visibility timeout. One read blocks for at most BLOCK.
        while !shutdown.is_cancelled() {
            match self.claim_next().await {
                Ok(Some(claimed)) => return Some(claimed),
                Ok(None) => backoff = Backoff::new(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read work from Redis; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.pause()) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                    // After a Redis restart without persistence the group is gone.
                    if let Err(e) = self.ensure_group().await {
                        tracing::debug!(error = %e, "cannot create the consumer group yet");
                    }
                }
            }
        }
        None
    }

    /// One round: take over an abandoned task if there is one, else the next waiting one, else
    /// wait briefly for the doorbell.
    async fn claim_next(self: &Arc<Self>) -> Result<Option<Claimed>, RedisQueueError> {
        if let Some(entry) = self.reclaim_one().await? {
            metrics::counter!("deskgen_tasks_reclaimed_total").increment(1);
            return self.claim(entry, true).await;
        }
        match self.pick().await? {
            Some(entry) => self.claim(entry, false).await,
            None => {
                self.wait_for_work().await?;
                Ok(None)
            }
        }
    }

    /// An entry whose worker stopped sending heartbeats, now claimed by this consumer.
    async fn reclaim_one(&self) -> Result<Option<Entry>, RedisQueueError> {
        let min_idle = self.options.visibility_timeout.as_millis() as u64;
        let reply: StreamAutoClaimReply = ::redis::cmd("XAUTOCLAIM")
            .arg(WORK)
            .arg(GROUP)
            .arg(&self.options.consumer)
            .arg(min_idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await?;
        Ok(reply.claimed.into_iter().next().map(Entry::from))
    }

    /// The waiting task that runs next, delivered to this consumer as a work-stream entry.
    async fn pick(&self) -> Result<Option<Entry>, RedisQueueError> {
        let picked: Option<(String, String)> = self
            .scripts
            .claim
            .key(WORK)
            .key(PASSED)
            .key(QUEUED)
            .key(DOORBELL)
            .arg(GROUP)
            .arg(&self.options.consumer)
            .arg(self.options.starvation_bound)
            .arg(PREFIX)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(picked.map(|(id, task_id)| Entry { id, task_id: Some(task_id).filter(|t| !t.is_empty()) }))
    }

    /// Waits up to [`BLOCK`] for a submission to ring the doorbell.
    async fn wait_for_work(&self) -> Result<(), RedisQueueError> {
        let mut conn = self.blocking_connection().await?;
        let _: Option<(String, String)> =
            ::redis::cmd("BLPOP").arg(DOORBELL).arg(BLOCK.as_secs_f64()).query_async(&mut conn).await?;
        // Only a connection that answered goes back to the pool.
        lock(&self.blocking).push(conn);
        Ok(())
    }

    async fn blocking_connection(&self) -> Result<MultiplexedConnection, RedisQueueError> {
        if let Some(conn) = lock(&self.blocking).pop() {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(BLOCK + RESPONSE_TIMEOUT));
        Ok(self.client.get_multiplexed_async_connection_with_config(&config).await?)
    }

    /// Acknowledges and deletes an entry whose task needs no run (finished, canceled or expired).
    async fn release(&self, entry: &Entry) -> Result<(), RedisQueueError> {
        ::redis::pipe()
            .cmd("XACK")
            .arg(WORK)
            .arg(GROUP)
            .arg(&entry.id)
            .ignore()
            .cmd("XDEL")
            .arg(WORK)
            .arg(&entry.id)
            .ignore()
            .exec_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Marks the entry's task processing under a new owner token, or ends it when it may not run
    /// again (cancel requested while its worker was gone, or out of attempts).
    async fn claim(
        self: &Arc<Self>,
        entry: Entry,
        taken_over: bool,
    ) -> Result<Option<Claimed>, RedisQueueError> {
        let Some(task_id) = entry.task_id.clone() else {
            self.release(&entry).await?;
            return Ok(None);
        };
        if taken_over {
            tracing::warn!(%task_id, entry = %entry.id, "taking over a task whose worker stopped");
        }
        for _ in 0..CAS_ATTEMPTS {
            let Some(Stored { version, mut record, cancel_requested }) = self.load(&task_id).await? else {
                self.release(&entry).await?;
                return Ok(None);
            };
            if record.status.is_final() {
                self.release(&entry).await?;
                return Ok(None);
            }
            let owner = format!("{}/{}", self.options.consumer, uuid::Uuid::new_v4());
            next_attempt(&mut record, cancel_requested, self.options.max_attempts);
            if self.commit(Guard::Version(version), &record, &owner).await?.is_none() {
                continue;
            }
            if record.status.is_final() {
                tracing::warn!(%task_id, status = record.status.as_str(), "ended a task that may not run again");
                return Ok(None);
            }
            return Ok(Some(self.hold(task_id, owner, entry.id, record)));
        }
        Err(RedisQueueError::Contended(task_id))
    }

    /// Keeps a claimed task alive with a heartbeat while this process runs it.
    fn hold(self: &Arc<Self>, task_id: String, owner: String, entry: String, record: TaskRecord) -> Claimed {
        let cancel = CancellationToken::new();
        let heartbeat = self.stop.child_token();
        tokio::spawn(heartbeat_task(
            self.clone(),
            task_id.clone(),
            owner.clone(),
            entry,
            cancel.clone(),
            heartbeat.clone(),
        ));
        let running = Running {
            owner,
            record: record.clone(),
            cancel: cancel.clone(),
            _heartbeat: heartbeat.drop_guard(),
        };
        lock(&self.running).insert(task_id, running);
        Claimed { record, cancel }
    }

    /// Fires the cancel token of a task this process runs.
    pub(super) fn cancel_running(&self, task_id: &str) {
        if let Some(running) = lock(&self.running).get(task_id) {
            running.cancel.cancel();
        }
    }

    pub(super) async fn progress(&self, task_id: &str, progress: Progress) {
        let (owner, record) = {
            let mut running = lock(&self.running);
            let Some(task) = running.get_mut(task_id) else { return };
            if task.record.progress.as_ref() == Some(&progress) {
                return;
            }
            task.record.progress = Some(progress);
            (task.owner.clone(), task.record.clone())
        };
        if let Err(e) = self.commit(Guard::Owner(&owner), &record, &owner).await {
            tracing::debug!(error = %e, %task_id, "progress not published");
        }
    }

    /// Queues every task this process still runs again, at once rather than after the visibility
    /// timeout; a task whose client asked to cancel it is left to the worker that takes it over.
    pub(super) async fn hand_back(&self) -> usize {
        let running: Vec<(String, Running)> = lock(&self.running).drain().collect();
        let mut handed = 0;
        for (task_id, Running { owner, mut record, .. }) in running {
            record.status = TaskStatus::Queued;
            record.progress = None;
            let priority = record.request.priority;
            let json = serde_json::to_string(&record).expect("task records serialise");
            let outcome: Result<u64, _> = self
                .scripts
                .hand_back
                .key(task_key(&task_id))
                .key(QUEUED)
                .key(waiting_key(priority, &record.client))
                .key(turns_key(priority))
                .key(WORK)
                .key(DOORBELL)
                .arg(&owner)
                .arg(json)
                .arg(GROUP)
                .arg(&self.updates_channel)
                .arg(&task_id)
                .arg(&record.client)
                .invoke_async(&mut self.conn())
                .await;
            match outcome {
                Ok(0) => {}
                Ok(_) => {
                    tracing::info!(%task_id, "handed an unfinished task back to the queue");
                    metrics::counter!("deskgen_tasks_handed_back_total").increment(1);
                    handed += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, %task_id, "cannot hand the task back; another worker takes it over after the visibility timeout");
                }
            }
        }
        handed
    }

    /// Records the final state, retrying through Redis outages until the visibility timeout (after
    /// which another worker has taken the task over and runs it again).
    pub(super) async fn finish(
        &self,
        task_id: &str,
        outcome: Result<GenerateOutput, Failure>,
    ) -> Option<TaskRecord> {
        let Running { owner, mut record, .. } = lock(&self.running).remove(task_id)?;
        record.complete(outcome);
        let give_up = Instant::now() + self.options.visibility_timeout;
        let mut backoff = Backoff::new();
        loop {
            match self.commit(Guard::Owner(&owner), &record, &owner).await {
                Ok(Some(_)) => return Some(record),
                Ok(None) => {
                    tracing::warn!(%task_id, "another worker took this task over; its result is discarded");
                    return None;
                }
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(error = %e, %task_id, "cannot record the final state yet; retrying");
                    tokio::time::sleep(backoff.pause()).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, %task_id, "cannot record the final state; another worker will run the task again");
                    return None;
                }
            }
        }
    }
}

/// Ends `record` without running it.
/// The task's next attempt: processing again, or ended when it may not run again (cancel requested
/// while its worker was gone, or out of attempts).
fn next_attempt(record: &mut TaskRecord, cancel_requested: bool, max_attempts: u32) {
    let interrupted = record.status == TaskStatus::Processing;
    if interrupted && cancel_requested {
        end(record, TaskStatus::Canceled, FailureCode::Canceled, "Canceled by the client.".into());
    } else if record.attempts >= max_attempts {
        let message = format!(
            "The worker running this task stopped {} times (--max-attempts {max_attempts}); not retried again.",
            record.attempts
        );
        end(record, TaskStatus::Failed, FailureCode::Internal, message);
    } else {
        record.status = TaskStatus::Processing;
        record.attempts += 1;
        record.started_at = Some(Utc::now());
        record.progress = Some(Progress { stage: "queued".into(), step: 0, steps: 0 });
    }
}

fn end(record: &mut TaskRecord, status: TaskStatus, code: FailureCode, message: String) {
    record.status = status;
    record.progress = None;
    record.completed_at = Some(Utc::now());
    record.error = Some(Failure { code, message });
}

/// Renews this worker's hold on a running task every third of the visibility timeout; fires
/// `cancel` when the client cancels or the task was taken over. Ends when `stop` fires.
async fn heartbeat_task(
    shared: Arc<Shared>,
    task_id: String,
    owner: String,
    entry: String,
    cancel: CancellationToken,
    stop: CancellationToken,
) {
    let period = (shared.options.visibility_timeout / 3).max(Duration::from_millis(10));
    // The claim itself counts as the first beat.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let beat: Result<i64, _> = shared
            .scripts
            .heartbeat
            .key(task_key(&task_id))
            .key(WORK)
            .arg(&owner)
            .arg(GROUP)
            .arg(&shared.options.consumer)
            .arg(&entry)
            .invoke_async(&mut shared.conn())
            .await;
        match beat {
            Ok(0) => {}
            Ok(1) => cancel.cancel(),
            Ok(_) => {
                tracing::warn!(%task_id, "task was taken over by another worker; stopping it here");
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, %task_id, "heartbeat failed"),
        }
    }
}
