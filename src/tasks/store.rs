//! Tasks persisted under `--data-dir` in an embedded database, so a restart keeps finished results
//! and resumes queued work.

use std::path::Path;

use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::model::TaskRecord;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

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

/// The embedded store: one table of task id → JSON record.
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
        tx.commit().map_err(db_err)?;
        Ok(TaskStore { db })
    }

    /// Writes a record, replacing any earlier version.
    pub fn put(&self, record: &TaskRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(db_err)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(TASKS).map_err(db_err)?;
            table.insert(record.task_id.as_str(), bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Writes the records the store does not have yet, in one transaction (one disk flush for all);
    /// a record already there is newer than the one given and is kept.
    pub fn insert_missing(&self, records: &[TaskRecord]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(TASKS).map_err(db_err)?;
            for record in records {
                let bytes = serde_json::to_vec(record).map_err(db_err)?;
                // One lookup in the common case (absent); a record that was there goes back.
                let replaced = table
                    .insert(record.task_id.as_str(), bytes.as_slice())
                    .map_err(db_err)?
                    .map(|newer| newer.value().to_vec());
                if let Some(newer) = replaced {
                    table.insert(record.task_id.as_str(), newer.as_slice()).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// One stored record.
    pub fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TASKS).map_err(db_err)?;
        let Some(value) = table.get(task_id).map_err(db_err)? else { return Ok(None) };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|source| StoreError::Corrupt { id: task_id.to_string(), source })
    }

    /// Every stored record, oldest first.
    pub fn load_all(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TASKS).map_err(db_err)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let record: TaskRecord = serde_json::from_slice(value.value())
                .map_err(|source| StoreError::Corrupt { id: key.value().to_string(), source })?;
            records.push(record);
        }
        records.sort_by_key(|r| r.created_at);
        Ok(records)
    }

    /// Deletes final records completed before `cutoff`; returns their ids.
    pub fn purge_completed_before(&self, cutoff: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let expired: Vec<String> = self
            .load_all()?
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
