//! Journeys, their drafts and immutable versions, and the contact policy.

use prost::Message;
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use waymark_kit::sql::{execute, query_as, query_one_as};
use waymark_proto::orchestration::v1 as pb;

use super::corrupt;

/// A journey's row, without its draft.
#[derive(Debug, Clone, FromQueryResult)]
pub struct JourneyRow {
    pub journey_id: String,
    pub name: String,
    pub status: i16,
    pub live_version: i32,
    pub draft_changed: i16,
    pub updated_at: i64,
}

const JOURNEY_COLUMNS: &str = "journey_id, name, status, live_version, draft_changed, updated_at";

#[derive(FromQueryResult)]
struct DefinitionRow {
    definition: Vec<u8>,
}

fn decode(bytes: &[u8]) -> Result<pb::JourneyDefinition, DbErr> {
    pb::JourneyDefinition::decode(bytes).map_err(|e| corrupt("journey definition", e))
}

/// Saves `definition` as the draft of its journey (a new journey starts as a draft).
pub async fn put_draft<C: ConnectionTrait>(
    conn: &C,
    definition: &pb::JourneyDefinition,
    now_us: i64,
) -> Result<JourneyRow, DbErr> {
    let draft = definition.encode_to_vec();
    execute(
        conn,
        "INSERT INTO journeys (journey_id, name, status, draft, live_version, draft_changed, updated_at)
         VALUES (?, ?, ?, ?, 0, 1, ?)
         ON CONFLICT (journey_id) DO UPDATE SET name = excluded.name, draft = excluded.draft,
             draft_changed = 1, updated_at = excluded.updated_at",
        [
            definition.journey_id.clone().into(),
            definition.name.clone().into(),
            (pb::JourneyStatus::Draft as i16).into(),
            draft.into(),
            now_us.into(),
        ],
    )
    .await?;
    // The draft equals the live version again when it was put back unchanged.
    execute(
        conn,
        "UPDATE journeys SET draft_changed = 0 WHERE journey_id = ? AND live_version > 0
           AND draft = (SELECT definition FROM journey_versions v
                        WHERE v.journey_id = journeys.journey_id AND v.version = journeys.live_version)",
        [definition.journey_id.clone().into()],
    )
    .await?;
    journey(conn, &definition.journey_id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(definition.journey_id.clone()))
}

/// A journey's row.
pub async fn journey<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
) -> Result<Option<JourneyRow>, DbErr> {
    query_one_as(
        conn,
        &format!("SELECT {JOURNEY_COLUMNS} FROM journeys WHERE journey_id = ?"),
        [journey_id.into()],
    )
    .await
}

/// A journey's draft.
pub async fn draft<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
) -> Result<Option<pb::JourneyDefinition>, DbErr> {
    query_one_as::<DefinitionRow, _>(
        conn,
        "SELECT draft AS definition FROM journeys WHERE journey_id = ?",
        [journey_id.into()],
    )
    .await?
    .map(|r| decode(&r.definition))
    .transpose()
}

/// A published version's definition.
pub async fn version<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
    version: u32,
) -> Result<Option<pb::JourneyDefinition>, DbErr> {
    query_one_as::<DefinitionRow, _>(
        conn,
        "SELECT definition FROM journey_versions WHERE journey_id = ? AND version = ?",
        [journey_id.into(), i64::from(version).into()],
    )
    .await?
    .map(|r| decode(&r.definition))
    .transpose()
}

/// A published version, as listed.
#[derive(Debug, Clone, FromQueryResult)]
pub struct VersionRow {
    pub version: i32,
    pub published_at: i64,
    pub in_flight: i16,
    pub active: i64,
}

/// Every published version of a journey with its active enrollments, oldest first.
pub async fn versions<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
) -> Result<Vec<VersionRow>, DbErr> {
    query_as(
        conn,
        "SELECT v.version, v.published_at, v.in_flight,
                (SELECT COUNT(*) FROM enrollments e
                 WHERE e.journey_id = v.journey_id AND e.version = v.version AND e.status = 1) AS active
         FROM journey_versions v WHERE v.journey_id = ? ORDER BY v.version",
        [journey_id.into()],
    )
    .await
}

/// Journeys by id after `after`, at most `limit`, with their active enrollments.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    after: &str,
    limit: u64,
) -> Result<Vec<(JourneyRow, i64)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        journey_id: String,
        name: String,
        status: i16,
        live_version: i32,
        draft_changed: i16,
        updated_at: i64,
        active: i64,
    }
    let rows: Vec<Row> = query_as(
        conn,
        "SELECT j.journey_id, j.name, j.status, j.live_version, j.draft_changed, j.updated_at,
                (SELECT COUNT(*) FROM enrollments e
                 WHERE e.journey_id = j.journey_id AND e.status = 1) AS active
         FROM journeys j WHERE j.journey_id > ? ORDER BY j.journey_id LIMIT ?",
        [after.into(), (limit as i64).into()],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                JourneyRow {
                    journey_id: r.journey_id,
                    name: r.name,
                    status: r.status,
                    live_version: r.live_version,
                    draft_changed: r.draft_changed,
                    updated_at: r.updated_at,
                },
                r.active,
            )
        })
        .collect())
}

