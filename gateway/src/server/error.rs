//! API errors: `{"error": {"message", "type", "param", "code"}}` (the
//! shape OpenAI's clients parse) with the right status.

use axum::response::IntoResponse;
use hyper::StatusCode;

use super::{Response, full};

/// A refusal or failure as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The request field at fault, when one is.
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// Names the request field at fault.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 429 with `Retry-After: seconds`.
    pub fn too_many_requests(message: impl Into<String>, seconds: u64) -> Self {
        let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message);
        error.retry_after = Some(seconds);
        error
    }

    /// Asks the client to retry after `seconds` (429s and 503s).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no or unknown credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: known credentials, not allowed here.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 500: the whole cause chain goes to the operator's log under an
    /// incident id; the client gets only the id (host paths, OS errors and
    /// the like are nobody else's business).
    pub fn internal(error: anyhow::Error) -> Self {
        let incident = incident_id();
        tracing::error!(%incident, "internal error: {error:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "the gateway failed to handle this request (incident {incident}; the operator's log has the details)"
            ),
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ApiError {
    /// The JSON response.
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = hyper::Response::builder()
            .status(self.status)
            .header("content-type", "application/json");
        if let Some(seconds) = self.retry_after {
            response = response.header("retry-after", seconds);
        }
        response
            .body(full(body.to_string()))
            .expect("a valid response")
    }
}

/// A short random id tying a client's error to the operator's log line.
pub fn incident_id() -> String {
    let mut bytes = [0u8; 6];
    // Without randomness the id is only less unique.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::internal(error)
    }
}

/// What a client is told to wait when the store is unavailable.
const STORE_RETRY_SECONDS: u64 = 2;

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::Conflict(message) => Self::conflict(message),
            StoreError::NotFound(message) => Self::not_found(message),
            StoreError::Quota(message) => {
                Self::new(StatusCode::FORBIDDEN, "quota_exceeded", message)
            }
            StoreError::Moved => Self::conflict("the record changed meanwhile; try again"),
            StoreError::Unsupported(message) => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "not_supported", message)
            }
            StoreError::Unavailable(error) => {
                tracing::warn!("{error:#}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the control-plane store cannot be reached right now; try again shortly",
                )
                .retry_after(STORE_RETRY_SECONDS)
            }
            StoreError::Storage(error) => Self::internal(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_tell_the_client_an_incident_not_the_cause() {
        let cause = anyhow::anyhow!("Too many open files (os error 24)").context("opening /srv/x");
        let error = ApiError::internal(cause);
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(error.message().contains("incident"), "{}", error.message());
        for secret in ["os error", "/srv/x"] {
            assert!(!error.message().contains(secret), "{}", error.message());
        }
    }
}
