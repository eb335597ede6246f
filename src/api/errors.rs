//! API errors and their one mapping to HTTP responses and one to gRPC statuses.
//!
//! Both mappings are exhaustive matches, so a new error cannot go unmapped.

use std::collections::HashMap;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic_types::{ErrorDetails, StatusExt};

use crate::core::{Invalid, Violation};
use crate::tasks::{BackendError, CancelError, SubmitError};

/// Stable codes of API errors, as JSON bodies and `ErrorInfo.reason` name them. A task's own
/// failures have theirs in [`crate::core::FailureCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request broke a validation rule.
    InvalidInput,
    /// No task has this id.
    TaskNotFound,
    /// The queue is at its limit.
    QueueFull,
    /// No valid API key was given.
    Unauthenticated,
    /// The task already reached a final state.
    AlreadyFinished,
    /// The service is still loading its models, or its task backend is unreachable.
    NotReady,
    /// A browser page of another origin, or a request naming another host, may not do this.
    Forbidden,
    /// The request's body did not arrive within the body read timeout.
    RequestTimeout,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The code as it appears in JSON bodies and `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "INVALID_INPUT",
            ErrorCode::TaskNotFound => "TASK_NOT_FOUND",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::AlreadyFinished => "ALREADY_FINISHED",
            ErrorCode::NotReady => "NOT_READY",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `prompt` present but blank.
    #[error("Prompt must not be empty.")]
    EmptyPrompt,
    /// Validation rules broken.
    #[error("{}", join(.0))]
    Invalid(Vec<Violation>),
    /// The body is not JSON at all.
    #[error("{0}")]
    Malformed(String),
    /// A body whose content type this route does not read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Refused for where it comes from: a foreign origin, or a Host this server does not answer to.
    #[error("{0}")]
    Forbidden(String),
    /// The body did not arrive within the read timeout.
    #[error("The request body did not arrive within {0} s (--body-read-timeout).")]
    BodyTimeout(u64),
    /// The body is over the size limit.
    #[error("Request body exceeds the limit of {0} bytes.")]
    TooLarge(usize),
    /// No task has this id.
    #[error("Task {0} not found.")]
    TaskNotFound(String),
    /// The queue is at its limit.
    #[error("The queue is full ({0} tasks); retry later.")]
    QueueFull(usize),
    /// No valid API key.
    #[error("A valid API key is required (Authorization: Bearer <key>).")]
    Unauthenticated,
    /// The task already finished.
    #[error("Task {0} already finished as {1}.")]
    AlreadyFinished(String, &'static str),
    /// Models are still loading.
    #[error("The service is starting; models are still loading.")]
    NotReady,
    /// The task backend or the object store cannot be reached.
    #[error("A backend the service needs (task queue or object store) is unavailable; retry later.")]
    Unavailable(String),
    /// Anything else; details are logged, not returned.
    #[error("Internal error.")]
    Internal(String),
}

fn join(violations: &[Violation]) -> String {
    violations.iter().map(|v| v.description.as_str()).collect::<Vec<_>>().join(" ")
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        match invalid {
            Invalid::EmptyPrompt => ApiError::EmptyPrompt,
            Invalid::Rules(violations) => ApiError::Invalid(violations),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(n) => ApiError::QueueFull(n),
            SubmitError::Backend(e) => e.into(),
        }
    }
}

impl From<CancelError> for ApiError {
    fn from(e: CancelError) -> Self {
        match e {
            CancelError::NotFound(id) => ApiError::TaskNotFound(id),
            CancelError::AlreadyFinished(id, status) => ApiError::AlreadyFinished(id, status),
            CancelError::Backend(e) => e.into(),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        ApiError::Unavailable(e.0)
    }
}

impl ApiError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::EmptyPrompt
            | ApiError::Invalid(_)
            | ApiError::Malformed(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::TooLarge(_) => ErrorCode::InvalidInput,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::BodyTimeout(_) => ErrorCode::RequestTimeout,
            ApiError::TaskNotFound(_) => ErrorCode::TaskNotFound,
            ApiError::QueueFull(_) => ErrorCode::QueueFull,
            ApiError::Unauthenticated => ErrorCode::Unauthenticated,
            ApiError::AlreadyFinished(..) => ErrorCode::AlreadyFinished,
            ApiError::NotReady | ApiError::Unavailable(_) => ErrorCode::NotReady,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn log_internal(&self) {
        match self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(%detail, "backend unavailable"),
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log_internal();
        let message = self.to_string();
        let code = self.code().as_str();
        let coded = |status: StatusCode| (status, Json(json!({"error_code": code, "message": message})));
        let mut response = match &self {
            // The product spec's bodies for blank prompts and unreadable JSON use "detail".
            ApiError::EmptyPrompt | ApiError::Malformed(_) => {
                (StatusCode::BAD_REQUEST, Json(json!({"detail": message}))).into_response()
            }
            ApiError::Invalid(_) => coded(StatusCode::UNPROCESSABLE_ENTITY).into_response(),
            ApiError::TooLarge(_) => coded(StatusCode::PAYLOAD_TOO_LARGE).into_response(),
            ApiError::UnsupportedMediaType(_) => coded(StatusCode::UNSUPPORTED_MEDIA_TYPE).into_response(),
            ApiError::Forbidden(_) => coded(StatusCode::FORBIDDEN).into_response(),
            ApiError::BodyTimeout(_) => coded(StatusCode::REQUEST_TIMEOUT).into_response(),
            ApiError::TaskNotFound(_) => coded(StatusCode::NOT_FOUND).into_response(),
            ApiError::QueueFull(_) => coded(StatusCode::TOO_MANY_REQUESTS).into_response(),
            ApiError::Unauthenticated => coded(StatusCode::UNAUTHORIZED).into_response(),
            ApiError::AlreadyFinished(..) => coded(StatusCode::CONFLICT).into_response(),
            ApiError::NotReady | ApiError::Unavailable(_) => {
                coded(StatusCode::SERVICE_UNAVAILABLE).into_response()
            }
            ApiError::Internal(_) => coded(StatusCode::INTERNAL_SERVER_ERROR).into_response(),
        };
        match self {
            ApiError::QueueFull(_) | ApiError::NotReady | ApiError::Unavailable(_) => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthenticated => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may still be on its way: the connection cannot be reused.
            ApiError::BodyTimeout(_) => {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::EmptyPrompt
            | ApiError::Invalid(_)
            | ApiError::Malformed(_)
            | ApiError::TooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Forbidden(_)
            | ApiError::TaskNotFound(_)
            | ApiError::AlreadyFinished(..)
            | ApiError::Internal(_) => {}
        }
        response
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.log_internal();
        let message = e.to_string();
        let mut details = ErrorDetails::new();
        details.set_error_info(e.code().as_str(), "deskgen", HashMap::new());
        let code = match &e {
            ApiError::EmptyPrompt => {
                details.add_bad_request_violation("prompt", message.clone());
                tonic::Code::InvalidArgument
            }
            ApiError::Invalid(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description.clone());
                }
                tonic::Code::InvalidArgument
            }
            ApiError::Malformed(_) | ApiError::TooLarge(_) | ApiError::UnsupportedMediaType(_) => {
                tonic::Code::InvalidArgument
            }
            ApiError::Forbidden(_) => tonic::Code::PermissionDenied,
            ApiError::BodyTimeout(_) => tonic::Code::DeadlineExceeded,
            ApiError::TaskNotFound(_) => tonic::Code::NotFound,
            ApiError::QueueFull(_) => tonic::Code::ResourceExhausted,
            ApiError::Unauthenticated => tonic::Code::Unauthenticated,
            ApiError::AlreadyFinished(..) => tonic::Code::FailedPrecondition,
            ApiError::NotReady | ApiError::Unavailable(_) => tonic::Code::Unavailable,
            ApiError::Internal(_) => tonic::Code::Internal,
        };
        tonic::Status::with_error_details(code, message, details)
    }
}