/// Active enrollments of a journey.
pub async fn active_enrollments<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
) -> Result<i64, DbErr> {
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    Ok(query_one_as::<Count, _>(
        conn,
        "SELECT COUNT(*) AS n FROM enrollments WHERE journey_id = ? AND status = 1",
        [journey_id.into()],
    )
    .await?
    .map_or(0, |c| c.n))
}

/// Stores the draft as version `version` and makes it live.
pub async fn publish<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
    version: u32,
    in_flight: pb::InFlightPolicy,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        conn,
        "INSERT INTO journey_versions (journey_id, version, definition, published_at, in_flight)
         SELECT journey_id, ?, draft, ?, ? FROM journeys WHERE journey_id = ?",
        [
            i64::from(version).into(),
            now_us.into(),
            (in_flight as i16).into(),
            journey_id.into(),
        ],
    )
    .await?;
    execute(
        conn,
        "UPDATE journeys SET live_version = ?, status = ?, draft_changed = 0, updated_at = ?
         WHERE journey_id = ?",
        [
            i64::from(version).into(),
            (pb::JourneyStatus::Live as i16).into(),
            now_us.into(),
            journey_id.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Sets a journey's status.
pub async fn set_status<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
    status: pb::JourneyStatus,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        conn,
        "UPDATE journeys SET status = ?, updated_at = ? WHERE journey_id = ?",
        [(status as i16).into(), now_us.into(), journey_id.into()],
    )
    .await?;
    Ok(())
}

/// A journey that runs: its id, status and live version, for the engine's index.
#[derive(Debug, Clone, FromQueryResult)]
pub struct LiveJourney {
    pub journey_id: String,
    pub status: i16,
    pub live_version: i32,
    pub definition: Vec<u8>,
}

/// Every live or paused journey with its live version's definition.
pub async fn running<C: ConnectionTrait>(
    conn: &C,
) -> Result<Vec<(LiveJourney, pb::JourneyDefinition)>, DbErr> {
    let rows: Vec<LiveJourney> = query_as(
        conn,
        "SELECT j.journey_id, j.status, j.live_version, v.definition
         FROM journeys j JOIN journey_versions v
           ON v.journey_id = j.journey_id AND v.version = j.live_version
         WHERE j.status IN (2, 3)",
        [],
    )
    .await?;
    rows.into_iter()
        .map(|r| {
            let d = decode(&r.definition)?;
            Ok((r, d))
        })
        .collect()
}

/// What changes when any journey or the contact policy changes: compared to know when
/// to reload them.
pub async fn catalog_stamp<C: ConnectionTrait>(conn: &C) -> Result<(i64, i64, i64), DbErr> {
    #[derive(FromQueryResult)]
    struct Stamp {
        latest: Option<i64>,
        n: i64,
        policy: Option<i64>,
    }
    let s = query_one_as::<Stamp, _>(
        conn,
        "SELECT (SELECT MAX(updated_at) FROM journeys) AS latest,
                (SELECT COUNT(*) FROM journeys) AS n,
                (SELECT MAX(updated_at) FROM contact_policy) AS policy",
        [],
    )
    .await?;
    Ok(s.map_or((0, 0, 0), |s| {
        (s.latest.unwrap_or(0), s.n, s.policy.unwrap_or(0))
    }))
}

/// The contact policy, when one was put.
pub async fn contact_policy<C: ConnectionTrait>(
    conn: &C,
) -> Result<Option<pb::ContactPolicy>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        policy: Vec<u8>,
    }
    query_one_as::<Row, _>(conn, "SELECT policy FROM contact_policy WHERE id = 1", [])
        .await?
        .map(|r| {
            pb::ContactPolicy::decode(r.policy.as_slice()).map_err(|e| corrupt("contact policy", e))
        })
        .transpose()
}

/// Replaces the contact policy.
pub async fn put_contact_policy<C: ConnectionTrait>(
    conn: &C,
    policy: &pb::ContactPolicy,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        conn,
        "INSERT INTO contact_policy (id, policy, updated_at) VALUES (1, ?, ?)
         ON CONFLICT (id) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at",
        [policy.encode_to_vec().into(), now_us.into()],
    )
    .await?;
    Ok(())
}
