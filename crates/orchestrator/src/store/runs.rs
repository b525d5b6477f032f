//! Enrollments, their steps and what the engine needs to decide: entry history, recent
//! contacts and open cases per profile; and the one write of a run's effects.

use std::collections::{HashMap, HashSet};

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Value};
use serde_json::{Map, Value as Json};
use waymark_kit::sql::{Column, Insert, execute, in_list, query_as};

use super::corrupt;
use crate::engine::Effects;
use crate::model::{Contact, Enrollment, Status, StepRecord, Waiting};

const ENROLLMENT_COLUMNS: &str = "enrollment_id, journey_id, version, profile_id, user_id, entry_key, status, node_id, \
     waiting, waiting_action, waiting_until, entered_at, ended_at, reason, context, seq";

/// A stored enrollment, read by column name.
#[derive(FromQueryResult)]
struct EnrollmentRow {
    enrollment_id: String,
    journey_id: String,
    version: i32,
    profile_id: String,
    user_id: String,
    entry_key: String,
    status: i16,
    node_id: String,
    waiting: i16,
    waiting_action: String,
    waiting_until: Option<i64>,
    entered_at: i64,
    ended_at: Option<i64>,
    reason: String,
    context: String,
    seq: i64,
}

impl TryFrom<EnrollmentRow> for Enrollment {
    type Error = DbErr;

    fn try_from(r: EnrollmentRow) -> Result<Enrollment, DbErr> {
        let context: Map<String, Json> =
            serde_json::from_str(&r.context).map_err(|e| corrupt("enrollment context", e))?;
        Ok(Enrollment {
            enrollment_id: r.enrollment_id,
            journey_id: r.journey_id,
            version: u32::try_from(r.version).unwrap_or(0),
            profile_id: r.profile_id,
            user_id: r.user_id,
            key: r.entry_key,
            status: Status::from_i32(i32::from(r.status)),
            node_id: r.node_id,
            waiting: Waiting::decode(r.waiting, r.waiting_action),
            waiting_until: r.waiting_until,
            entered_at: r.entered_at,
            ended_at: r.ended_at,
            reason: r.reason,
            context,
            seq: r.seq,
        })
    }
}

async fn enrollments<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<Enrollment>, DbErr> {
    query_as::<EnrollmentRow, _>(conn, text, values)
        .await?
        .into_iter()
        .map(Enrollment::try_from)
        .collect()
}

/// Active enrollments of `profile_ids`.
pub async fn active_for<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
) -> Result<Vec<Enrollment>, DbErr> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    enrollments(
        conn,
        &format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE status = 1 AND profile_id IN ({})",
            in_list(profile_ids.len())
        ),
        profile_ids.iter().map(|p| p.clone().into()),
    )
    .await
}

/// One enrollment.
pub async fn enrollment<C: ConnectionTrait>(
    conn: &C,
    enrollment_id: &str,
) -> Result<Option<Enrollment>, DbErr> {
    Ok(enrollments(
        conn,
        &format!("SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE enrollment_id = ?"),
        [enrollment_id.into()],
    )
    .await?
    .pop())
}

/// Active enrollments of a journey on versions other than `version`.
pub async fn active_on_other_versions<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
    version: u32,
) -> Result<Vec<Enrollment>, DbErr> {
    enrollments(
        conn,
        &format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments
             WHERE journey_id = ? AND status = 1 AND version <> ?"
        ),
        [journey_id.into(), i64::from(version).into()],
    )
    .await
}

/// Active enrollments of a journey.
pub async fn active_of_journey<C: ConnectionTrait>(
    conn: &C,
    journey_id: &str,
) -> Result<Vec<Enrollment>, DbErr> {
    enrollments(
        conn,
        &format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE journey_id = ? AND status = 1"
        ),
        [journey_id.into()],
    )
    .await
}

/// Filters of [`list_enrollments`].
pub struct EnrollmentFilter<'a> {
    pub journey_id: Option<&'a str>,
    pub profile_id: Option<&'a str>,
    pub status: Option<Status>,
    /// Newest first, strictly before this (entered_at, id).
    pub before: Option<(i64, String)>,
    pub limit: u64,
}

