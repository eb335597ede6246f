//! How a pull reports its progress: to progress bars on the command line, or to [`PullStatus`],
//! which the health document reads while a node pulls its model at start.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One file a pull needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// The path in the repo.
    pub path: String,
    /// Bytes (0 when the hub did not say).
    pub size: u64,
    /// Already in the cache: nothing to fetch.
    pub cached: bool,
}

/// Hears how a pull goes; files are named by their index in [`PullObserver::planned`]'s list.
pub trait PullObserver: Send + Sync {
    /// Every file the pull needs, once, before any is fetched.
    fn planned(&self, files: &[PlannedFile]);
    /// File `index` has `bytes` of its content on disk (this may go back when a download restarts).
    fn position(&self, index: usize, bytes: u64);
    /// File `index` is complete and in the snapshot.
    fn finished(&self, index: usize);
}

/// The totals of a pull, as the health document shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PullReport {
    /// The repo and revision, `org/name@revision`.
    pub repo: String,
    /// Files in the snapshot.
    pub files_done: usize,
    /// Files the pull needs.
    pub files_total: usize,
    /// Bytes on disk.
    pub bytes_done: u64,
    /// Bytes the pull needs.
    pub bytes_total: u64,
}

/// The progress of one pull, readable while it runs.
pub struct PullStatus {
    repo: String,
    files: Mutex<Vec<FileProgress>>,
}

#[derive(Clone, Copy)]
struct FileProgress {
    size: u64,
    done: u64,
    finished: bool,
}

/// The pull this process runs before its models load; one at most, since a node loads one model
/// set at start and its health endpoint is up before the loader runs.
static PUBLISHED: Mutex<Option<Arc<PullStatus>>> = Mutex::new(None);

impl PullStatus {
    /// A pull of `repo` (`org/name@revision`) that has planned nothing yet.
    pub fn new(repo: impl Into<String>) -> Arc<PullStatus> {
        Arc::new(PullStatus { repo: repo.into(), files: Mutex::new(Vec::new()) })
    }

    /// The totals so far.
    pub fn report(&self) -> PullReport {
        let files = self.files.lock().expect("progress lock");
        PullReport {
            repo: self.repo.clone(),
            files_done: files.iter().filter(|f| f.finished).count(),
            files_total: files.len(),
            bytes_done: files.iter().map(|f| f.done).sum(),
            bytes_total: files.iter().map(|f| f.size).sum(),
        }
    }

    /// Makes this the pull [`PullStatus::published`] reports.
    pub fn publish(self: &Arc<PullStatus>) {
        *PUBLISHED.lock().expect("published pull lock") = Some(self.clone());
    }

    /// The totals of the published pull, if this process started one.
    pub fn published() -> Option<PullReport> {
        PUBLISHED.lock().expect("published pull lock").as_ref().map(|status| status.report())
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut FileProgress)) {
        if let Some(file) = self.files.lock().expect("progress lock").get_mut(index) {
            change(file);
        }
    }
}

impl PullObserver for PullStatus {
    fn planned(&self, files: &[PlannedFile]) {
        *self.files.lock().expect("progress lock") = files
            .iter()
            .map(|f| FileProgress {
                size: f.size,
                done: if f.cached { f.size } else { 0 },
                finished: f.cached,
            })
            .collect();
    }

    fn position(&self, index: usize, bytes: u64) {
        self.update(index, |file| file.done = bytes);
    }

    fn finished(&self, index: usize) {
        self.update(index, |file| {
            file.finished = true;
            file.size = file.size.max(file.done);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_cached_files_as_done() {
        let status = PullStatus::new("org/m@main");
        let file = |path: &str, size, cached| PlannedFile { path: path.into(), size, cached };
        status.planned(&[file("a", 10, true), file("b", 100, false), file("c", 5, false)]);
        status.position(1, 40);
        status.position(2, 5);
        status.finished(2);
        let report = status.report();
        assert_eq!((report.files_done, report.files_total), (2, 3));
        assert_eq!((report.bytes_done, report.bytes_total), (55, 115));
    }
}
