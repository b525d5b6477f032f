//! The orchestrator's one table from domain errors to caller-facing errors.

use waymark_kit::error::{Error, ErrorKind, FieldViolation};

use crate::service::OrchestratorError;

impl From<OrchestratorError> for tonic::Status {
    fn from(error: OrchestratorError) -> Self {
        let error = match error {
            OrchestratorError::Invalid { field, problem } => Error::invalid(field, problem),
            OrchestratorError::InvalidJourney(problems) => Error::invalid_fields(
                problems
                    .into_iter()
                    .map(|p| {
                        let field = if p.field.is_empty() {
                            "journey".to_owned()
                        } else {
                            format!("journey.{}", p.field)
                        };
                        let problem = if p.node_id.is_empty() {
                            p.problem
                        } else {
                            format!("node `{}`: {}", p.node_id, p.problem)
                        };
                        FieldViolation::new(field, problem)
                    })
                    .collect(),
            ),
            OrchestratorError::NotFound(m) => Error::new(ErrorKind::NotFound, m),
            OrchestratorError::FailedPrecondition(m) => {
                Error::new(ErrorKind::FailedPrecondition, m)
            }
            OrchestratorError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Error::new(
                    ErrorKind::Unavailable,
                    "store unavailable; nothing was written, retry",
                )
                .with_retry_after(std::time::Duration::from_secs(1))
            }
            OrchestratorError::Internal(detail) => Error::internal("orchestrator", &detail),
        };
        error.into()
    }
}
