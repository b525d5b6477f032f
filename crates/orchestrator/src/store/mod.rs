//! The orchestrator's tables, on PostgreSQL or SQLite: journeys and their versions,
//! enrollments (whose `waiting_until` are the durable timers), steps, outbound actions,
//! contacts counted by caps, escalation cases, the contact policy, the ids of applied
//! events, and the outbox of step events to analytics.

mod actions;
mod journeys;
mod runs;

pub use actions::*;
pub use journeys::*;
pub use runs::*;

use sea_orm::DbErr;
use waymark_kit::db::Migration;

const SCHEMA: &str = "
    CREATE TABLE journeys (
        journey_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status SMALLINT NOT NULL,
        draft BYTEA NOT NULL,
        live_version INTEGER NOT NULL,
        draft_changed SMALLINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE journey_versions (
        journey_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        definition BYTEA NOT NULL,
        published_at BIGINT NOT NULL,
        in_flight SMALLINT NOT NULL,
        PRIMARY KEY (journey_id, version)
    );
    CREATE TABLE enrollments (
        enrollment_id TEXT PRIMARY KEY,
        journey_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        profile_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        entry_key TEXT NOT NULL,
        status SMALLINT NOT NULL,
        node_id TEXT NOT NULL,
        waiting SMALLINT NOT NULL,
        waiting_action TEXT NOT NULL,
        waiting_until BIGINT,
        lease_until BIGINT NOT NULL,
        entered_at BIGINT NOT NULL,
        ended_at BIGINT,
        reason TEXT NOT NULL,
        context TEXT NOT NULL,
        seq BIGINT NOT NULL
    );
    CREATE INDEX enrollments_profile ON enrollments (profile_id, journey_id);
    CREATE INDEX enrollments_journey ON enrollments (journey_id, entered_at);
    CREATE INDEX enrollments_due ON enrollments (waiting_until) WHERE status = 1;
    CREATE TABLE steps (
        enrollment_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        steps TEXT NOT NULL,
        PRIMARY KEY (enrollment_id, seq)
    );
    CREATE TABLE actions (
        action_id TEXT PRIMARY KEY,
        enrollment_id TEXT NOT NULL,
        journey_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        status SMALLINT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at BIGINT NOT NULL,
        due_at BIGINT NOT NULL,
        sent_at BIGINT,
        lease_until BIGINT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX actions_due ON actions (due_at) WHERE status = 1;
    CREATE INDEX actions_enrollment ON actions (enrollment_id);
    CREATE INDEX actions_profile ON actions (profile_id, created_at);
    CREATE INDEX actions_journey ON actions (journey_id, created_at);
    CREATE INDEX actions_created ON actions (created_at);
    CREATE TABLE contacts (
        action_id TEXT PRIMARY KEY,
        profile_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX contacts_profile ON contacts (profile_id, at);
    CREATE TABLE cases (
        case_id TEXT PRIMARY KEY,
        profile_id TEXT NOT NULL,
        journey_id TEXT NOT NULL,
        enrollment_id TEXT NOT NULL,
        priority TEXT NOT NULL,
        reason TEXT NOT NULL,
        open SMALLINT NOT NULL,
        opened_at BIGINT NOT NULL,
        closed_at BIGINT,
        resolution TEXT NOT NULL
    );
    CREATE INDEX cases_profile ON cases (profile_id, open);
    CREATE INDEX cases_opened ON cases (opened_at);
    CREATE TABLE contact_policy (
        id SMALLINT PRIMARY KEY,
        policy BYTEA NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE applied_events (
        event_id TEXT PRIMARY KEY,
        applied_at BIGINT NOT NULL
    );
    CREATE INDEX applied_events_at ON applied_events (applied_at);
";

/// Every schema change of the orchestrator, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "journeys, enrollments, steps, actions, contacts, cases, policy",
        postgres: SCHEMA,
        sqlite: SCHEMA,
    },
    waymark_kit::outbox::migration(2),
    waymark_kit::outbox::keyed_by_consumer(3),
    waymark_kit::outbox::packs(4),
    waymark_kit::outbox::dead_letters::migration(5),
    waymark_kit::outbox::trace_links(6),
];

/// A stored value that does not decode: the database holds what this code never wrote.
fn corrupt(what: &str, e: impl std::fmt::Display) -> DbErr {
    DbErr::Custom(format!("stored {what} does not decode: {e}"))
}

/// What a claim adds to its inner `SELECT` so that replicas claim different rows at once
/// (SQLite has one writer, so nothing).
fn skip_locked<C: sea_orm::ConnectionTrait>(conn: &C) -> &'static str {
    if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
        "FOR UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

/// The earliest of `due` among `table`'s pending rows (`status = 1`), a claimed row
/// counting when its claim ends: when a claim loop next has work.
async fn next_due_in<C: sea_orm::ConnectionTrait>(
    conn: &C,
    table: &str,
    due: &str,
) -> Result<Option<i64>, DbErr> {
    #[derive(sea_orm::FromQueryResult)]
    struct Row {
        due: Option<i64>,
    }
    Ok(waymark_kit::sql::query_one_as::<Row, _>(
        conn,
        &format!(
            "SELECT MIN(CASE WHEN lease_until > {due} THEN lease_until ELSE {due} END) AS due
             FROM {table} WHERE status = 1"
        ),
        [],
    )
    .await?
    .and_then(|r| r.due))
}

/// A page token: the sort key of the last row returned.
pub fn page_token(at: i64, id: &str) -> String {
    format!("{at}:{id}")
}

/// The sort key a page token names; `None` for the first page or a token that is not
/// ours.
pub fn parse_page_token(token: &str) -> Option<(i64, String)> {
    let (at, id) = token.split_once(':')?;
    Some((at.parse().ok()?, id.to_owned()))
}
