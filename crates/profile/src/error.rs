//! The profile service's one table from domain errors to caller-facing errors.

use waymark_kit::error::{Error, ErrorKind};

use crate::service::ProfileError;

impl From<ProfileError> for tonic::Status {
    fn from(error: ProfileError) -> Self {
        let error = match error {
            ProfileError::Invalid { field, problem } => Error::invalid(field, problem),
            ProfileError::NotFound(m) => Error::new(ErrorKind::NotFound, m),
            ProfileError::FailedPrecondition(m) => Error::new(ErrorKind::FailedPrecondition, m),
            ProfileError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Error::new(
                    ErrorKind::Unavailable,
                    "store unavailable; nothing was written, retry",
                )
                .with_retry_after(std::time::Duration::from_secs(1))
            }
            ProfileError::Internal(detail) => Error::internal("profile", &detail),
        };
        error.into()
    }
}
