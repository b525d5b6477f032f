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

/// The caller-facing error and its HTTP status: size limits get 413 (gRPC has no such
/// code, so the kind alone cannot say it), the rest follow the kind.
pub fn for_http(error: IngestError) -> (u16, Error) {
    let too_large = matches!(error, IngestError::TooLarge(_));
    let error = Error::from(error);
    let status = if too_large {
        413
    } else {
        error.kind.http_status()
    };
    (status, error)
}
