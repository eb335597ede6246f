//! The submission journal: each new task is appended to a file (one JSON line) before it is
//! acknowledged, so a process that dies a moment later still finds it on restart. The file is
//! reserved on disk ahead of the entries and mapped shared into memory: appending copies the line
//! into the kernel's page cache with no system call and cannot run out of disk space midway, and
//! the page cache outlives the process. The queue moves journaled tasks into the store with one
//! durable commit every [`CHECKPOINT_INTERVAL`], which bounds what a power loss (not a process
//! crash) can take back.
//!
//! A checkpoint renames the journal aside before committing and deletes it after, so an entry is
//! always either in a journal file or in the store; entries already in the store are harmless when
//! replayed, because replay only adds tasks the store does not have.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};

use super::model::TaskRecord;
use super::store::StoreError;

/// How often journaled submissions are committed durably to the store.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// How much of the file is reserved and mapped at a time: some 6,000 entries.
const WINDOW: u64 = 4 << 20;

fn journal_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("{}: {e}", path.display()))
}

/// The open journal of `--data-dir`.
pub struct Journal {
    path: PathBuf,
    rotated: PathBuf,
    file: File,
    /// The reserved part of `file` that the next entries go to.
    window: MmapMut,
    /// Where `window` starts in `file`.
    window_start: u64,
    /// Bytes of whole entries in `file`; the rest of it is zeros.
    len: u64,
    /// Whether `file` is the one a checkpoint renamed aside, because the next could not be made.
    aside: bool,
}

impl Journal {
    /// Opens the journal in `dir` and returns the tasks left in it (and in a journal rotated aside
    /// by a checkpoint that did not finish), oldest first. The caller stores them, then calls
    /// [`Journal::reset`].
    pub fn open(dir: &Path) -> Result<(Journal, Vec<TaskRecord>), StoreError> {
        let path = dir.join("submissions.jsonl");
        let rotated = dir.join("submissions.jsonl.checkpoint");
        let mut records = read_entries(&rotated)?.0;
        let (found, len) = read_entries(&path)?;
        records.extend(found);
        let file = open_file(&path)?;
        let (window, window_start) = reserve(&path, &file, len, 0)?;
        Ok((Journal { path, rotated, file, window, window_start, len, aside: false }, records))
    }

    /// Appends one task's JSON record; once this returns, a crash of the process cannot lose it.
    pub fn append(&mut self, json: &[u8]) -> Result<(), StoreError> {
        let entry = json.len() as u64 + 1;
        if self.len + entry > self.window_start + self.window.len() as u64 {
            // Nothing is written when the disk has no room for the entry.
            (self.window, self.window_start) = reserve(&self.path, &self.file, self.len, entry)?;
        }
        let at = (self.len - self.window_start) as usize;
        self.window[at..at + json.len()].copy_from_slice(json);
        self.window[at + json.len()] = b'\n';
        self.len += entry;
        Ok(())
    }

    /// Starts a new journal file, keeping the current one aside at [`Journal::rotated`].
    /// When an earlier checkpoint failed, its file is still aside: appending goes on in the current
    /// file, which then holds entries of both the failed and the next checkpoint.
    pub fn rotate(&mut self) -> Result<(), StoreError> {
        if !self.aside {
            if self.rotated.exists() {
                return Ok(());
            }
            std::fs::rename(&self.path, &self.rotated).map_err(|e| journal_err(&self.path, e))?;
            self.aside = true;
        }
        // Until a new file is made, appending goes on in the one aside, which is then kept.
        let file = open_file(&self.path)?;
        (self.window, self.window_start) = reserve(&self.path, &file, 0, 0)?;
        (self.file, self.len, self.aside) = (file, 0, false);
        Ok(())
    }

    /// The file [`Journal::rotate`] sets aside; remove it once its tasks are durable in the store.
    pub fn rotated(&self) -> &Path {
        &self.rotated
    }

    /// Empties the journal once every task it held is durable in the store.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        remove_if_present(&self.rotated)?;
        self.file.set_len(0).map_err(|e| journal_err(&self.path, e))?;
        (self.window, self.window_start) = reserve(&self.path, &self.file, 0, 0)?;
        self.len = 0;
        Ok(())
    }
}

fn open_file(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| journal_err(path, e))
}

