//! The API's one error type: every failure is a status and a JSON body
//! `{"error": <code>, "message": <what is wrong>}`.

use crate::store::views::ViewError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A path parameter is malformed (400 `invalid_id`).
    #[error("{0}")]
    InvalidId(String),
    /// Nothing is stored under the id (404 `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// A stored state cannot be read (500 `corrupt_state`).
    #[error("{0}")]
    CorruptState(String),
    /// Redis is unreachable or refused (503 `redis_unavailable`).
    #[error("{0}")]
    RedisUnavailable(String),
}

impl ApiError {
    /// The status and the code of the body.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_id"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::CorruptState(_) => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt_state"),
            Self::RedisUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable"),
        }
    }
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = self.status_and_code();
        let message = self.to_string();
        (status, Json(ErrorBody { error, message })).into_response()
    }
}

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        match e {
            ViewError::Corrupt { key, message } => Self::CorruptState(format!("{key}: {message}")),
            ViewError::Redis(e) => Self::RedisUnavailable(e.to_string()),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        Self::RedisUnavailable(e.to_string())
    }
}
