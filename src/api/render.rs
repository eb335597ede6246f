//! The product spec's REST result shape, used by the REST bridge, SSE, webhooks and the CLI alike.

use serde_json::{Map, Value, json};

use crate::tasks::{TaskRecord, TaskStatus};
use crate::webhook::WebhookEvent;

/// The result as the REST API returns it: status and progress while running; on success one
/// top-level key per recommended category (its Korean display name) beside the image URLs;
/// `error_code` and `message` on failure.
pub fn result_json(record: &TaskRecord) -> Value {
    let mut body = Map::new();
    body.insert("task_id".into(), json!(record.task_id));
    body.insert("status".into(), json!(record.status.as_str()));
    body.insert("created_at".into(), json!(record.created_at));
    match record.status {
        TaskStatus::Queued | TaskStatus::Processing => {
            if let Some(progress) = &record.progress {
                body.insert("progress".into(), json!(progress));
            }
        }
        TaskStatus::Done => {
            let output = record.output.clone().unwrap_or_default();
            body.insert("initial_image_url".into(), json!(output.initial_image_url));
            body.insert("processed_image_url".into(), json!(output.processed_image_url));
            body.insert("processed_image_urls".into(), json!(output.processed_image_urls));
            if let Some(mask_url) = &output.mask_url {
                body.insert("mask_url".into(), json!(mask_url));
            }
            let mut reasons = serde_json::Map::new();
            for recommendation in &output.recommendations {
                body.insert(recommendation.display_name.clone(), json!(recommendation.items));
                reasons.insert(recommendation.display_name.clone(), json!(recommendation.reason.as_str()));
            }
            body.insert("recommendation_reasons".into(), Value::Object(reasons));
            if let Some(is_desk) = output.is_desk {
                body.insert("is_desk".into(), json!(is_desk));
            }
            if let Some(caption) = &output.caption {
                body.insert("caption".into(), json!(caption));
            }
            body.insert("detected_items".into(), json!(output.detected_items));
            body.insert("detected_text".into(), json!(output.detected_text));
            body.insert("prompt_used".into(), json!(output.prompt_used));
            body.insert("negative_prompt_used".into(), json!(output.negative_prompt_used));
            body.insert("timings_ms".into(), json!(output.timings_ms));
            body.insert("warnings".into(), json!(output.warnings));
            body.insert("control".into(), json!(output.control));
            if let Some(seed) = output.seed {
                body.insert("seed".into(), json!(seed));
            }
        }
        TaskStatus::Failed | TaskStatus::Canceled => {
            if let Some(error) = &record.error {
                body.insert("error_code".into(), json!(error.code));
                body.insert("message".into(), json!(error.message));
            }
        }
    }
    if let Some(completed_at) = record.completed_at {
        body.insert("completed_at".into(), json!(completed_at));
    }
    Value::Object(body)
}

/// A webhook's body: the result as [`result_json`] renders it, with the event's name.
pub fn webhook_body(record: &TaskRecord, event: WebhookEvent) -> Value {
    let mut body = result_json(record);
    body["event"] = json!(event.as_str());
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{
        Failure, FailureCode, GenerateOutput, GenerateRequest, Offer, Progress, Recommendation,
    };

    fn record() -> TaskRecord {
        TaskRecord::new("t-1".into(), GenerateRequest::a_desk(7), String::new())
    }

    fn mouse() -> Recommendation {
        let offer = Offer {
            title: "무선 마우스".into(),
            price: "21990원".into(),
            mall: "네이버".into(),
            category3: "마우스".into(),
            category4: "무선마우스".into(),
            link: "https://example.com/p/1".into(),
            image: String::new(),
            price_won: 21990,
        };
        Recommendation {
            category: "mouse".into(),
            display_name: "마우스".into(),
            items: vec![offer],
            reason: crate::core::RecommendationReason::Missing,
        }
    }

    #[test]
    fn a_running_task_shows_its_progress_and_nothing_else() {
        let mut running = record();
        running.status = TaskStatus::Processing;
        running.progress = Some(Progress { stage: "diffusion".into(), step: 3, steps: 20 });
        let body = result_json(&running);
        assert_eq!(body["status"], "processing");
        assert_eq!(body["progress"], json!({"stage": "diffusion", "step": 3, "steps": 20}));
        assert!(body.get("processed_image_url").is_none() && body.get("completed_at").is_none());
    }

    #[test]
    fn a_done_task_has_one_key_per_category_beside_the_images() {
        let mut done = record();
        done.complete(Ok(GenerateOutput {
            processed_image_url: Some("http://127.0.0.1/v1/images/a.png".into()),
            recommendations: vec![mouse()],
            seed: Some(7),
            ..GenerateOutput::default()
        }));
        let body = result_json(&done);
        assert_eq!(body["status"], "done");
        assert_eq!(body["initial_image_url"], Value::Null);
        assert_eq!(body["processed_image_url"], "http://127.0.0.1/v1/images/a.png");
        assert_eq!(body["마우스"][0]["price"], "21990원");
        assert!(body["마우스"][0].get("price_won").is_none());
        assert_eq!(body["seed"], 7);
        // Text-only requests say nothing of a desk.
        assert!(body.get("is_desk").is_none() && body.get("error_code").is_none());
        assert!(body.get("completed_at").is_some());
    }

    #[test]
    fn a_failed_task_has_its_code_and_message() {
        let mut failed = record();
        failed.complete(Err(Failure::new(FailureCode::S3UploadFailed, "Failed to upload image to S3.")));
        let body = result_json(&failed);
        assert_eq!(body["status"], "failed");
        assert_eq!(body["error_code"], "S3_UPLOAD_FAILED");
        assert_eq!(body["message"], "Failed to upload image to S3.");
        let mut canceled = record();
        canceled.complete(Err(Failure::canceled()));
        assert_eq!(result_json(&canceled)["status"], "canceled");
    }

    #[test]
    fn a_webhook_body_is_the_result_with_its_event() {
        let mut done = record();
        done.complete(Ok(GenerateOutput { recommendations: vec![mouse()], ..GenerateOutput::default() }));
        let mut expected = result_json(&done);
        expected["event"] = json!("completed");
        assert_eq!(webhook_body(&done, WebhookEvent::Completed), expected);
    }
}
