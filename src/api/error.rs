//! API errors and their mapping to HTTP statuses and `{"error": {"code", "message"}}` bodies.

use hyper::StatusCode;

use crate::storage::StoreError;
use crate::storage::writer::WriteError;

/// An error answered to an API client. Client errors say exactly what was wrong; internal
/// errors are logged and answered with an opaque message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// Logs the cause and hides it from the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the daemon log",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
            .to_string()
            .into_bytes()
    }
}

impl From<crate::auth::Denied> for ApiError {
    fn from(d: crate::auth::Denied) -> Self {
        use crate::auth::Denied;
        use crate::config::Scope;
        match d {
            Denied::Missing => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token (Authorization: Bearer <token>)",
            ),
            Denied::Invalid => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid bearer token",
            ),
            Denied::BadSignature => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid request signature: unknown key, malformed dispatchd-* headers, or a signature that does not match the body",
            ),
            Denied::Stale => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the request's dispatchd-timestamp is outside the tolerance: sign with the current time",
            ),
            Denied::Replayed => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this signature was already used: sign each request anew",
            ),
            Denied::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many signed requests within the tolerance window; retry shortly",
            ),
            Denied::Lacks(need) => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this token or key lacks the {} scope",
                    match need {
                        Scope::Admin => "admin",
                        Scope::Publish => "publish",
                    }
                ),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // The cluster's database is away: a read failing is not a bug of ours.
            StoreError::Postgres(cause) => {
                tracing::error!(error = %cause, "read failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "the database cannot be read now; retry later",
                )
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<crate::operations::OpError> for ApiError {
    fn from(e: crate::operations::OpError) -> Self {
        match e {
            crate::operations::OpError::Store(s) => s.into(),
            crate::operations::OpError::Write(w) => w.into(),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Overloaded => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the write queue is full; retry with backoff",
            ),
            WriteError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the daemon is shutting down",
            ),
            WriteError::Storage(cause) => {
                tracing::error!(error = %cause, "write failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "the database could not commit; nothing was stored, retry later",
                )
            }
        }
    }
}