/// Reserves room on disk for at least `entry` bytes from `from` on and maps it. Writing to a
/// mapping of space the file does not own would end the process when the disk is full; reserved,
/// it is an error here instead.
fn reserve(path: &Path, file: &File, from: u64, entry: u64) -> Result<(MmapMut, u64), StoreError> {
    const PAGE: u64 = 4096;
    let start = from / PAGE * PAGE;
    let len = WINDOW.max((from - start + entry).div_ceil(PAGE) * PAGE);
    // SAFETY: `posix_fallocate` only reads its arguments; the descriptor is open for writing.
    let failed = unsafe { libc::posix_fallocate(file.as_raw_fd(), start as libc::off_t, len as libc::off_t) };
    if failed != 0 {
        return Err(journal_err(path, std::io::Error::from_raw_os_error(failed)));
    }
    // SAFETY: the mapping lies inside the file, which the store's lock on the data directory keeps
    // to this process; nothing else writes or truncates it while it is mapped.
    let window = unsafe { MmapOptions::new().offset(start).len(len as usize).map_mut(file) }
        .map_err(|e| journal_err(path, e))?;
    Ok((window, start))
}

/// Removes `path`; one that is not there is removed already.
pub fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(journal_err(path, e)),
        _ => Ok(()),
    }
}

/// The tasks in one journal file, and where the next entry goes: past the last one, and past a
/// torn one. A line that does not parse is the torn end of an append cut short by a power loss
/// (never acknowledged): it is skipped with a warning. The zeros of space reserved but not yet
/// written separate entries as newlines do.
fn read_entries(path: &Path) -> Result<(Vec<TaskRecord>, u64), StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(journal_err(path, e)),
    };
    let mut records = Vec::new();
    for line in bytes.split(|&b| b == b'\n' || b == 0).filter(|line| !line.is_empty()) {
        match serde_json::from_slice(line) {
            Ok(record) => records.push(record),
            Err(e) => tracing::warn!(journal = %path.display(), error = %e, "skipping a torn journal entry"),
        }
    }
    let len = match bytes.iter().rposition(|&b| b != 0) {
        Some(last) if bytes[last] == b'\n' => last + 1,
        Some(last) => last + 2,
        None => 0,
    };
    Ok((records, len as u64))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::core::GenerateRequest;

    fn record(id: &str) -> Vec<u8> {
        serde_json::to_vec(&TaskRecord::new(id.to_string(), GenerateRequest::a_desk(1), String::new()))
            .unwrap()
    }

    fn ids(records: &[TaskRecord]) -> Vec<&str> {
        records.iter().map(|r| r.task_id.as_str()).collect()
    }

    #[test]
    fn entries_larger_than_what_is_reserved_at_once_are_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path()).unwrap();
        let mut request = GenerateRequest::a_desk(1);
        request.prompt = Some("a tidy desk ".repeat(150_000));
        let big = |id: &str| {
            serde_json::to_vec(&TaskRecord::new(id.to_string(), request.clone(), String::new())).unwrap()
        };
        for id in ["a", "b", "c"] {
            journal.append(&big(id)).unwrap();
        }
        journal.append(&big(&"d".repeat(3 * WINDOW as usize))).unwrap();
        journal.append(&record("e")).unwrap();
        drop(journal);
        let (_, found) = Journal::open(dir.path()).unwrap();
        assert_eq!(found.len(), 5);
        assert_eq!(found[0].request.prompt, request.prompt);
        assert_eq!(found[4].task_id, "e");
    }

    #[test]
    fn entries_survive_reopening_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, found) = Journal::open(dir.path()).unwrap();
        assert!(found.is_empty());
        journal.append(&record("a")).unwrap();
        journal.rotate().unwrap();
        journal.append(&record("b")).unwrap();
        drop(journal);
        let mut tail = OpenOptions::new().append(true).open(dir.path().join("submissions.jsonl")).unwrap();
        tail.write_all(b"{\"task_id\":\"c\",\"sta").unwrap();

        let (mut journal, found) = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&found), ["a", "b"]);
        journal.reset().unwrap();
        drop(journal);
        assert!(Journal::open(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn a_failed_checkpoint_keeps_its_file_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path()).unwrap();
        journal.append(&record("a")).unwrap();
        journal.rotate().unwrap();
        journal.append(&record("b")).unwrap();
        // The commit of "a" failed: the next rotation keeps both files.
        journal.rotate().unwrap();
        journal.append(&record("c")).unwrap();
        let (_, found) = Journal::open(dir.path()).unwrap();
        assert_eq!(found.len(), 3);
        remove_if_present(journal.rotated()).unwrap();
        let (_, found) = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&found), ["b", "c"]);
    }
}
