//! The analytics service's errors and its one table from them to caller-facing errors.

use waymark_kit::error::{Error, ErrorKind, FieldViolation};

/// What can go wrong in the analytics core.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// The request is malformed: each field at fault with its problem.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<(String, String)>),
    /// Nothing with that id.
    #[error("{0}")]
    NotFound(String),
    /// A query ran past its time or memory budget.
    #[error("{0}")]
    Budget(String),
    /// The store is unreachable; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Memory is not rebuilt from the store yet (the service is starting).
    #[error("memory not rebuilt from the store yet")]
    Loading,
    /// A bug or a broken invariant.
    #[error("{0}")]
    Internal(String),
}

impl AnalyticsError {
    /// One field at fault.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        AnalyticsError::Invalid(vec![(field.into(), problem.into())])
    }
}

impl From<sea_orm::DbErr> for AnalyticsError {
    fn from(e: sea_orm::DbErr) -> Self {
        AnalyticsError::Unavailable(e.to_string())
    }
}

impl From<AnalyticsError> for tonic::Status {
    fn from(error: AnalyticsError) -> Self {
        let error = match error {
            AnalyticsError::Invalid(fields) => Error::invalid_fields(
                fields
                    .into_iter()
                    .map(|(f, p)| FieldViolation::new(f, p))
                    .collect(),
            ),
            AnalyticsError::NotFound(m) => Error::new(ErrorKind::NotFound, m),
            AnalyticsError::Budget(m) => Error::new(ErrorKind::ResourceExhausted, m),
            AnalyticsError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Error::new(
                    ErrorKind::Unavailable,
                    "store unavailable; nothing was written, retry",
                )
                .with_retry_after(std::time::Duration::from_secs(1))
            }
            AnalyticsError::Loading => Error::new(
                ErrorKind::Unavailable,
                "starting: events are being loaded from the store; nothing was written, retry",
            )
            .with_retry_after(std::time::Duration::from_secs(1)),
            AnalyticsError::Internal(detail) => Error::internal("analytics", &detail),
        };
        error.into()
    }
}
