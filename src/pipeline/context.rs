//! What a running pipeline sees of the outside: a place to report progress and previews, whether
//! anyone watches the previews, and whether to stop.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::core::{Failure, Preview, Progress};

/// Previews a run may make ahead of their reader before it drops new ones.
pub const PREVIEW_BACKLOG: usize = 4;

/// Says whether anyone watches a run's previews now.
pub type PreviewsWanted = Arc<dyn Fn() -> bool + Send + Sync>;

/// Progress reporting, cancellation and the deadline of one run.
///
/// Progress is latest-wins and never blocks: stages call it from inference threads, and whoever
/// started the run reads the receiver. Clones share the run (blocking stages take one along).
#[derive(Clone)]
pub struct RunContext {
    id: String,
    progress: Arc<watch::Sender<Option<Progress>>>,
    previews: Option<(PreviewsWanted, mpsc::Sender<Preview>)>,
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
        (RunContext { id, progress: Arc::new(progress), previews: None, cancel, deadline }, updates)
    }

    /// Lets the run make previews while `wanted` says someone watches them; returns their
    /// receiver. Without it a run makes none.
    pub fn watch_previews(&mut self, wanted: PreviewsWanted) -> mpsc::Receiver<Preview> {
        let (sender, receiver) = mpsc::channel(PREVIEW_BACKLOG);
        self.previews = Some((wanted, sender));
        receiver
    }

    /// Whether anyone watches this run's previews now.
    pub fn previews_wanted(&self) -> bool {
        self.previews.as_ref().is_some_and(|(wanted, _)| wanted())
    }

    /// Hands a preview to whoever watches the run; never blocks: when the receiver is
    /// [`PREVIEW_BACKLOG`] behind, the preview is dropped.
    pub fn preview(&self, preview: Preview) {
        if let Some((_, sender)) = &self.previews {
            let _ = sender.try_send(preview);
        }
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
