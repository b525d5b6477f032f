//! Outbound actions (the ledger that makes each step act once), the contacts caps count,
//! and escalation cases.

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Value};
use serde_json::Value as Json;
use waymark_kit::sql::{Column, Insert, execute, query_as, query_one_as};

use super::corrupt;
use crate::engine::Effects;
use crate::model::{Action, ActionKind, ActionStatus, Case};

/// Writes a run's actions, the contacts its messages count, its deferred messages decided
/// again, and its cases. An action id that exists already is left alone: the step that
/// made it was committed before.
pub(super) async fn write_actions<C: ConnectionTrait>(
    conn: &C,
    fx: &Effects,
    now_us: i64,
    lease_until: i64,
) -> Result<(), DbErr> {
    let a = &fx.actions;
    if !a.is_empty() {
        let t = |f: fn(&Action) -> String| a.iter().map(f).collect::<Vec<_>>();
        Insert::new(
            "INSERT INTO actions (action_id, enrollment_id, journey_id, node_id, profile_id, kind,
                 target, reason, payload, status, due_at, attempts, lease_until, created_at)",
            vec![
                Column::Text(t(|x| x.action_id.clone())),
                Column::Text(t(|x| x.enrollment_id.clone())),
                Column::Text(t(|x| x.journey_id.clone())),
                Column::Text(t(|x| x.node_id.clone())),
                Column::Text(t(|x| x.profile_id.clone())),
                Column::Text(t(|x| x.kind.name().to_owned())),
                Column::Text(t(|x| x.target.clone())),
                Column::Text(t(|x| x.reason.clone())),
                Column::Text(t(|x| x.payload.to_string())),
                Column::Int2(a.iter().map(|x| x.status as i16).collect()),
                Column::Int8(a.iter().map(|x| x.due_at).collect()),
                // A pending action is claimed by the replica that made it, which sends it
                // at once; should it die, the lease ends and another sends it.
                Column::Int4(
                    a.iter()
                        .map(|x| i32::from(x.status == ActionStatus::Pending))
                        .collect(),
                ),
                Column::Int8(
                    a.iter()
                        .map(|x| {
                            if x.status == ActionStatus::Pending {
                                lease_until
                            } else {
                                0
                            }
                        })
                        .collect(),
                ),
            ],
        )
        .constant(now_us)
        .suffix("ON CONFLICT (action_id) DO NOTHING")
        .execute(conn)
        .await?;
    }
    let contacts: Vec<(&str, &str, &str)> = a
        .iter()
        .filter(|x| x.marketing && x.status == ActionStatus::Pending)
        .map(|x| {
            (
                x.action_id.as_str(),
                x.profile_id.as_str(),
                x.target.as_str(),
            )
        })
        .collect();
    let mut contact_ids: Vec<String> = contacts.iter().map(|c| c.0.to_owned()).collect();
    let mut contact_profiles: Vec<String> = contacts.iter().map(|c| c.1.to_owned()).collect();
    let mut contact_channels: Vec<String> = contacts.iter().map(|c| c.2.to_owned()).collect();
    for u in &fx.action_updates {
        execute(
            conn,
            "UPDATE actions SET status = ?, reason = ?, due_at = ?, payload = ? WHERE action_id = ?",
            [
                (u.status as i16).into(),
                u.reason.clone().into(),
                u.due_at.into(),
                u.payload.to_string().into(),
                u.action_id.clone().into(),
            ],
        )
        .await?;
        if u.counts_as_contact {
            contact_ids.push(u.action_id.clone());
            contact_profiles.push(
                u.payload["profile_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            contact_channels.push(u.payload["channel"].as_str().unwrap_or_default().to_owned());
        }
    }
    if !contact_ids.is_empty() {
        Insert::new(
            "INSERT INTO contacts (action_id, profile_id, channel, at)",
            vec![
                Column::Text(contact_ids),
                Column::Text(contact_profiles),
                Column::Text(contact_channels),
            ],
        )
        .constant(now_us)
        .suffix("ON CONFLICT (action_id) DO NOTHING")
        .execute(conn)
        .await?;
    }
    let c = &fx.cases;
    if !c.is_empty() {
        let t = |f: fn(&Case) -> String| c.iter().map(f).collect::<Vec<_>>();
        Insert::new(
            "INSERT INTO cases (case_id, profile_id, journey_id, enrollment_id, priority, reason,
                 opened_at, open, resolution)",
            vec![
                Column::Text(t(|x| x.case_id.clone())),
                Column::Text(t(|x| x.profile_id.clone())),
                Column::Text(t(|x| x.journey_id.clone())),
                Column::Text(t(|x| x.enrollment_id.clone())),
                Column::Text(t(|x| x.priority.clone())),
                Column::Text(t(|x| x.reason.clone())),
                Column::Int8(c.iter().map(|x| x.opened_at).collect()),
            ],
        )
        .constant(1i16)
        .constant("")
        .execute(conn)
        .await?;
    }
    Ok(())
}

