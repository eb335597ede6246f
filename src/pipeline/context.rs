//! What a running pipeline sees of the outside: a place to report progress, and whether to stop.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::{Failure, Progress};

/// Progress reporting, cancellation and the deadline of one run.
///
/// Progress is latest-wins and never blocks: stages call it from inference threads, and whoever
/// started the run reads the receiver. Clones share the run (blocking stages take one along).
#[derive(Clone)]
pub struct RunContext {
    id: String,
    progress: Arc<watch::Sender<Option<Progress>>>,
    cancel: CancellationToken,
    deadline: Instant,
}

impl RunContext {
    /// A context for the run `id` that stops when `cancel` fires or `deadline` passes, and a
    /// receiver of its progress.
    pub fn new(
        id: String,
        cancel: CancellationToken,
        deadline: Instant,
    ) -> (RunContext, watch::Receiver<Option<Progress>>) {
        let (progress, updates) = watch::channel(None);
        (RunContext { id, progress: Arc::new(progress), cancel, deadline }, updates)
    }

    /// The run's id (the task's), for logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Publishes progress: `step` of `steps` done in `stage`.
    pub fn progress(&self, stage: &str, step: u32, steps: u32) {
        self.progress.send_replace(Some(Progress { stage: stage.to_string(), step, steps }));
    }

    /// Err when the client canceled or the deadline passed; stages call it between units of work.
    pub fn check(&self) -> Result<(), Failure> {
        if self.cancel.is_cancelled() {
            return Err(Failure::canceled());
        }
        if Instant::now() >= self.deadline {
            return Err(Failure::timeout());
        }
        Ok(())
    }
}
