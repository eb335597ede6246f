//! One owner per loaded model set. ONNX Runtime runs a session with `&mut` access, one call at a
//! time; rather than a lock per session and a blocking-pool thread per call, a model set lives on a
//! thread of its own that takes jobs from a channel in arrival order and answers each on a oneshot.
//! Nothing else touches the sessions, and a long job (a whole generation) is never interleaved
//! step by step with another one.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

type Job<M> = Box<dyn FnOnce(&mut M) + Send>;

/// The handle to a model set's thread; dropping every handle ends the thread after its last job.
pub struct ModelOwner<M> {
    name: &'static str,
    jobs: mpsc::Sender<Job<M>>,
}

/// A job that did not answer: it panicked, or the owner's thread is gone.
#[derive(Debug, thiserror::Error)]
#[error("the {0} models stopped before answering")]
pub struct NoAnswer(&'static str);

impl<M: Send + 'static> ModelOwner<M> {
    /// Moves `models` onto a new thread named after `name` (e.g. `vision`).
    pub fn spawn(name: &'static str, models: M) -> std::io::Result<ModelOwner<M>> {
        let (jobs, queue) = mpsc::channel::<Job<M>>();
        std::thread::Builder::new().name(format!("{name}-models")).spawn(move || {
            let mut models = models;
            for job in queue {
                // A panicking job loses its answer, not the models: the next job still runs.
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut models))).is_err() {
                    tracing::error!(models = name, "a job on the models panicked");
                }
            }
            // The last handle is gone (a model unloaded): its sessions' memory goes back now.
            drop(models);
            release_freed_memory();
        })?;
        Ok(ModelOwner { name, jobs })
    }

    /// Runs `job` on the models once the jobs queued before it are done.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut M) -> R + Send + 'static,
    ) -> Result<R, NoAnswer> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job<M> = Box::new(move |models| {
            let _ = answer.send(job(models));
        });
        self.jobs.send(job).map_err(|_| NoAnswer(self.name))?;
        answered.await.map_err(|_| NoAnswer(self.name))
    }
}

/// Hands freed memory back to the system. Inference allocates and frees hundreds of megabytes in
/// buffers of many sizes on several threads; glibc keeps freed pages in per-thread arenas, and a
/// long-running process grew by tens of MiB per thousand tasks without this.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes the allocator's own
    // locks and touches no memory the program owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_thread_and_survive_a_panic() {
        let owner = ModelOwner::spawn("counter", Vec::<u32>::new()).unwrap();
        let thread = owner.run(|_| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert_eq!(thread.as_deref(), Some("counter-models"));
        let (first, second) = tokio::join!(
            owner.run(|seen| {
                seen.push(1);
                seen.len()
            }),
            owner.run(|seen| {
                seen.push(2);
                seen.clone()
            }),
        );
        assert_eq!(first.unwrap(), 1);
        assert_eq!(second.unwrap(), vec![1, 2]);
        let failed = owner.run(|_: &mut Vec<u32>| -> u32 { panic!("a broken job") }).await;
        assert_eq!(failed.unwrap_err().to_string(), "the counter models stopped before answering");
        assert_eq!(owner.run(|seen| seen.len()).await.unwrap(), 2);
    }
}
