//! The ingestion service's one table from domain errors to caller-facing errors.

use waymark_kit::error::{Error, ErrorKind};

use crate::service::IngestError;

impl From<IngestError> for Error {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Unauthenticated(m) => Error::new(ErrorKind::Unauthenticated, m),
            IngestError::RateLimited { retry_after } => Error::new(
                ErrorKind::ResourceExhausted,
                "rate limit exceeded for this source",
            )
            .with_retry_after(retry_after),
            IngestError::Invalid(violations) => Error::invalid_fields(violations),
            IngestError::TooLarge(m) => Error::new(ErrorKind::InvalidArgument, m),
            IngestError::NotFound(m) => Error::new(ErrorKind::NotFound, m),
            IngestError::AlreadyExists(m) => Error::new(ErrorKind::AlreadyExists, m),
            IngestError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Error::new(
                    ErrorKind::Unavailable,
                    "store unavailable; nothing was written, retry",
                )
                .with_retry_after(std::time::Duration::from_secs(1))
            }
            IngestError::Internal(detail) => Error::internal("ingest", &detail),
        }
    }
}

impl From<IngestError> for tonic::Status {
    fn from(error: IngestError) -> Self {
        Error::from(error).into()
    }
}

/// The HTTP status for an error; size limits get 413, the rest follow the kind.
pub fn http_status(error: &IngestError, kind: ErrorKind) -> u16 {
    match error {
        IngestError::TooLarge(_) => 413,
        _ => kind.http_status(),
    }
}
