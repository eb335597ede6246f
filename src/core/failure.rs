//! Why a task failed: the product spec's failure codes, apart from the API's own error codes.

use serde::{Deserialize, Serialize};

/// Stable codes of failed (or canceled) tasks, as the result's `error_code` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureCode {
    /// The request broke a rule only the pipeline could check.
    InvalidInput,
    /// The photo could not be downloaded.
    ImageFetchFailed,
    /// The photo is not a decodable image of a usable size.
    InvalidImage,
    /// A model failed to run.
    ModelError,
    /// The generated image could not be stored.
    S3UploadFailed,
    /// The shopping provider failed. The pipeline reports failed lookups as warnings of a done
    /// task, as the product spec's flow does; the code stays for clients that match on the list.
    ShoppingFailed,
    /// The client canceled the task.
    Canceled,
    /// The task ran past its deadline.
    Timeout,
    /// Anything else, e.g. a task whose attempts were used up by crashes.
    Internal,
}

impl FailureCode {
    /// The code as it appears in JSON bodies and gRPC results.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::InvalidInput => "INVALID_INPUT",
            FailureCode::ImageFetchFailed => "IMAGE_FETCH_FAILED",
            FailureCode::InvalidImage => "INVALID_IMAGE",
            FailureCode::ModelError => "MODEL_ERROR",
            FailureCode::S3UploadFailed => "S3_UPLOAD_FAILED",
            FailureCode::ShoppingFailed => "SHOPPING_FAILED",
            FailureCode::Canceled => "CANCELED",
            FailureCode::Timeout => "TIMEOUT",
            FailureCode::Internal => "INTERNAL",
        }
    }
}

/// Why a task failed: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Stable code.
    pub code: FailureCode,
    /// Message for people.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: FailureCode, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    /// The client canceled the task.
    pub fn canceled() -> Failure {
        Failure::new(FailureCode::Canceled, "Canceled by the client.")
    }

    /// The task ran past its deadline.
    pub fn timeout() -> Failure {
        Failure::new(FailureCode::Timeout, "The task ran past its deadline.")
    }
}
