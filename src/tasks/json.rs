//! The product spec's REST result shape, used by the REST bridge, SSE and webhooks alike.

use serde_json::{Map, Value, json};

use super::{TaskRecord, TaskStatus};

impl TaskRecord {
    /// The result as the REST API returns it: status and progress while running; on success one
    /// top-level key per recommended category (its Korean display name) beside the image URLs;
    /// `error_code` and `message` on failure.
    pub fn to_result_json(&self) -> Value {
        let mut body = Map::new();
        body.insert("task_id".into(), json!(self.task_id));
        body.insert("status".into(), json!(self.status.as_str()));
        body.insert("created_at".into(), json!(self.created_at));
        match self.status {
            TaskStatus::Queued | TaskStatus::Processing => {
                if let Some(progress) = &self.progress {
                    body.insert("progress".into(), json!(progress));
                }
            }
            TaskStatus::Done => {
                let output = self.output.clone().unwrap_or_default();
                body.insert("initial_image_url".into(), json!(output.initial_image_url));
                body.insert("processed_image_url".into(), json!(output.processed_image_url));
                for recommendation in &output.recommendations {
                    body.insert(recommendation.display_name.clone(), json!(recommendation.items));
                }
                if let Some(is_desk) = output.is_desk {
                    body.insert("is_desk".into(), json!(is_desk));
                }
                if let Some(caption) = &output.caption {
                    body.insert("caption".into(), json!(caption));
                }
                body.insert("detected_items".into(), json!(output.detected_items));
                body.insert("prompt_used".into(), json!(output.prompt_used));
                body.insert("negative_prompt_used".into(), json!(output.negative_prompt_used));
                body.insert("timings_ms".into(), json!(output.timings_ms));
                body.insert("warnings".into(), json!(output.warnings));
                if let Some(seed) = output.seed {
                    body.insert("seed".into(), json!(seed));
                }
            }
            TaskStatus::Failed | TaskStatus::Canceled => {
                if let Some(error) = &self.error {
                    body.insert("error_code".into(), json!(error.code));
                    body.insert("message".into(), json!(error.message));
                }
            }
        }
        if let Some(completed_at) = self.completed_at {
            body.insert("completed_at".into(), json!(completed_at));
        }
        Value::Object(body)
    }
}
