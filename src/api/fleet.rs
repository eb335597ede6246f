//! An API node that loads no models (the Redis queue with `--workers 0`): what the live worker
//! nodes announce is what it serves. Requests are checked against the models every live worker
//! serves, `/info` is built from their descriptions, and the node is ready while Redis answers
//! and at least `--min-workers` workers are live.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::core::{PipelineInfo, WorkerDescription};
use crate::tasks::TaskQueue;

/// How often an API node reads the workers' announcements.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The live workers as this API node last read them.
pub struct Fleet {
    queue: Arc<dyn TaskQueue>,
    min_workers: usize,
    seen: RwLock<Seen>,
}

#[derive(Default)]
struct Seen {
    workers: Vec<WorkerDescription>,
    serving: Option<Arc<PipelineInfo>>,
}

/// One live worker as /info lists it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerEntry {
    /// Its name.
    pub name: String,
    /// The deskgen version it runs.
    pub version: String,
    /// The execution provider it asked for.
    pub execution_provider: String,
    /// Tasks it runs at once.
    pub slots: usize,
    /// The Stable Diffusion models it serves, default first.
    pub sd_models: Vec<String>,
    /// Those in its memory now.
    pub loaded_models: Vec<String>,
}

impl Fleet {
    /// A fleet read from `queue`, ready with `min_workers` live workers; nothing is read yet.
    pub fn new(queue: Arc<dyn TaskQueue>, min_workers: usize) -> Fleet {
        Fleet { queue, min_workers, seen: RwLock::new(Seen::default()) }
    }

    /// Reads the announcements again; when Redis does not answer, no worker counts as live.
    pub async fn refresh(&self) {
        let workers = match self.queue.live_workers().await {
            Ok(workers) => workers,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the workers' announcements");
                Vec::new()
            }
        };
        let serving = served_by_all(&workers).map(Arc::new);
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        let names = |s: &Option<Arc<PipelineInfo>>| s.as_ref().map(|info| info.sd_model_names().join(", "));
        if names(&seen.serving) != names(&serving) || seen.workers.len() != workers.len() {
            tracing::info!(workers = workers.len(), models = ?names(&serving), "the live workers changed");
        }
        *seen = Seen { workers, serving };
    }

    /// What every live worker serves; none while no worker is live.
    pub fn serving(&self) -> Option<Arc<PipelineInfo>> {
        self.read(|seen| seen.serving.clone())
    }

    /// [`Fleet::serving`], read again from Redis first when it has nothing, or lacks the model
    /// `model` names: a worker may have come since the last reading.
    pub async fn serving_now(&self, model: Option<&str>) -> Option<Arc<PipelineInfo>> {
        let current = self.serving();
        let known = |info: &PipelineInfo| model.is_none_or(|name| info.sd_model(Some(name)).is_some());
        if current.as_deref().is_some_and(known) {
            return current;
        }
        self.refresh().await;
        self.serving()
    }

    /// Whether enough workers are live to take tasks.
    pub fn ready(&self) -> bool {
        self.read(|seen| seen.serving.is_some() && seen.workers.len() >= self.min_workers)
    }

    /// How many workers are live, and how many readiness needs.
    pub fn counts(&self) -> (usize, usize) {
        (self.read(|seen| seen.workers.len()), self.min_workers)
    }

    /// The live workers, for /info.
    pub fn workers(&self) -> Vec<WorkerEntry> {
        self.read(|seen| {
            seen.workers
                .iter()
                .map(|w| WorkerEntry {
                    name: w.name.clone(),
                    version: w.version.clone(),
                    execution_provider: w.execution_provider.clone(),
                    slots: w.slots,
                    sd_models: w.pipeline.sd_model_names().into_iter().map(str::to_string).collect(),
                    loaded_models: w.loaded_models.clone(),
                })
                .collect()
        })
    }

    /// The Stable Diffusion models some live worker holds in memory.
    pub fn loaded_models(&self) -> Vec<String> {
        let mut loaded: Vec<String> =
            self.read(|seen| seen.workers.iter().flat_map(|w| w.loaded_models.clone()).collect());
        loaded.sort();
        loaded.dedup();
        loaded
    }

    fn read<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What every worker serves: the first one's description (by name) with only the Stable
/// Diffusion models all of them serve, so that whichever worker claims a task can run it; none
/// when no worker is live or they share no model.
fn served_by_all(workers: &[WorkerDescription]) -> Option<PipelineInfo> {
    let first = workers.first()?;
    let mut info = first.pipeline.clone();
    let everywhere = |name: &str| workers.iter().all(|w| w.pipeline.sd_model(Some(name)).is_some());
    info.sd_models.retain(|model| everywhere(&model.name));
    (!info.sd_models.is_empty()).then_some(info)
}