const ACTION_COLUMNS: &str = "action_id, enrollment_id, journey_id, node_id, profile_id, kind, target, \
     status, reason, attempts, created_at, due_at, sent_at, payload";

/// A stored action, read by column name.
#[derive(Debug, Clone, FromQueryResult)]
pub struct ActionRow {
    pub action_id: String,
    pub enrollment_id: String,
    pub journey_id: String,
    pub node_id: String,
    pub profile_id: String,
    pub kind: String,
    pub target: String,
    pub status: i16,
    pub reason: String,
    pub attempts: i32,
    pub created_at: i64,
    pub due_at: i64,
    pub sent_at: Option<i64>,
    pub payload: String,
}

impl ActionRow {
    pub fn kind(&self) -> Option<ActionKind> {
        ActionKind::parse(&self.kind)
    }

    pub fn payload(&self) -> Result<Json, DbErr> {
        serde_json::from_str(&self.payload).map_err(|e| corrupt("action payload", e))
    }
}

impl ActionRow {
    /// `action` as a row just written by [`write_actions`], claimed by its maker.
    pub fn claimed(action: &Action, now_us: i64) -> ActionRow {
        ActionRow {
            action_id: action.action_id.clone(),
            enrollment_id: action.enrollment_id.clone(),
            journey_id: action.journey_id.clone(),
            node_id: action.node_id.clone(),
            profile_id: action.profile_id.clone(),
            kind: action.kind.name().to_owned(),
            target: action.target.clone(),
            status: action.status as i16,
            reason: action.reason.clone(),
            attempts: 1,
            created_at: now_us,
            due_at: action.due_at,
            sent_at: None,
            payload: action.payload.to_string(),
        }
    }
}

