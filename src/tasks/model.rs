//! The task: what was asked, where it is in its life, and what it produced.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::{Failure, FailureCode, GenerateOutput, GenerateRequest, Progress};

/// Where a task is in its life: queued → processing → done | failed | canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Accepted and waiting for a worker.
    Queued,
    /// A worker is running the pipeline.
    Processing,
    /// Finished; the output is in the record.
    Done,
    /// Finished with an error code and message.
    Failed,
    /// Canceled by the client before it finished.
    Canceled,
}

impl TaskStatus {
    /// True for done, failed and canceled: nothing changes after these.
    pub fn is_final(self) -> bool {
        matches!(self, TaskStatus::Done | TaskStatus::Failed | TaskStatus::Canceled)
    }

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Processing => "processing",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::Canceled => "canceled",
        }
    }
}

/// Everything known about one task; persisted on every change of status, without the fields that
/// are unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's id (client-chosen or UUID v4).
    pub task_id: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// The validated request.
    pub request: GenerateRequest,
    /// Who submitted it: the name of the API key (empty on an open API). Tasks of different
    /// clients at one priority level take turns. Records from before it existed read as empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
    /// Progress while processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The pipeline's output once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<GenerateOutput>,
    /// The error once failed or canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When a worker last started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// How many times a worker started it.
    pub attempts: u32,
}

impl TaskRecord {
    /// A freshly queued task of `client`.
    pub fn new(task_id: String, request: GenerateRequest, client: String) -> TaskRecord {
        TaskRecord {
            task_id,
            status: TaskStatus::Queued,
            request,
            client,
            progress: None,
            output: None,
            error: None,
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            attempts: 0,
        }
    }

    /// Ends the task: done with `output`, or canceled or failed with the error.
    pub fn complete(&mut self, outcome: Result<GenerateOutput, Failure>) {
        self.progress = None;
        self.completed_at = Some(Utc::now());
        match outcome {
            Ok(output) => {
                self.status = TaskStatus::Done;
                self.output = Some(output);
            }
            Err(error) => {
                self.status = if error.code == FailureCode::Canceled {
                    TaskStatus::Canceled
                } else {
                    TaskStatus::Failed
                };
                self.error = Some(error);
            }
        }
    }
}
