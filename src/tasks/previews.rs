//! Previews on one node: the watchers of each task's previews, and what a worker hands them. A
//! preview goes only to those subscribed when it is made; it is never stored.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use crate::core::Preview;

/// Previews a slow watcher may fall behind by before it skips to newer ones.
const BACKLOG: usize = 4;

/// The preview watchers of each task on this node.
#[derive(Default)]
pub struct PreviewHub {
    tasks: Mutex<HashMap<String, broadcast::Sender<Preview>>>,
}

impl PreviewHub {
    /// Starts watching a task's previews; they stop when the receiver is dropped. The flag says
    /// whether it is the task's first watcher on this node.
    pub fn subscribe(&self, task_id: &str) -> (broadcast::Receiver<Preview>, bool) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|_, sender| sender.receiver_count() > 0);
        match tasks.get(task_id) {
            Some(sender) => (sender.subscribe(), false),
            None => {
                let (sender, receiver) = broadcast::channel(BACKLOG);
                tasks.insert(task_id.to_string(), sender);
                (receiver, true)
            }
        }
    }

    /// Whether anyone on this node watches the task's previews now.
    pub fn watched(&self, task_id: &str) -> bool {
        lock(&self.tasks).get(task_id).is_some_and(|sender| sender.receiver_count() > 0)
    }

    /// Hands a preview to the task's watchers on this node, if any.
    pub fn publish(&self, task_id: &str, preview: Preview) {
        let mut tasks = lock(&self.tasks);
        if let Some(sender) = tasks.get(task_id)
            && sender.send(preview).is_err()
        {
            tasks.remove(task_id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preview(step: u32) -> Preview {
        Preview { step, steps: 10, jpeg: bytes::Bytes::from_static(b"jpeg") }
    }

    #[tokio::test]
    async fn previews_reach_the_watchers_there_are_and_stop_with_them() {
        let hub = PreviewHub::default();
        assert!(!hub.watched("a"));
        hub.publish("a", preview(1));
        let (mut first, new) = hub.subscribe("a");
        assert!(new && hub.watched("a"));
        let (mut second, new) = hub.subscribe("a");
        assert!(!new);
        hub.publish("a", preview(5));
        assert_eq!(first.recv().await.unwrap().step, 5, "nothing from before the subscription");
        assert_eq!(second.recv().await.unwrap().step, 5);
        assert!(!hub.watched("b"));
        drop((first, second));
        assert!(!hub.watched("a"));
        hub.publish("a", preview(10));
        assert!(hub.subscribe("a").1, "a task whose watchers left starts over");
    }
}
