//! The one table from error kinds to gRPC codes. Service crates map their domain errors
//! to an [`ErrorKind`] (their own small table) and let this module build the `Status`.

use std::time::Duration;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// What went wrong, as far as a caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed; field violations say where.
    InvalidArgument,
    /// The named thing does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The target is not in a state that allows the operation (e.g. a merge already undone).
    FailedPrecondition,
    /// No or unknown credentials.
    Unauthenticated,
    /// Credentials valid but not allowed here.
    PermissionDenied,
    /// A rate limit or quota was hit; retry later.
    ResourceExhausted,
    /// A dependency (database, consumer) is down; nothing was written, retry.
    Unavailable,
    /// A bug or an unexpected state; details are logged, not returned.
    Internal,
}

impl ErrorKind {
    /// The gRPC code for this kind.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The HTTP status for this kind, for the HTTP adapters.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::FailedPrecondition => 409,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::ResourceExhausted => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `batch[3].event`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An error on its way to a caller.
#[derive(Debug)]
pub struct Error {
    /// The kind, which picks the code.
    pub kind: ErrorKind,
    /// Safe to show the caller; replaced by a generic text for `Internal`.
    pub message: String,
    /// Field details for `InvalidArgument`.
    pub violations: Vec<FieldViolation>,
    /// When the caller may retry, for `ResourceExhausted` and `Unavailable`.
    pub retry_after: Option<Duration>,
}

impl Error {
    /// An error of `kind` with a caller-facing message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
        }
    }

    /// An `InvalidArgument` for one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid_fields(vec![FieldViolation::new(field, description)])
    }

    /// An `InvalidArgument` for several fields; the message names the first.
    pub fn invalid_fields(violations: Vec<FieldViolation>) -> Self {
        let message = match violations.first() {
            Some(v) => format!("invalid {}: {}", v.field, v.description),
            None => "invalid request".to_owned(),
        };
        Self {
            kind: ErrorKind::InvalidArgument,
            message,
            violations,
            retry_after: None,
        }
    }

    /// An internal error: logged here with its context, opaque to the caller.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, context, "internal error");
        Self::new(ErrorKind::Internal, "internal error")
    }

    /// Sets when the caller may retry.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let mut details = ErrorDetails::new();
        for v in &error.violations {
            details.add_bad_request_violation(v.field.clone(), v.description.clone());
        }
        if let Some(after) = error.retry_after {
            details.set_retry_info(Some(after));
        }
        if error.violations.is_empty() && error.retry_after.is_none() {
            tonic::Status::new(error.kind.code(), error.message)
        } else {
            tonic::Status::with_error_details(error.kind.code(), error.message, details)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_details() {
        let status: tonic::Status = Error::invalid("events[2].event", "is required").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("events[2].event"));
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("bad request").field_violations;
        assert_eq!(violations[0].field, "events[2].event");
        assert_eq!(violations[0].description, "is required");
    }

    #[test]
    fn kinds_map_to_codes_and_http() {
        assert_eq!(ErrorKind::Unavailable.code(), Code::Unavailable);
        assert_eq!(ErrorKind::Unavailable.http_status(), 503);
        assert_eq!(ErrorKind::ResourceExhausted.http_status(), 429);
        assert_eq!(ErrorKind::Unauthenticated.code(), Code::Unauthenticated);
    }
}
