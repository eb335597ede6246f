//! Tasks persisted under `--data-dir` in an embedded database, so a restart keeps finished results
//! and resumes queued work.
//!
//! Two tables: `queued` holds submissions as they were accepted, under their submission number, until
//! they start or are canceled; `tasks` holds every task past that, by id. Checkpoints of new
//! submissions append at the end of `queued` instead of scattering writes across an index of random
//! ids, which made each checkpoint rewrite pages all over a large store.

use std::path::Path;

use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::model::TaskRecord;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const QUEUED: TableDefinition<u64, &[u8]> = TableDefinition::new("queued");

/// The page cache of the database. Only live tasks are read often (and those are in memory too), so
/// a small cache serves; redb's default (1 GiB) let the process grow with every task stored.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Errors of the embedded task store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or written.
    #[error("task store: {0}")]
    Database(String),
    /// A stored record could not be read back.
    #[error("task store: corrupt record {id}: {source}")]
    Corrupt {
        /// The task id of the record.
        id: String,
        /// Why it did not parse.
        source: serde_json::Error,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A new task as it goes into the `queued` table: its submission number, id and JSON record.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Its key in the `queued` table; later submissions have larger ones.
    pub number: u64,
    /// The task's id.
    pub task_id: String,
    /// The record as submitted, as JSON.
    pub json: Vec<u8>,
}

impl Submission {
    /// The submission of `record` under `number`.
    pub fn new(number: u64, record: &TaskRecord) -> Result<Submission, StoreError> {
        Ok(Submission { number, task_id: record.task_id.clone(), json: encode(record)? })
    }
}

/// A record as the store keeps it. A queued task's takes some 350 bytes: room for it is made once.
pub fn encode(record: &TaskRecord) -> Result<Vec<u8>, StoreError> {
    let mut json = Vec::with_capacity(512);
    serde_json::to_writer(&mut json, record).map_err(db_err)?;
    Ok(json)
}

/// A stored record read back; `id` names it when it does not parse.
fn decode(json: &[u8], id: impl FnOnce() -> String) -> Result<TaskRecord, StoreError> {
    serde_json::from_slice(json).map_err(|source| StoreError::Corrupt { id: id(), source })
}

/// A stored task and, while it waits in the `queued` table, its submission number there.
#[derive(Debug)]
pub struct Stored {
    /// The record.
    pub record: TaskRecord,
    /// Its key in the `queued` table, where it still is.
    pub queued: Option<u64>,
}

/// The embedded store: the `queued` table of submission number → JSON record and the `tasks`
/// table of task id → JSON record.
pub struct TaskStore {
    db: Database,
}

impl TaskStore {
    /// Opens (or creates) `tasks.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<TaskStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(db_err)?;
        let db =
            Database::builder().set_cache_size(CACHE_BYTES).create(dir.join("tasks.redb")).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(TASKS).map_err(db_err)?;
        tx.open_table(QUEUED).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(TaskStore { db })
    }

    /// Writes a record to `tasks`, replacing any earlier version, and drops its entry `queued` from
    /// the `queued` table in the same transaction (the task has left the queue).
    pub fn put(&self, record: &TaskRecord, queued: Option<u64>) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(TASKS).map_err(db_err)?;
            table.insert(record.task_id.as_str(), bytes.as_slice()).map_err(db_err)?;
            if let Some(number) = queued {
                tx.open_table(QUEUED).map_err(db_err)?.remove(number).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Appends submissions to the `queued` table in one transaction (one disk flush for all). One
    /// whose task is in `tasks` already has started or been canceled since: it stays out.
    pub fn append_queued(&self, submissions: &[Submission]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let tasks = tx.open_table(TASKS).map_err(db_err)?;
            let mut queued = tx.open_table(QUEUED).map_err(db_err)?;
            for submission in submissions {
                if tasks.get(submission.task_id.as_str()).map_err(db_err)?.is_none() {
                    queued.insert(submission.number, submission.json.as_slice()).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// A task that has left the queue (the queue holds its queued ones in memory).
    pub fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TASKS).map_err(db_err)?;
        let Some(value) = table.get(task_id).map_err(db_err)? else { return Ok(None) };
        decode(value.value(), || task_id.to_string()).map(Some)
    }

    /// Every stored task, in no particular order.
    pub fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let mut stored: Vec<Stored> =
            self.started(&tx)?.into_iter().map(|record| Stored { record, queued: None }).collect();
        let table = tx.open_table(QUEUED).map_err(db_err)?;
        for entry in table.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let record = decode(value.value(), || format!("queued #{}", key.value()))?;
            stored.push(Stored { record, queued: Some(key.value()) });
        }
        Ok(stored)
    }

    /// The records of the `tasks` table.
    fn started(&self, tx: &redb::ReadTransaction) -> Result<Vec<TaskRecord>, StoreError> {
        let table = tx.open_table(TASKS).map_err(db_err)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            records.push(decode(value.value(), || key.value().to_string())?);
        }
        Ok(records)
    }

    /// Deletes final records completed before `cutoff`; returns their ids.
    pub fn purge_completed_before(&self, cutoff: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let expired: Vec<String> = self
            .started(&self.db.begin_read().map_err(db_err)?)?
            .into_iter()
            .filter(|r| r.status.is_final() && r.completed_at.is_some_and(|t| t < cutoff))
            .map(|r| r.task_id)
            .collect();
        if expired.is_empty() {
            return Ok(expired);
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(TASKS).map_err(db_err)?;
            for id in &expired {
                table.remove(id.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::GenerateRequest;
    use crate::tasks::TaskStatus;

    fn submission(number: u64, id: &str) -> (Submission, TaskRecord) {
        let record = TaskRecord::new(id.to_string(), GenerateRequest::a_desk(number), String::new());
        (Submission::new(number, &record).unwrap(), record)
    }

    fn summary(store: &TaskStore) -> Vec<(String, TaskStatus, Option<u64>)> {
        let mut stored: Vec<_> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|s| (s.record.task_id, s.record.status, s.queued))
            .collect();
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        stored
    }

    #[test]
    fn a_task_leaves_the_queued_table_when_it_starts_and_stays_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let (entries, records): (Vec<_>, Vec<_>) =
            [(0, "a"), (1, "b"), (2, "c")].into_iter().map(|(number, id)| submission(number, id)).unzip();
        store.append_queued(&entries).unwrap();
        let mut started = records[1].clone();
        started.status = TaskStatus::Processing;
        store.put(&started, Some(1)).unwrap();
        drop(store);

        let store = TaskStore::open(dir.path()).unwrap();
        assert_eq!(
            summary(&store),
            [
                ("a".into(), TaskStatus::Queued, Some(0)),
                ("b".into(), TaskStatus::Processing, None),
                ("c".into(), TaskStatus::Queued, Some(2)),
            ]
        );
        assert_eq!(store.get("b").unwrap().unwrap().status, TaskStatus::Processing);
        assert!(store.get("a").unwrap().is_none(), "queued tasks are the queue's to hold");
    }

    #[test]
    fn a_task_that_started_before_its_checkpoint_is_not_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let (entry, mut record) = submission(0, "a");
        record.status = TaskStatus::Canceled;
        store.put(&record, Some(0)).unwrap();
        store.append_queued(&[entry]).unwrap();
        assert_eq!(summary(&store), [("a".into(), TaskStatus::Canceled, None)]);
    }
}
