//! Journey reports from the orchestrator's step events held in memory.

use waymark_proto::analytics::v1::{GetJourneyReportRequest, GetJourneyReportResponse};

use crate::funnel::range_of;
use crate::model::Model;
use crate::report::{self, EnrollmentSteps};

/// The report of one journey (one version, or all), over enrollments that entered in
/// the request's range.
pub fn report(
    model: &Model,
    req: &GetJourneyReportRequest,
    confidence: f64,
) -> GetJourneyReportResponse {
    let (lo, hi) = range_of(req.range.as_ref());
    let mut enrollments: Vec<EnrollmentSteps<'_>> = model
        .journeys
        .get(&req.journey_id)
        .into_iter()
        .flat_map(|j| j.iter())
        .filter(|(_, e)| req.version == 0 || e.version == req.version)
        .filter(|(_, e)| {
            e.steps
                .first()
                .is_some_and(|s| s.at_us >= lo && s.at_us < hi)
        })
        .map(|(id, e)| EnrollmentSteps {
            enrollment_id: id,
            version: e.version,
            steps: &e.steps,
        })
        .collect();
    enrollments.sort_by_key(|e| e.enrollment_id);
    report::journey_report(&req.journey_id, &enrollments, confidence)
}