/// Enrollments, newest first.
pub async fn list_enrollments<C: ConnectionTrait>(
    conn: &C,
    f: &EnrollmentFilter<'_>,
) -> Result<Vec<Enrollment>, DbErr> {
    let mut clauses = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(j) = f.journey_id {
        clauses.push("journey_id = ?");
        values.push(j.into());
    }
    if let Some(p) = f.profile_id {
        clauses.push("profile_id = ?");
        values.push(p.into());
    }
    if let Some(s) = f.status {
        clauses.push("status = ?");
        values.push((s as i16).into());
    }
    if let Some((at, id)) = &f.before {
        clauses.push("(entered_at < ? OR (entered_at = ? AND enrollment_id < ?))");
        values.extend([(*at).into(), (*at).into(), id.clone().into()]);
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    values.push((f.limit as i64).into());
    enrollments(
        conn,
        &format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments {filter}
             ORDER BY entered_at DESC, enrollment_id DESC LIMIT ?"
        ),
        values,
    )
    .await
}

/// The last `limit` steps of an enrollment, oldest first.
pub async fn steps<C: ConnectionTrait>(
    conn: &C,
    enrollment_id: &str,
    limit: u64,
) -> Result<Vec<StepRecord>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        steps: String,
    }
    // A row holds the steps of one run; read runs newest first until there are enough.
    let mut out: Vec<StepRecord> = Vec::new();
    let mut before = i64::MAX;
    while (out.len() as u64) < limit {
        let rows: Vec<Row> = query_as(
            conn,
            "SELECT steps FROM steps WHERE enrollment_id = ? AND seq < ?
             ORDER BY seq DESC LIMIT 50",
            [enrollment_id.into(), before.into()],
        )
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let run: Vec<StoredStep> =
                serde_json::from_str(&row.steps).map_err(|e| corrupt("steps", e))?;
            before = run.first().map_or(before, |s| s.seq);
            for s in run.into_iter().rev() {
                out.push(StepRecord {
                    enrollment_id: enrollment_id.to_owned(),
                    seq: s.seq,
                    node_id: s.node_id,
                    outcome: s.outcome,
                    decision: s.decision,
                    detail: s.detail,
                    at: s.at,
                });
            }
        }
    }
    out.truncate(limit as usize);
    out.reverse();
    Ok(out)
}

/// A step as stored inside its run's row.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredStep {
    seq: i64,
    node_id: String,
    outcome: String,
    decision: String,
    detail: Map<String, Json>,
    at: i64,
}

/// How a profile has been in a journey (per entry key): what re-entry rules read.
#[derive(Debug, Clone, FromQueryResult)]
pub struct EntryHistory {
    pub profile_id: String,
    pub journey_id: String,
    pub entry_key: String,
    pub active: i64,
    pub total: i64,
    pub last_entered: i64,
}

/// The entry history of `profile_ids` in `journey_ids`.
pub async fn entry_history<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
    journey_ids: &[String],
) -> Result<Vec<EntryHistory>, DbErr> {
    if profile_ids.is_empty() || journey_ids.is_empty() {
        return Ok(Vec::new());
    }
    let values = profile_ids
        .iter()
        .chain(journey_ids)
        .map(|v| Value::from(v.clone()));
    query_as(
        conn,
        &format!(
            "SELECT profile_id, journey_id, entry_key,
                    SUM(CASE WHEN status = 1 THEN 1 ELSE 0 END) AS active,
                    COUNT(*) AS total, MAX(entered_at) AS last_entered
             FROM enrollments WHERE profile_id IN ({}) AND journey_id IN ({})
             GROUP BY profile_id, journey_id, entry_key",
            in_list(profile_ids.len()),
            in_list(journey_ids.len())
        ),
        values,
    )
    .await
}

/// Marketing messages sent to `profile_ids` after `since`, by profile, oldest first.
pub async fn contacts_since<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
    since: i64,
) -> Result<HashMap<String, Vec<Contact>>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        profile_id: String,
        channel: String,
        at: i64,
    }
    let mut out: HashMap<String, Vec<Contact>> = HashMap::new();
    if profile_ids.is_empty() {
        return Ok(out);
    }
    let mut values: Vec<Value> = profile_ids.iter().map(|p| p.clone().into()).collect();
    values.push(since.into());
    let rows: Vec<Row> = query_as(
        conn,
        &format!(
            "SELECT profile_id, channel, at FROM contacts
             WHERE profile_id IN ({}) AND at >= ? ORDER BY at",
            in_list(profile_ids.len())
        ),
        values,
    )
    .await?;
    for r in rows {
        out.entry(r.profile_id).or_default().push(Contact {
            channel: r.channel,
            at: r.at,
        });
    }
    Ok(out)
}

