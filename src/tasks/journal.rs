//! The submission journal: each new task is appended to a file (one JSON line) before it is
//! acknowledged, so a process that dies a moment later still finds it on restart. Appending hands
//! the bytes to the kernel without waiting for the disk; the queue moves journaled tasks into the
//! store with one durable commit every [`CHECKPOINT_INTERVAL`], which bounds what a power loss (not
//! a process crash) can take back.
//!
//! A checkpoint renames the journal aside before committing and deletes it after, so an entry is
//! always either in a journal file or in the store; entries already in the store are harmless when
//! replayed, because replay only adds tasks the store does not have.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::TaskRecord;
use super::store::StoreError;

/// How often journaled submissions are committed durably to the store.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

fn journal_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("{}: {e}", path.display()))
}

/// The open journal of `--data-dir`.
pub struct Journal {
    path: PathBuf,
    rotated: PathBuf,
    file: File,
    /// Bytes of whole entries in `file`.
    len: u64,
    /// The entry being written, kept to reuse its allocation.
    line: Vec<u8>,
}

impl Journal {
    /// Opens the journal in `dir` and returns the tasks left in it (and in a journal rotated aside
    /// by a checkpoint that did not finish), oldest first. The caller stores them, then calls
    /// [`Journal::reset`].
    pub fn open(dir: &Path) -> Result<(Journal, Vec<TaskRecord>), StoreError> {
        let path = dir.join("submissions.jsonl");
        let rotated = dir.join("submissions.jsonl.checkpoint");
        let mut records = read_entries(&rotated)?;
        records.extend(read_entries(&path)?);
        let file = open_append(&path)?;
        let len = file.metadata().map_err(|e| journal_err(&path, e))?.len();
        Ok((Journal { path, rotated, file, len, line: Vec::new() }, records))
    }

    /// Appends one task's JSON record; once this returns, a crash of the process cannot lose it.
    pub fn append(&mut self, json: &[u8]) -> Result<(), StoreError> {
        let line = &mut self.line;
        line.clear();
        line.extend_from_slice(json);
        line.push(b'\n');
        if let Err(e) = self.file.write_all(line) {
            // A part written before the error (a full disk) would run into the next entry and take
            // it down with it when replayed: cut it off.
            let _ = self.file.set_len(self.len);
            return Err(journal_err(&self.path, e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Starts a new journal file, keeping the current one aside until [`Journal::checkpointed`].
    /// When an earlier checkpoint failed, its file is still aside: appending goes on in the current
    /// file, which then holds entries of both the failed and the next checkpoint.
    pub fn rotate(&mut self) -> Result<(), StoreError> {
        if self.rotated.exists() {
            return Ok(());
        }
        std::fs::rename(&self.path, &self.rotated).map_err(|e| journal_err(&self.path, e))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }

    /// Drops the file set aside by [`Journal::rotate`]: its tasks are durable in the store.
    pub fn checkpointed(&self) -> Result<(), StoreError> {
        remove_if_present(&self.rotated)
    }

    /// Empties the journal once every task it held is durable in the store.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        remove_if_present(&self.rotated)?;
        self.file.set_len(0).map_err(|e| journal_err(&self.path, e))?;
        self.len = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|e| journal_err(path, e))
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(journal_err(path, e)),
        _ => Ok(()),
    }
}

/// The tasks in one journal file. A line that does not parse is the torn end of an append cut
/// short by a power loss (never acknowledged): it is skipped with a warning.
fn read_entries(path: &Path) -> Result<Vec<TaskRecord>, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(journal_err(path, e)),
    };
    let mut records = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| journal_err(path, e))?;
        match serde_json::from_slice(&line) {
            Ok(record) => records.push(record),
            Err(e) => tracing::warn!(journal = %path.display(), error = %e, "skipping a torn journal entry"),
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::GenerateRequest;

    fn record(id: &str) -> Vec<u8> {
        serde_json::to_vec(&TaskRecord::new(id.to_string(), GenerateRequest::a_desk(1), String::new()))
            .unwrap()
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
        let ids: Vec<_> = found.iter().map(|r| r.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
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
        journal.checkpointed().unwrap();
        let (_, found) = Journal::open(dir.path()).unwrap();
        let ids: Vec<_> = found.iter().map(|r| r.task_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
    }
}
