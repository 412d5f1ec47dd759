//! Every API failure maps to one status code and a [`homeport_proto::api::ApiError`] body, here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use homeport_proto::api::ApiError;

/// An API failure: status, a short machine code and a detail that says what was wrong and what
/// is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiErr {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiErr {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiErr {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }
    /// 429 with `Retry-After` (whole seconds, at least 1).
    pub fn too_many(detail: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail);
        e.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.detail)
    }
}

impl std::error::Error for ApiErr {}

impl From<crate::store::StoreError> for ApiErr {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::KeyRefused(d) => ApiErr::unauthorized(d),
            StoreError::Conflict(d) => ApiErr::conflict(d),
            StoreError::Database(e) => e.into(),
            StoreError::Decode(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for ApiErr {
    fn from(e: sqlx::Error) -> Self {
        // The detail of a database failure is for the log, not for the client.
        tracing::error!(error = %e, "database error");
        ApiErr::internal("database error; see the coordinator log")
    }
}

impl From<serde_json::Error> for ApiErr {
    fn from(e: serde_json::Error) -> Self {
        tracing::error!(error = %e, "stored JSON could not be decoded");
        ApiErr::internal("stored data could not be decoded; see the coordinator log")
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ApiError {
                error: self.code.to_string(),
                detail: self.detail,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiErr>;