/// Which of `profile_ids` have an open case.
pub async fn open_cases<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
) -> Result<HashSet<String>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        profile_id: String,
    }
    if profile_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<Row> = query_as(
        conn,
        &format!(
            "SELECT DISTINCT profile_id FROM cases WHERE open = 1 AND profile_id IN ({})",
            in_list(profile_ids.len())
        ),
        profile_ids.iter().map(|p| p.clone().into()),
    )
    .await?;
    Ok(rows.into_iter().map(|r| r.profile_id).collect())
}

/// Records `event_ids` as applied; returns those applied for the first time.
pub async fn mark_applied<C: ConnectionTrait>(
    conn: &C,
    event_ids: &[String],
    now_us: i64,
) -> Result<HashSet<String>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        event_id: String,
    }
    let rows: Vec<Row> = Insert::new(
        "INSERT INTO applied_events (event_id, applied_at)",
        vec![Column::Text(event_ids.to_vec())],
    )
    .constant(now_us)
    .suffix("ON CONFLICT (event_id) DO NOTHING RETURNING event_id")
    .returning(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.event_id).collect())
}

/// Forgets applied event ids older than `before`: redelivery never comes that late.
pub async fn forget_applied<C: ConnectionTrait>(conn: &C, before: i64) -> Result<u64, DbErr> {
    execute(
        conn,
        "DELETE FROM applied_events WHERE applied_at < ?",
        [before.into()],
    )
    .await
}

/// An enrollment a run changed, with the step number it was loaded at.
pub struct Changed<'a> {
    pub enrollment: &'a Enrollment,
    /// `None` for an enrollment the run created.
    pub loaded_seq: Option<i64>,
}

/// Writes a run's enrollments and effects. An enrollment changed by someone else since it
/// was loaded (another replica fired its timer) fails the write with
/// `DbErr::RecordNotUpdated`: the caller rolls back and runs again on fresh state, so a
/// step is never taken twice. Pending actions are written claimed until `lease_until`.
pub async fn write_run<C: ConnectionTrait>(
    conn: &C,
    changed: &[Changed<'_>],
    fx: &Effects,
    now_us: i64,
    lease_until: i64,
) -> Result<(), DbErr> {
    let (new, updated): (Vec<&Changed>, Vec<&Changed>) =
        changed.iter().partition(|c| c.loaded_seq.is_none());
    if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
        update_all_postgres(conn, &updated).await?;
    } else {
        for c in &updated {
            update_one(conn, c).await?;
        }
    }
    if !new.is_empty() {
        let e =
            |f: fn(&Enrollment) -> String| new.iter().map(|c| f(c.enrollment)).collect::<Vec<_>>();
        let i = |f: fn(&Enrollment) -> i64| new.iter().map(|c| f(c.enrollment)).collect::<Vec<_>>();
        Insert::new(
            "INSERT INTO enrollments (enrollment_id, journey_id, profile_id, user_id, entry_key, node_id,
                 waiting_action, reason, context, version, status, waiting, seq, entered_at,
                 waiting_until, ended_at, lease_until)",
            vec![
                Column::Text(e(|x| x.enrollment_id.clone())),
                Column::Text(e(|x| x.journey_id.clone())),
                Column::Text(e(|x| x.profile_id.clone())),
                Column::Text(e(|x| x.user_id.clone())),
                Column::Text(e(|x| x.key.clone())),
                Column::Text(e(|x| x.node_id.clone())),
                Column::Text(e(|x| x.waiting.encode().1.to_owned())),
                Column::Text(e(|x| x.reason.clone())),
                Column::Text(e(|x| Json::Object(x.context.clone()).to_string())),
                Column::Int4(new.iter().map(|c| c.enrollment.version as i32).collect()),
                Column::Int2(new.iter().map(|c| c.enrollment.status as i16).collect()),
                Column::Int2(new.iter().map(|c| c.enrollment.waiting.encode().0).collect()),
                Column::Int8(i(|x| x.seq)),
                Column::Int8(i(|x| x.entered_at)),
                Column::NullableInt8(new.iter().map(|c| c.enrollment.waiting_until).collect()),
                Column::NullableInt8(new.iter().map(|c| c.enrollment.ended_at).collect()),
            ],
        )
        .constant(0i64)
        .execute(conn)
        .await?;
    }
    write_steps(conn, &fx.steps).await?;
    super::actions::write_actions(conn, fx, now_us, lease_until).await?;
    Ok(())
}

