//! Task updates, cancels and previews over pub/sub: one subscription per node feeds every local
//! watcher (`GetResult` streams, SSE, `Prefer: wait`) and every task this node runs.

use std::collections::hash_map;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::Msg;
use futures::StreamExt;
use tokio::sync::watch;

use super::work::Backoff;
use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT, RedisQueueError, Shared, lock};
use crate::core::Preview;
use crate::tasks::TaskRecord;

/// How often a node watching a task's previews says so.
const INTEREST_EVERY: Duration = Duration::from_secs(1);
/// How long a worker keeps making previews after the last word that someone watches.
const INTEREST_LASTS: Duration = Duration::from_secs(3);

/// A task watched on this node, and the version of the record its watchers have.
pub(super) struct Watched {
    sender: watch::Sender<TaskRecord>,
    version: u64,
}

impl Shared {
    /// A receiver that starts at the task's current record and ends after its final state.
    pub(super) async fn watch(
        &self,
        task_id: &str,
    ) -> Result<Option<watch::Receiver<TaskRecord>>, RedisQueueError> {
        let Some(first) = self.load(task_id).await? else { return Ok(None) };
        if first.record.status.is_final() {
            // Nothing will change: a receiver whose sender is gone still holds the final record.
            return Ok(Some(watch::channel(first.record).1));
        }
        let receiver = {
            let mut watchers = lock(&self.watchers);
            watchers.retain(|_, watched| watched.sender.receiver_count() > 0);
            match watchers.entry(task_id.to_string()) {
                hash_map::Entry::Occupied(entry) => entry.get().sender.subscribe(),
                hash_map::Entry::Vacant(entry) => {
                    let (sender, receiver) = watch::channel(first.record.clone());
                    entry.insert(Watched { sender, version: first.version });
                    receiver
                }
            }
        };
        self.apply(task_id, first.version, first.record);
        // An update published between the first read and the registration is caught here; later
        // ones arrive through the subscription.
        if let Some(second) = self.load(task_id).await? {
            self.apply(task_id, second.version, second.record);
        }
        Ok(Some(receiver))
    }

    /// Hands a newer record to the task's watchers; after a final one, closes them.
    fn apply(&self, task_id: &str, version: u64, record: TaskRecord) {
        let mut watchers = lock(&self.watchers);
        let Some(watched) = watchers.get_mut(task_id) else { return };
        if version <= watched.version {
            return;
        }
        watched.version = version;
        let last = record.status.is_final();
        watched.sender.send_replace(record);
        if last {
            watchers.remove(task_id);
        }
    }

    /// Reads every watched task again, for what was published while the subscription was down.
    async fn refresh_watched(&self) {
        let ids: Vec<String> = lock(&self.watchers).keys().cloned().collect();
        for task_id in ids {
            match self.load(&task_id).await {
                Ok(Some(stored)) => self.apply(&task_id, stored.version, stored.record),
                // The task is gone (Redis lost its data): its watchers end.
                Ok(None) => {
                    lock(&self.watchers).remove(&task_id);
                }
                Err(e) => tracing::warn!(error = %e, %task_id, "cannot refresh a watched task"),
            }
        }
    }

    fn dispatch(&self, message: &Msg) {
        let channel = message.get_channel_name();
        if channel == self.previews_channel {
            self.receive_preview(message.get_payload_bytes());
            return;
        }
        let Ok(payload) = message.get_payload::<String>() else { return };
        if channel == self.preview_interest_channel {
            // Kept for any task, so a task claimed just after the word still gets its previews.
            let now = Instant::now();
            let mut interest = lock(&self.preview_interest);
            interest.retain(|_, until| *until > now);
            interest.insert(payload, now + INTEREST_LASTS);
            return;
        }
        if channel == self.cancels_channel {
            self.cancel_running(&payload);
            return;
        }
        // "<version> <task id> <record JSON>", as commit.lua publishes it.
        let mut parts = payload.splitn(3, ' ');
        let (Some(version), Some(task_id), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        if !lock(&self.watchers).contains_key(task_id) {
            return;
        }
        match (version.parse(), serde_json::from_str(json)) {
            (Ok(version), Ok(record)) => self.apply(task_id, version, record),
            _ => tracing::warn!(%task_id, "unreadable task update"),
        }
    }
}

impl Shared {
    /// Publishes a preview as "<task id> <step> <steps> " followed by the JPEG's bytes.
    pub(super) async fn publish_preview(&self, task_id: &str, preview: Preview) {
        let mut payload = format!("{task_id} {} {} ", preview.step, preview.steps).into_bytes();
        payload.extend_from_slice(&preview.jpeg);
        let published: Result<i64, _> = ::redis::cmd("PUBLISH")
            .arg(&self.previews_channel)
            .arg(payload)
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = published {
            tracing::debug!(error = %e, %task_id, "preview not published");
        }
    }

    /// Hands a published preview to this node's watchers of its task.
    fn receive_preview(&self, payload: &[u8]) {
        let mut fields = payload.splitn(4, |&b| b == b' ');
        let (Some(task_id), Some(step), Some(steps), Some(jpeg)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        let number = |field: &[u8]| std::str::from_utf8(field).ok()?.parse::<u32>().ok();
        let (Ok(task_id), Some(step), Some(steps)) =
            (std::str::from_utf8(task_id), number(step), number(steps))
        else {
            return;
        };
        if self.previews.watched(task_id) {
            let preview = Preview { step, steps, jpeg: bytes::Bytes::copy_from_slice(jpeg) };
            self.previews.publish(task_id, preview);
        }
    }
}

/// Says every [`INTEREST_EVERY`] that this node watches a task's previews, until its watchers
/// here are gone: the worker running the task makes previews while the word is fresh.
pub(super) async fn announce_interest(shared: Arc<Shared>, task_id: String) {
    while shared.previews.watched(&task_id) {
        let said: Result<i64, _> = ::redis::cmd("PUBLISH")
            .arg(&shared.preview_interest_channel)
            .arg(&task_id)
            .query_async(&mut shared.conn())
            .await;
        if let Err(e) = said {
            tracing::debug!(error = %e, %task_id, "preview interest not published");
        }
        tokio::select! {
            _ = tokio::time::sleep(INTEREST_EVERY) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Keeps this node subscribed to updates and cancels, reconnecting with backoff when Redis goes
/// away; ends when the queue is dropped.
pub(super) async fn events_task(shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    loop {
        let subscribed = tokio::select! {
            subscribed = subscribe(&shared) => subscribed,
            _ = shared.stop.cancelled() => return,
        };
        let mut messages = match subscribed {
            Ok(pubsub) => pubsub.into_on_message(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to task updates yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.pause()) => continue,
                    _ = shared.stop.cancelled() => return,
                }
            }
        };
        backoff = Backoff::new();
        shared.refresh_watched().await;
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => shared.dispatch(&message),
                    None => break,
                },
                _ = shared.stop.cancelled() => return,
            }
        }
        tracing::warn!("lost the Redis subscription to task updates; reconnecting");
    }
}

async fn subscribe(shared: &Shared) -> Result<::redis::aio::PubSub, RedisQueueError> {
    let subscribing = async {
        let mut pubsub = shared.client.get_async_pubsub().await?;
        let channels = [
            &shared.updates_channel,
            &shared.cancels_channel,
            &shared.previews_channel,
            &shared.preview_interest_channel,
        ];
        pubsub.subscribe(&channels).await?;
        Ok(pubsub)
    };
    tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, subscribing)
        .await
        .map_err(|_| RedisQueueError::Timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT))?
}