/// Claims up to `limit` pending actions due at `now_us` for `lease_us`; another
/// dispatcher skips them until the lease ends.
pub async fn claim_actions<C: ConnectionTrait>(
    conn: &C,
    now_us: i64,
    lease_us: i64,
    limit: u64,
) -> Result<Vec<ActionRow>, DbErr> {
    let lock = super::skip_locked(conn);
    query_as(
        conn,
        &format!(
            "UPDATE actions SET lease_until = ?, attempts = attempts + 1
             WHERE action_id IN (
                 SELECT action_id FROM actions
                 WHERE status = 1 AND due_at <= ? AND lease_until < ?
                 ORDER BY due_at LIMIT ? {lock})
             RETURNING {ACTION_COLUMNS}"
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

/// When the next pending action is due, if any (a claimed one when its claim ends).
pub async fn next_action_due<C: ConnectionTrait>(conn: &C) -> Result<Option<i64>, DbErr> {
    super::next_due_in(conn, "actions", "due_at").await
}

/// Settles a claimed action: sent, failed for good, or due again at `retry_at`. Only a
/// pending action changes, so a settlement that comes after another replica's is a no-op;
/// returns whether this one counted.
pub async fn settle_action<C: ConnectionTrait>(
    conn: &C,
    action_id: &str,
    outcome: ActionStatus,
    reason: &str,
    retry_at: Option<i64>,
    now_us: i64,
) -> Result<bool, DbErr> {
    let n = match retry_at {
        Some(at) => {
            execute(
                conn,
                "UPDATE actions SET due_at = ?, lease_until = 0, reason = ?
                 WHERE action_id = ? AND status = 1",
                [at.into(), reason.into(), action_id.into()],
            )
            .await?
        }
        None => {
            execute(
                conn,
                "UPDATE actions SET status = ?, reason = ?, sent_at = ?, lease_until = 0
                 WHERE action_id = ? AND status = 1",
                [
                    (outcome as i16).into(),
                    reason.into(),
                    (outcome == ActionStatus::Sent).then_some(now_us).into(),
                    action_id.into(),
                ],
            )
            .await?
        }
    };
    Ok(n > 0)
}

/// How one attempt at a claimed action ended.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub action_id: String,
    /// Sent, Failed, or Pending with `retry_at`.
    pub status: ActionStatus,
    pub reason: String,
    pub retry_at: Option<i64>,
}

/// Settles claimed actions (see [`settle_action`]) in one statement on PostgreSQL;
/// returns the ids whose settlement counted (those still pending).
pub async fn settle_actions<C: ConnectionTrait>(
    conn: &C,
    settled: &[Settlement],
    now_us: i64,
) -> Result<Vec<String>, DbErr> {
    if settled.is_empty() {
        return Ok(Vec::new());
    }
    if conn.get_database_backend() != sea_orm::DbBackend::Postgres {
        let mut counted = Vec::new();
        for s in settled {
            if settle_action(conn, &s.action_id, s.status, &s.reason, s.retry_at, now_us).await? {
                counted.push(s.action_id.clone());
            }
        }
        return Ok(counted);
    }
    #[derive(FromQueryResult)]
    struct Row {
        action_id: String,
    }
    let values: Vec<Value> = vec![
        now_us.into(),
        settled
            .iter()
            .map(|s| s.action_id.clone())
            .collect::<Vec<_>>()
            .into(),
        settled
            .iter()
            .map(|s| s.status as i64)
            .collect::<Vec<_>>()
            .into(),
        settled
            .iter()
            .map(|s| s.reason.clone())
            .collect::<Vec<_>>()
            .into(),
        // No retry travels as i64::MIN: arrays of nullable integers do not bind.
        settled
            .iter()
            .map(|s| s.retry_at.unwrap_or(i64::MIN))
            .collect::<Vec<_>>()
            .into(),
    ];
    let rows: Vec<Row> = query_as(
        conn,
        "UPDATE actions AS a SET status = u.status, reason = u.reason, lease_until = 0,
             due_at = CASE WHEN u.retry_at = -9223372036854775808 THEN a.due_at ELSE u.retry_at END,
             sent_at = CASE WHEN u.status = 2 THEN ?::int8 ELSE a.sent_at END
         FROM UNNEST(?::text[], ?::int8[], ?::text[], ?::int8[]) AS u(id, status, reason, retry_at)
         WHERE a.action_id = u.id AND a.status = 1
         RETURNING a.action_id",
        values,
    )
    .await?;
    Ok(rows.into_iter().map(|r| r.action_id).collect())
}

/// Filters of [`list_actions`].
pub struct ActionFilter<'a> {
    pub journey_id: Option<&'a str>,
    pub profile_id: Option<&'a str>,
    pub enrollment_id: Option<&'a str>,
    pub status: Option<ActionStatus>,
    /// Newest first, strictly before this (created_at, id).
    pub before: Option<(i64, String)>,
    pub limit: u64,
}

/// Actions, newest first.
pub async fn list_actions<C: ConnectionTrait>(
    conn: &C,
    f: &ActionFilter<'_>,
) -> Result<Vec<ActionRow>, DbErr> {
    let mut clauses = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    for (column, value) in [
        ("journey_id", f.journey_id),
        ("profile_id", f.profile_id),
        ("enrollment_id", f.enrollment_id),
    ] {
        if let Some(v) = value {
            clauses.push(format!("{column} = ?"));
            values.push(v.into());
        }
    }
    if let Some(s) = f.status {
        clauses.push("status = ?".into());
        values.push((s as i16).into());
    }
    if let Some((at, id)) = &f.before {
        clauses.push("(created_at < ? OR (created_at = ? AND action_id < ?))".into());
        values.extend([(*at).into(), (*at).into(), id.clone().into()]);
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    values.push((f.limit as i64).into());
    query_as(
        conn,
        &format!(
            "SELECT {ACTION_COLUMNS} FROM actions {filter}
             ORDER BY created_at DESC, action_id DESC LIMIT ?"
        ),
        values,
    )
    .await
}

/// A stored case, read by column name.
#[derive(Debug, Clone, FromQueryResult)]
pub struct CaseRow {
    pub case_id: String,
    pub profile_id: String,
    pub journey_id: String,
    pub enrollment_id: String,
    pub priority: String,
    pub reason: String,
    pub open: i16,
    pub opened_at: i64,
    pub closed_at: Option<i64>,
    pub resolution: String,
}

const CASE_COLUMNS: &str = "case_id, profile_id, journey_id, enrollment_id, priority, reason, open, opened_at, closed_at, resolution";

/// Cases, newest first.
pub async fn list_cases<C: ConnectionTrait>(
    conn: &C,
    open_only: bool,
    profile_id: Option<&str>,
    before: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<CaseRow>, DbErr> {
    let mut clauses = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if open_only {
        clauses.push("open = 1".to_owned());
    }
    if let Some(p) = profile_id {
        clauses.push("profile_id = ?".into());
        values.push(p.into());
    }
    if let Some((at, id)) = before {
        clauses.push("(opened_at < ? OR (opened_at = ? AND case_id < ?))".into());
        values.extend([at.into(), at.into(), id.into()]);
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    values.push((limit as i64).into());
    query_as(
        conn,
        &format!("SELECT {CASE_COLUMNS} FROM cases {filter} ORDER BY opened_at DESC, case_id DESC LIMIT ?"),
        values,
    )
    .await
}

/// One case.
pub async fn case<C: ConnectionTrait>(conn: &C, case_id: &str) -> Result<Option<CaseRow>, DbErr> {
    query_one_as(
        conn,
        &format!("SELECT {CASE_COLUMNS} FROM cases WHERE case_id = ?"),
        [case_id.into()],
    )
    .await
}

/// Closes an open case; false when it was not open.
pub async fn close_case<C: ConnectionTrait>(
    conn: &C,
    case_id: &str,
    resolution: &str,
    now_us: i64,
) -> Result<bool, DbErr> {
    Ok(execute(
        conn,
        "UPDATE cases SET open = 0, closed_at = ?, resolution = ? WHERE case_id = ? AND open = 1",
        [now_us.into(), resolution.into(), case_id.into()],
    )
    .await?
        > 0)
}
