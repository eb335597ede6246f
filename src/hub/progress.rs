//! How a pull reports its progress: to progress bars on the command line, or to [`PullStatus`],
//! which a node's [`Downloads`] hands its health document while the node pulls its models at start.

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
    /// The model (its `--sd-model` name) the pull is for, when a node pulls it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
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

/// The pulls a node runs while its models load, one after the other; its health document shows
/// the latest.
#[derive(Default)]
pub struct Downloads {
    latest: Mutex<Option<(String, Arc<PullStatus>)>>,
}

impl Downloads {
    /// Starts reporting the pull of `repo` (`org/name@revision`) for the model named `model`.
    pub fn start(&self, model: &str, repo: impl Into<String>) -> Arc<PullStatus> {
        let status = PullStatus::new(repo);
        *self.latest.lock().expect("downloads lock") = Some((model.to_string(), status.clone()));
        status
    }

    /// The totals of the latest pull, if the node started one.
    pub fn report(&self) -> Option<PullReport> {
        let latest = self.latest.lock().expect("downloads lock");
        let (model, status) = latest.as_ref()?;
        Some(PullReport { model: Some(model.clone()), ..status.report() })
    }
}

impl PullStatus {
    /// A pull of `repo` (`org/name@revision`) that has planned nothing yet.
    pub fn new(repo: impl Into<String>) -> Arc<PullStatus> {
        Arc::new(PullStatus { repo: repo.into(), files: Mutex::new(Vec::new()) })
    }

    /// The totals so far.
    pub fn report(&self) -> PullReport {
        let files = self.files.lock().expect("progress lock");
        PullReport {
            model: None,
            repo: self.repo.clone(),
            files_done: files.iter().filter(|f| f.finished).count(),
            files_total: files.len(),
            bytes_done: files.iter().map(|f| f.done).sum(),
            bytes_total: files.iter().map(|f| f.size).sum(),
        }
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

    #[test]
    fn a_node_reports_its_latest_pull_and_the_model_it_is_for() {
        let downloads = Downloads::default();
        assert_eq!(downloads.report(), None);
        downloads.start("sd", "org/a@main").planned(&[PlannedFile {
            path: "x".into(),
            size: 4,
            cached: true,
        }]);
        let second = downloads.start("turbo", "org/b@v1");
        second.planned(&[PlannedFile { path: "y".into(), size: 8, cached: false }]);
        let report = downloads.report().unwrap();
        assert_eq!((report.model.as_deref(), report.repo.as_str()), (Some("turbo"), "org/b@v1"));
        assert_eq!((report.files_done, report.bytes_total), (0, 8));
    }
}