/// Writes one changed enrollment if it is still at the step it was loaded at.
async fn update_one<C: ConnectionTrait>(conn: &C, c: &Changed<'_>) -> Result<(), DbErr> {
    let e = c.enrollment;
    let (waiting, action) = e.waiting.encode();
    let n = execute(
        conn,
        "UPDATE enrollments SET version = ?, profile_id = ?, user_id = ?, status = ?, node_id = ?,
             waiting = ?, waiting_action = ?, waiting_until = ?, lease_until = 0, ended_at = ?,
             reason = ?, context = ?, seq = ?
         WHERE enrollment_id = ? AND seq = ?",
        [
            i64::from(e.version).into(),
            e.profile_id.clone().into(),
            e.user_id.clone().into(),
            (e.status as i16).into(),
            e.node_id.clone().into(),
            waiting.into(),
            action.into(),
            e.waiting_until.into(),
            e.ended_at.into(),
            e.reason.clone().into(),
            Json::Object(e.context.clone()).to_string().into(),
            e.seq.into(),
            e.enrollment_id.clone().into(),
            c.loaded_seq.unwrap_or_default().into(),
        ],
    )
    .await?;
    if n == 0 {
        return Err(DbErr::RecordNotUpdated);
    }
    Ok(())
}

/// Writes every changed enrollment in one statement, each guarded by the step it was
/// loaded at; any one that moved meanwhile fails the whole write.
async fn update_all_postgres<C: ConnectionTrait>(
    conn: &C,
    changed: &[&Changed<'_>],
) -> Result<(), DbErr> {
    if changed.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&Enrollment) -> String| -> Value {
        changed
            .iter()
            .map(|c| f(c.enrollment))
            .collect::<Vec<String>>()
            .into()
    };
    let big = |f: fn(&Enrollment) -> i64| -> Value {
        changed
            .iter()
            .map(|c| f(c.enrollment))
            .collect::<Vec<i64>>()
            .into()
    };
    let values: Vec<Value> = vec![
        text(|e| e.enrollment_id.clone()),
        changed
            .iter()
            .map(|c| c.loaded_seq.unwrap_or_default())
            .collect::<Vec<i64>>()
            .into(),
        big(|e| i64::from(e.version)),
        text(|e| e.profile_id.clone()),
        text(|e| e.user_id.clone()),
        big(|e| e.status as i64),
        text(|e| e.node_id.clone()),
        big(|e| i64::from(e.waiting.encode().0)),
        text(|e| e.waiting.encode().1.to_owned()),
        // NULL travels as i64::MIN: arrays of nullable integers do not bind.
        big(|e| e.waiting_until.unwrap_or(i64::MIN)),
        big(|e| e.ended_at.unwrap_or(i64::MIN)),
        text(|e| e.reason.clone()),
        text(|e| Json::Object(e.context.clone()).to_string()),
        big(|e| e.seq),
    ];
    let n = execute(
        conn,
        "UPDATE enrollments AS e SET version = u.version, profile_id = u.profile_id,
             user_id = u.user_id, status = u.status, node_id = u.node_id, waiting = u.waiting,
             waiting_action = u.waiting_action,
             waiting_until = NULLIF(u.waiting_until, -9223372036854775808), lease_until = 0,
             ended_at = NULLIF(u.ended_at, -9223372036854775808), reason = u.reason,
             context = u.context, seq = u.seq
         FROM UNNEST(?::text[], ?::int8[], ?::int8[], ?::text[], ?::text[], ?::int8[], ?::text[],
                     ?::int8[], ?::text[], ?::int8[], ?::int8[], ?::text[], ?::text[], ?::int8[])
           AS u(id, loaded_seq, version, profile_id, user_id, status, node_id, waiting,
                waiting_action, waiting_until, ended_at, reason, context, seq)
         WHERE e.enrollment_id = u.id AND e.seq = u.loaded_seq",
        values,
    )
    .await?;
    if n != changed.len() as u64 {
        return Err(DbErr::RecordNotUpdated);
    }
    Ok(())
}

