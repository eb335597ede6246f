//! Opening the task queue a node serves or works from.

use std::sync::Arc;

use anyhow::Context;

use crate::config::{QueueBackend, RedisUrl, ServeConfig, WorkerConfig};
use crate::tasks::{MemoryQueue, RedisOptions, RedisQueue, WorkerQueue};

/// The API node's queue: the embedded store under the data directory, or Redis.
pub(super) async fn open_for_api(config: &ServeConfig) -> anyhow::Result<Arc<dyn WorkerQueue>> {
    let tasks = &config.tasks;
    match &config.queue {
        QueueBackend::Memory => {
            if tasks.workers == 0 {
                tracing::warn!("--workers 0 with the memory queue: nothing will run the tasks");
            }
            let queue = MemoryQueue::open(
                &tasks.data_dir,
                config.max_queue_depth,
                tasks.max_attempts,
                tasks.starvation_bound,
            )
            .with_context(|| format!("opening {}", tasks.data_dir.display()))?;
            Ok(Arc::new(queue))
        }
        QueueBackend::Redis(url) => {
            let options = RedisOptions {
                capacity: config.max_queue_depth,
                max_attempts: tasks.max_attempts,
                visibility_timeout: tasks.visibility_timeout,
                result_ttl: tasks.result_ttl,
                consumer: consumer_name(&host_name()),
                starvation_bound: tasks.starvation_bound,
                consumer_expiry: tasks.consumer_expiry,
            };
            Ok(Arc::new(connect_redis(url, options).await?))
        }
    }
}

/// A worker node's queue: always Redis, and it never submits.
pub(super) async fn open_for_worker(
    config: &WorkerConfig,
    name: &str,
) -> anyhow::Result<Arc<dyn WorkerQueue>> {
    let options = RedisOptions {
        // Workers never submit; the queue limit is the API nodes' setting.
        capacity: 0,
        max_attempts: config.tasks.max_attempts,
        visibility_timeout: config.tasks.visibility_timeout,
        result_ttl: config.tasks.result_ttl,
        consumer: consumer_name(name),
        starvation_bound: config.tasks.starvation_bound,
        consumer_expiry: config.tasks.consumer_expiry,
    };
    Ok(Arc::new(connect_redis(&config.queue, options).await?))
}

/// This host's name, for worker names and Redis consumer names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "deskgen".to_string())
}

/// A consumer name unique to this process, so two processes on one host never share pending work.
fn consumer_name(node: &str) -> String {
    format!("{node}-{}", std::process::id())
}

async fn connect_redis(url: &RedisUrl, options: RedisOptions) -> anyhow::Result<RedisQueue> {
    RedisQueue::connect(url, options).await.with_context(|| format!("connecting to the Redis queue at {url}"))
}