/// One row per enrollment and run: its steps in order, as JSON. An enrollment takes a
/// few steps each time it moves, so this writes a third of the rows one per step would.
async fn write_steps<C: ConnectionTrait>(conn: &C, steps: &[StepRecord]) -> Result<(), DbErr> {
    let mut runs: Vec<(&str, Vec<&StepRecord>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for s in steps {
        let i = *index.entry(s.enrollment_id.as_str()).or_insert_with(|| {
            runs.push((s.enrollment_id.as_str(), Vec::new()));
            runs.len() - 1
        });
        runs[i].1.push(s);
    }
    if runs.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(runs.len());
    let (mut first, mut bodies) = (Vec::new(), Vec::new());
    for (enrollment_id, run) in runs {
        ids.push(enrollment_id.to_owned());
        first.push(run.first().map_or(0, |s| s.seq));
        let stored: Vec<StoredStep> = run
            .into_iter()
            .map(|s| StoredStep {
                seq: s.seq,
                node_id: s.node_id.clone(),
                outcome: s.outcome.clone(),
                decision: s.decision.clone(),
                detail: s.detail.clone(),
                at: s.at,
            })
            .collect();
        bodies.push(serde_json::to_string(&stored).map_err(|e| corrupt("steps", e))?);
    }
    Insert::new(
        "INSERT INTO steps (enrollment_id, steps, seq)",
        vec![Column::Text(ids), Column::Text(bodies), Column::Int8(first)],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Claims up to `limit` active enrollments whose wait is due at `now_us`, on journeys
/// that are not paused, for `lease_us`: another replica skips them until the lease ends,
/// and the step-number check of [`write_run`] keeps a late firing from doubling a step.
pub async fn claim_due<C: ConnectionTrait>(
    conn: &C,
    now_us: i64,
    lease_us: i64,
    limit: u64,
) -> Result<Vec<Enrollment>, DbErr> {
    let lock = super::skip_locked(conn);
    enrollments(
        conn,
        &format!(
            "UPDATE enrollments SET lease_until = ?
             WHERE enrollment_id IN (
                 SELECT enrollment_id FROM enrollments
                 WHERE status = 1 AND waiting_until <= ? AND lease_until < ?
                   AND journey_id NOT IN (SELECT journey_id FROM journeys WHERE status = 3)
                 ORDER BY waiting_until LIMIT ? {lock})
             RETURNING {ENROLLMENT_COLUMNS}"
        ),
        [
            now_us.saturating_add(lease_us).into(),
            now_us.into(),
            now_us.into(),
            (limit as i64).into(),
        ],
    )
    .await
}

/// When the next wait falls due, if any (a claimed one when its claim ends).
pub async fn next_due<C: ConnectionTrait>(conn: &C) -> Result<Option<i64>, DbErr> {
    super::next_due_in(conn, "enrollments", "waiting_until").await
}

/// Points what `merged` holds (enrollments, contacts, cases) at `survivor`.
pub async fn repoint_profile<C: ConnectionTrait>(
    conn: &C,
    merged: &str,
    survivor: &str,
) -> Result<(), DbErr> {
    for table in ["enrollments", "actions", "contacts", "cases"] {
        execute(
            conn,
            &format!("UPDATE {table} SET profile_id = ? WHERE profile_id = ?"),
            [survivor.into(), merged.into()],
        )
        .await?;
    }
    Ok(())
}

/// Erases everything held about `profile_ids`: enrollments, their steps, actions,
/// contacts and cases.
pub async fn erase_profiles<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
) -> Result<u64, DbErr> {
    if profile_ids.is_empty() {
        return Ok(0);
    }
    let list = in_list(profile_ids.len());
    let values = || profile_ids.iter().map(|p| Value::from(p.clone()));
    execute(
        conn,
        &format!(
            "DELETE FROM steps WHERE enrollment_id IN
               (SELECT enrollment_id FROM enrollments WHERE profile_id IN ({list}))"
        ),
        values(),
    )
    .await?;
    let mut erased = 0;
    for table in ["enrollments", "actions", "contacts", "cases"] {
        erased += execute(
            conn,
            &format!("DELETE FROM {table} WHERE profile_id IN ({list})"),
            values(),
        )
        .await?;
    }
    Ok(erased)
}
