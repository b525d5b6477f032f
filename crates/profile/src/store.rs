//! The profile service's tables. A profile's state is its encoded `Profile` (one row read
//! serves GetProfile); `identities` is the index resolution queries; `timeline` holds every
//! applied event, and its primary key is what makes delivery idempotent; `merges` is the
//! audit log.

use std::collections::HashSet;

use prost::Message;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, QueryResult, Statement, Value,
};
use waymark_kit::db::{Migration, sql};
use waymark_kit::time::from_micros;
use waymark_proto::common::v1::{Event, Identity};
use waymark_proto::profile::v1::{Merge, Profile, TimelineEntry};

use crate::aggregate::AggregateState;
use crate::emotion::EmotionRules;
use crate::identity::Ident;
use crate::model::{address, timeline_entry, timeline_name};
use crate::resolve::{Record, WorkingSet, entry_time_us};

mod aggregates;
mod privacy;
mod segments;
mod unmerge;

pub use aggregates::*;
pub use privacy::*;
pub use segments::*;
pub use unmerge::*;

const SCHEMA: &str = "
    CREATE TABLE profiles (
        profile_id TEXT PRIMARY KEY,
        merged_into TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        version BIGINT NOT NULL,
        state BYTEA NOT NULL
    );
    CREATE TABLE identities (
        id_type TEXT NOT NULL,
        id_value TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        PRIMARY KEY (id_type, id_value)
    );
    CREATE INDEX identities_profile ON identities (profile_id);
    CREATE TABLE timeline (
        event_id TEXT PRIMARY KEY,
        profile_id TEXT NOT NULL,
        ts BIGINT NOT NULL,
        channel SMALLINT NOT NULL,
        event_type SMALLINT NOT NULL,
        name TEXT NOT NULL,
        entry BYTEA NOT NULL
    );
    CREATE INDEX timeline_profile_ts ON timeline (profile_id, ts);
    CREATE TABLE applied_events (
        event_id TEXT PRIMARY KEY,
        applied_at BIGINT NOT NULL
    );
    CREATE TABLE merges (
        merge_id TEXT PRIMARY KEY,
        survivor_id TEXT NOT NULL,
        merged_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        evidence TEXT NOT NULL,
        merged_at BIGINT NOT NULL
    );
    CREATE INDEX merges_survivor ON merges (survivor_id);";

/// Schema of the profile service, in order. The same DDL serves both backends: SQLite
/// accepts BYTEA as a type name and stores blobs in such columns unchanged.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "profiles, identities, timeline, merges",
        postgres: SCHEMA,
        sqlite: SCHEMA,
    },
    waymark_kit::outbox::migration(2),
    Migration {
        version: 3,
        name: "timeline keeps each event whole, with the profile it was first applied to",
        postgres: TIMELINE_EVENTS,
        sqlite: TIMELINE_EVENTS,
    },
    Migration {
        version: 4,
        name: "suppressions, segments, unmerge audit",
        postgres: PRIVACY_AND_SEGMENTS,
        sqlite: PRIVACY_AND_SEGMENTS,
    },
    Migration {
        version: 5,
        name: "aggregate state beside each profile",
        postgres: "ALTER TABLE profiles ADD COLUMN aggregates BYTEA",
        sqlite: "ALTER TABLE profiles ADD COLUMN aggregates BYTEA",
    },
    Migration {
        version: 6,
        name: "idempotency from the timeline's key",
        // Every applied event has its timeline row; an erased profile's rows go, but its
        // identifiers are suppressed, so its events are dropped before this check matters.
        // Also room on each profiles page: every batch rewrites the profiles it touches,
        // and an update that fits beside the old version is HOT (no new index entry).
        postgres: "DROP TABLE applied_events; ALTER TABLE profiles SET (fillfactor = 70);",
        sqlite: "DROP TABLE applied_events",
    },
    Migration {
        version: 7,
        name: "applier counter",
        postgres: APPLIER_EPOCH,
        sqlite: APPLIER_EPOCH,
    },
    Migration {
        version: 8,
        name: "when decay next moves each profile's emotion label",
        postgres: EMOTION_DUE,
        sqlite: EMOTION_DUE,
    },
    Migration {
        version: 9,
        name: "generations of the segment definitions and the suppression list",
        postgres: GENERATIONS,
        sqlite: GENERATIONS,
    },
    waymark_kit::outbox::keyed_by_consumer(10),
    waymark_kit::outbox::packs(11),
    Migration {
        version: 12,
        name: "suppressions stored as keyed hashes",
        // Existing rows are clear; the service hashes them at start-up
        // (`hash_clear_suppressions`), since neither backend has HMAC built in.
        postgres: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
        sqlite: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
    },
    Migration {
        version: 13,
        name: "erased profiles whose cache tombstone has not reached Redis yet",
        postgres: PENDING_TOMBSTONES,
        sqlite: PENDING_TOMBSTONES,
    },
    waymark_kit::outbox::dead_letters::migration(14),
    waymark_kit::outbox::trace_links(15),
    Migration {
        version: 16,
        name: "profiles an Unmerge keeps apart",
        postgres: DO_NOT_MERGE,
        sqlite: DO_NOT_MERGE,
    },
    Migration {
        version: 17,
        name: "what each aggregate was last computed for, and its backfill",
        postgres: aggregates::AGGREGATE_SPECS,
        sqlite: aggregates::AGGREGATE_SPECS,
    },
];

/// One row per undone merge: the two profiles as the Unmerge left them, and the live
/// profiles holding each now (a side merged into a third profile later passes the pair on
/// to it), which is what resolution checks, from either side.
const DO_NOT_MERGE: &str = "
    CREATE TABLE do_not_merge (
        merge_id TEXT PRIMARY KEY,
        survivor_id TEXT NOT NULL,
        restored_id TEXT NOT NULL,
        live_survivor TEXT NOT NULL,
        live_restored TEXT NOT NULL,
        evidence TEXT NOT NULL,
        unmerged_at BIGINT NOT NULL
    );
    CREATE INDEX do_not_merge_survivor ON do_not_merge (live_survivor);
    CREATE INDEX do_not_merge_restored ON do_not_merge (live_restored);";

const PENDING_TOMBSTONES: &str = "
    CREATE TABLE pending_tombstones (
        profile_id TEXT PRIMARY KEY,
        erased_at BIGINT NOT NULL
    );";

/// Every replica learns of a changed segment or a new erasure at its next applier lock,
/// at no extra cost, and keeps both in memory in between.
const GENERATIONS: &str = "
    ALTER TABLE applier_epoch ADD COLUMN definitions BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE applier_epoch ADD COLUMN suppressions BIGINT NOT NULL DEFAULT 0;";

/// Only profiles whose emotion is still fading have a due time, so the index stays small
/// and rewrites of the others remain HOT updates.
/// Profiles from before are due at once: the first settling pass works out each one's
/// time (and leaves none to those without an emotion).
const EMOTION_DUE: &str = "
    ALTER TABLE profiles ADD COLUMN emotion_due_at BIGINT;
    CREATE INDEX profiles_emotion_due ON profiles (emotion_due_at)
        WHERE emotion_due_at IS NOT NULL;
    UPDATE profiles SET emotion_due_at = 0 WHERE merged_into IS NULL;";

/// One row every applier transaction advances; its row lock serialises appliers.
const APPLIER_EPOCH: &str = "
    CREATE TABLE applier_epoch (id SMALLINT PRIMARY KEY, epoch BIGINT NOT NULL);
    INSERT INTO applier_epoch (id, epoch) VALUES (1, 0);";

const TIMELINE_EVENTS: &str = "
    ALTER TABLE timeline ADD COLUMN origin_profile_id TEXT;
    ALTER TABLE timeline ADD COLUMN event BYTEA;
    CREATE INDEX timeline_moved ON timeline (origin_profile_id)
        WHERE origin_profile_id <> profile_id;";

const PRIVACY_AND_SEGMENTS: &str = "
    CREATE TABLE suppressions (
        id_type TEXT NOT NULL,
        id_value TEXT NOT NULL,
        suppressed_at BIGINT NOT NULL,
        synced_at BIGINT,
        PRIMARY KEY (id_type, id_value)
    );
    CREATE INDEX suppressions_time ON suppressions (suppressed_at);
    CREATE TABLE segments (
        segment_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        condition TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        generation BIGINT NOT NULL,
        backfilled_generation BIGINT NOT NULL
    );
    CREATE TABLE segment_members (
        segment_id TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        entered_at BIGINT NOT NULL,
        PRIMARY KEY (segment_id, profile_id)
    );
    CREATE INDEX segment_members_profile ON segment_members (profile_id);
    ALTER TABLE merges ADD COLUMN unmerged_at BIGINT;";

/// Bound parameters per statement stay well under both backends' limits.
pub(crate) const MAX_PARAMS: usize = 30_000;

/// Runs `INSERT ... VALUES (...), (...) <suffix>` for `rows` in chunks; returns the rows
/// written.
pub(crate) async fn insert_rows(
    txn: &DatabaseTransaction,
    head: &str,
    suffix: &str,
    rows: Vec<Vec<Value>>,
) -> Result<u64, DbErr> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    let backend = txn.get_database_backend();
    let placeholders = format!("({})", vec!["?"; width].join(", "));
    let mut written = 0;
    for chunk in rows.chunks((MAX_PARAMS / width).max(1)) {
        let text = format!(
            "{head} VALUES {} {suffix}",
            vec![placeholders.as_str(); chunk.len()].join(", ")
        );
        let values: Vec<Value> = chunk.iter().flatten().cloned().collect();
        written += txn
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql(backend, &text),
                values,
            ))
            .await?
            .rows_affected();
    }
    Ok(written)
}

/// Runs a query written with `?` placeholders on either backend.
pub(crate) async fn query<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    conn.query_all_raw(Statement::from_sql_and_values(
        backend,
        sql(backend, text),
        values,
    ))
    .await
}

/// The first row of a query written with `?` placeholders.
pub(crate) async fn query_one<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Option<QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    conn.query_one_raw(Statement::from_sql_and_values(
        backend,
        sql(backend, text),
        values,
    ))
    .await
}

/// Runs a statement written with `?` placeholders; returns the rows it affected.
pub(crate) async fn execute<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, text),
            values,
        ))
        .await?;
    Ok(result.rows_affected())
}

/// `(?, ?), (?, ?), ...` for `idents`, and their values in order.
pub(crate) fn ident_pairs(idents: &[Ident]) -> (String, Vec<Value>) {
    let placeholders = vec!["(?, ?)"; idents.len()].join(", ");
    let values = idents
        .iter()
        .flat_map(|(t, v)| [t.as_str().into(), v.as_str().into()])
        .collect();
    (placeholders, values)
}

/// One column of a bulk insert.
pub(crate) enum Column {
    Text(Vec<String>),
    /// Text that may be NULL.
    NullableText(Vec<Option<String>>),
    Int8(Vec<i64>),
    /// BIGINT that may be NULL.
    NullableInt8(Vec<Option<i64>>),
    Int2(Vec<i16>),
    Bytea(Vec<Vec<u8>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::NullableText(v) => v.len(),
            Column::Int8(v) => v.len(),
            Column::NullableInt8(v) => v.len(),
            Column::Int2(v) => v.len(),
            Column::Bytea(v) => v.len(),
        }
    }

    fn value_at(&self, row: usize) -> Value {
        match self {
            Column::Text(v) => v[row].as_str().into(),
            Column::NullableText(v) => v[row].clone().into(),
            Column::Int8(v) => v[row].into(),
            Column::NullableInt8(v) => v[row].into(),
            Column::Int2(v) => v[row].into(),
            Column::Bytea(v) => v[row].clone().into(),
        }
    }

    /// The PostgreSQL array parameter and how to select one element of it.
    fn into_array(self, name: &str) -> (Value, &'static str, String) {
        match self {
            Column::Text(v) => (v.into(), "text[]", name.to_owned()),
            // PostgreSQL arrays of nullable text do not bind here; the empty string, never
            // a real id, stands for NULL.
            Column::NullableText(v) => (
                v.into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<String>>()
                    .into(),
                "text[]",
                format!("NULLIF({name}, '')"),
            ),
            Column::Int8(v) => (v.into(), "int8[]", name.to_owned()),
            // As for text: i64::MIN, never a time here, stands for NULL.
            Column::NullableInt8(v) => (
                v.into_iter()
                    .map(|x| x.unwrap_or(i64::MIN))
                    .collect::<Vec<i64>>()
                    .into(),
                "int8[]",
                format!("NULLIF({name}, {})", i64::MIN),
            ),
            Column::Int2(v) => (v.into(), "int2[]", name.to_owned()),
            Column::Bytea(v) => (v.into(), "bytea[]", name.to_owned()),
        }
    }
}

/// `{head} <rows> {suffix}` with the rows given column by column. PostgreSQL gets each
/// column as one array parameter (`SELECT ... FROM UNNEST(...)`): one short statement
/// however many rows, where a `VALUES` list costs a parse and plan per size. SQLite gets
/// multi-row `VALUES`. Returns the rows written.
pub(crate) async fn insert_columns(
    txn: &DatabaseTransaction,
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
) -> Result<u64, DbErr> {
    let rows = columns.first().map_or(0, Column::len);
    if rows == 0 {
        return Ok(0);
    }
    let backend = txn.get_database_backend();
    if backend != DbBackend::Postgres {
        let rows = (0..rows)
            .map(|row| columns.iter().map(|c| c.value_at(row)).collect())
            .collect();
        return insert_rows(txn, head, suffix, rows).await;
    }
    let (text, values) = unnest_insert(head, suffix, columns, 1);
    Ok(txn
        .execute_raw(Statement::from_sql_and_values(backend, text, values))
        .await?
        .rows_affected())
}

/// The PostgreSQL statement of [`insert_columns`], its parameters numbered from `$first`,
/// so it can also be one part of a larger statement.
fn unnest_insert(
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
    first: usize,
) -> (String, Vec<Value>) {
    let (mut values, mut arrays, mut selected) = (Vec::new(), Vec::new(), Vec::new());
    for (i, column) in columns.into_iter().enumerate() {
        let name = format!("c{i}");
        let (value, array_type, select) = column.into_array(&name);
        values.push(value);
        arrays.push(format!("${}::{array_type}", first + i));
        selected.push(select);
    }
    let names: Vec<String> = (0..arrays.len()).map(|i| format!("c{i}")).collect();
    let text = format!(
        "{head} SELECT {} FROM UNNEST({}) AS u({}) {suffix}",
        selected.join(", "),
        arrays.join(", "),
        names.join(", ")
    );
    (text, values)
}

/// What taking the applier lock tells the taker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplierLock {
    /// The counter this transaction advanced: whether anyone else wrote since the
    /// applier's own last commit.
    pub epoch: i64,
    /// The generation of the segment definitions: whether any replica changed them since
    /// this one loaded its own.
    pub definitions: i64,
    /// The generation of the suppression list, likewise.
    pub suppressions: i64,
}

/// Serialises appliers across replicas (the counter's row stays locked until the
/// transaction ends; SQLite has one writer anyway). Also returns which of `event_ids`
/// were applied before, asked only once the lock is held: a statement that waited for
/// the lock still reads with the snapshot it started with, which would miss what the
/// transaction it waited for committed.
pub async fn lock_applier(
    txn: &DatabaseTransaction,
    event_ids: &[String],
) -> Result<(ApplierLock, HashSet<String>), DbErr> {
    let text = if txn.get_database_backend() == DbBackend::Postgres {
        // Releases before schema 7 serialised on this advisory lock alone; taking it too
        // keeps them out while both run during a rolling upgrade.
        "WITH legacy AS (SELECT pg_advisory_xact_lock(7263542002))
         UPDATE applier_epoch SET epoch = epoch + 1 FROM legacy WHERE id = 1
         RETURNING epoch, definitions, suppressions"
    } else {
        "UPDATE applier_epoch SET epoch = epoch + 1 WHERE id = 1
         RETURNING epoch, definitions, suppressions"
    };
    let row = query_one(txn, text, [])
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the applier counter row is missing".into()))?;
    let lock = ApplierLock {
        epoch: row.try_get_by_index(0)?,
        definitions: row.try_get_by_index(1)?,
        suppressions: row.try_get_by_index(2)?,
    };
    let applied = if event_ids.is_empty() {
        HashSet::new()
    } else {
        already_applied(txn, event_ids).await?
    };
    Ok((lock, applied))
}

/// Records that segment definitions changed, in the transaction that changes them.
pub async fn bump_definitions(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    execute(
        txn,
        "UPDATE applier_epoch SET definitions = definitions + 1 WHERE id = 1",
        [],
    )
    .await?;
    Ok(())
}

/// Records that the suppression list grew, in the transaction that adds to it.
pub async fn bump_suppressions(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    execute(
        txn,
        "UPDATE applier_epoch SET suppressions = suppressions + 1 WHERE id = 1",
        [],
    )
    .await?;
    Ok(())
}

/// The generation of the segment definitions.
pub async fn definitions_generation<C: ConnectionTrait>(conn: &C) -> Result<i64, DbErr> {
    query_one(
        conn,
        "SELECT definitions FROM applier_epoch WHERE id = 1",
        [],
    )
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("the applier counter row is missing".into()))?
    .try_get_by_index(0)
}

pub(crate) fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The event ids of `ids` applied before: they are in the timeline.
async fn already_applied<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<HashSet<String>, DbErr> {
    if conn.get_database_backend() == DbBackend::Postgres {
        let rows = query(
            conn,
            "SELECT event_id FROM timeline WHERE event_id = ANY(?::text[])",
            [ids.to_vec().into()],
        )
        .await?;
        return rows.iter().map(|row| row.try_get_by_index(0)).collect();
    }
    let mut found = HashSet::new();
    for chunk in ids.chunks(MAX_PARAMS) {
        let text = format!(
            "SELECT event_id FROM timeline WHERE event_id IN ({})",
            in_list(chunk.len())
        );
        let values = chunk.iter().map(|s| Value::from(s.as_str()));
        for row in query(conn, &text, values).await? {
            found.insert(row.try_get_by_index(0)?);
        }
    }
    Ok(found)
}

/// `idents` as two PostgreSQL array parameters (types, values), for joining with
/// `UNNEST(?::text[], ?::text[]) AS k(t, v)`.
pub(crate) fn ident_arrays(idents: &[Ident]) -> [Value; 2] {
    let (types, values): (Vec<String>, Vec<String>) = idents.iter().cloned().unzip();
    [types.into(), values.into()]
}

/// Columns [`record_from`] reads, in order.
pub(crate) const RECORD_COLUMNS: &str = "profile_id, merged_into, created_at, state, aggregates";

pub(crate) fn record_from(row: &QueryResult) -> Result<Record, DbErr> {
    let bytes: Vec<u8> = row.try_get_by_index(3)?;
    let profile = Profile::decode(bytes.as_slice())
        .map_err(|e| DbErr::Custom(format!("stored profile does not decode: {e}")))?;
    let aggregates: Option<Vec<u8>> = row.try_get_by_index(4)?;
    let aggregates = AggregateState::decode(aggregates.as_deref().unwrap_or_default())
        .map_err(|e| DbErr::Custom(format!("stored aggregates do not decode: {e}")))?;
    Ok(Record {
        profile,
        created_us: row.try_get_by_index(2)?,
        merged_into: row.try_get_by_index(1)?,
        aggregates,
    })
}

/// The live profiles owning any of `idents`, with the pairs of live profiles an Unmerge
/// keeps apart that name any of them (each pair once per side loaded).
pub async fn load_owners<C: ConnectionTrait>(
    conn: &C,
    idents: &[Ident],
) -> Result<(Vec<Record>, Vec<(String, String)>), DbErr> {
    if idents.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if conn.get_database_backend() == DbBackend::Postgres {
        let rows = query(
            conn,
            &format!(
                // An array rather than `IN (subquery)`: the planner then probes the
                // primary key per owner instead of hashing the whole profiles table. The
                // pairs come in the same statement, an index probe per side and profile,
                // so the applier pays no round trip for them.
                "SELECT {RECORD_COLUMNS}, ARRAY(
                     SELECT d.live_restored FROM do_not_merge d
                     WHERE d.live_survivor = p.profile_id
                     UNION ALL SELECT d.live_survivor FROM do_not_merge d
                     WHERE d.live_restored = p.profile_id)
                 FROM profiles p WHERE profile_id = ANY(ARRAY(
                     SELECT i.profile_id FROM identities i
                     JOIN UNNEST(?::text[], ?::text[]) AS k(t, v)
                       ON i.id_type = k.t AND i.id_value = k.v))"
            ),
            ident_arrays(idents),
        )
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        let mut apart = Vec::new();
        for row in &rows {
            let record = record_from(row)?;
            let others: Vec<String> = row.try_get_by_index(5)?;
            let id = &record.profile.profile_id;
            apart.extend(others.into_iter().map(|other| (id.clone(), other)));
            records.push(record);
        }
        return Ok((records, apart));
    }
    let mut owners: HashSet<String> = HashSet::new();
    for chunk in idents.chunks(MAX_PARAMS / 2) {
        let (pairs, values) = ident_pairs(chunk);
        let text = format!(
            "SELECT DISTINCT profile_id FROM identities WHERE (id_type, id_value) IN ({pairs})"
        );
        for row in query(conn, &text, values).await? {
            owners.insert(row.try_get_by_index(0)?);
        }
    }
    let ids: Vec<String> = owners.into_iter().collect();
    let records = load_records(conn, &ids).await?;
    Ok((records, kept_apart(conn, &ids).await?))
}

/// The pairs of live profiles kept apart that name any of `ids`.
async fn kept_apart<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<Vec<(String, String)>, DbErr> {
    let mut apart = Vec::new();
    for chunk in ids.chunks(MAX_PARAMS / 2) {
        let list = in_list(chunk.len());
        let values: Vec<Value> = chunk.iter().map(|s| s.as_str().into()).collect();
        let text = format!(
            "SELECT live_survivor, live_restored FROM do_not_merge
             WHERE live_survivor IN ({list}) OR live_restored IN ({list})"
        );
        for row in query(conn, &text, values.iter().chain(&values).cloned()).await? {
            let pair: (String, String) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
            apart.push(pair);
        }
    }
    Ok(apart)
}

/// Profiles by id (live or merged).
pub async fn load_records<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<Vec<Record>, DbErr> {
    let backend = conn.get_database_backend();
    let mut records = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_PARAMS) {
        let text = format!(
            "SELECT {RECORD_COLUMNS} FROM profiles WHERE profile_id IN ({})",
            in_list(chunk.len())
        );
        let values: Vec<Value> = chunk.iter().map(|s| s.as_str().into()).collect();
        for row in conn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql(backend, &text),
                values,
            ))
            .await?
        {
            records.push(record_from(&row)?);
        }
    }
    Ok(records)
}

/// The live profile for `id`, following merges.
pub async fn load_live<C: ConnectionTrait>(conn: &C, id: &str) -> Result<Option<Record>, DbErr> {
    let mut current = id.to_owned();
    for _ in 0..64 {
        let Some(record) = load_records(conn, std::slice::from_ref(&current))
            .await?
            .pop()
        else {
            return Ok(None);
        };
        match &record.merged_into {
            Some(next) => current = next.clone(),
            None => return Ok(Some(record)),
        }
    }
    Ok(None)
}

/// The profile owning an identifier.
pub async fn owner_of<C: ConnectionTrait>(
    conn: &C,
    id_type: &str,
    value: &str,
) -> Result<Option<String>, DbErr> {
    let backend = conn.get_database_backend();
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql(
                backend,
                "SELECT profile_id FROM identities WHERE id_type = ? AND id_value = ?",
            ),
            [id_type.into(), value.into()],
        ))
        .await?;
    row.map(|r| r.try_get_by_index(0)).transpose()
}

/// Deletes the rows of identifiers their profiles gave up: they resolve to no profile.
pub(crate) async fn delete_identities<C: ConnectionTrait>(
    conn: &C,
    idents: &[Ident],
) -> Result<(), DbErr> {
    if idents.is_empty() {
        return Ok(());
    }
    if conn.get_database_backend() == DbBackend::Postgres {
        execute(
            conn,
            "DELETE FROM identities i USING UNNEST(?::text[], ?::text[]) AS k(t, v)
             WHERE i.id_type = k.t AND i.id_value = k.v",
            ident_arrays(idents),
        )
        .await?;
        return Ok(());
    }
    for chunk in idents.chunks(MAX_PARAMS / 2) {
        let (pairs, values) = ident_pairs(chunk);
        execute(
            conn,
            &format!("DELETE FROM identities WHERE (id_type, id_value) IN ({pairs})"),
            values,
        )
        .await?;
    }
    Ok(())
}

/// Writes profiles (upsert) from records, with when decay next moves each one's emotion
/// label under `emotion` (merged-away profiles have none).
pub async fn save_records(
    txn: &DatabaseTransaction,
    records: &[&Record],
    emotion: &EmotionRules,
    now_us: i64,
) -> Result<(), DbErr> {
    let states = records.iter().map(|r| r.profile.encode_to_vec()).collect();
    save_encoded(txn, records, states, emotion, now_us).await
}

/// [`save_records`] with each profile already encoded (`states`, in the same order).
pub async fn save_encoded(
    txn: &DatabaseTransaction,
    records: &[&Record],
    states: Vec<Vec<u8>>,
    emotion: &EmotionRules,
    now_us: i64,
) -> Result<(), DbErr> {
    let columns = profile_columns(records, states, emotion, now_us);
    insert_columns(txn, PROFILES_HEAD, PROFILES_SUFFIX, columns).await?;
    Ok(())
}

const PROFILES_HEAD: &str = "INSERT INTO profiles (profile_id, merged_into, created_at, updated_at, version, state, aggregates, emotion_due_at)";
const PROFILES_SUFFIX: &str = "ON CONFLICT (profile_id) DO UPDATE SET merged_into = excluded.merged_into, created_at = excluded.created_at,
     updated_at = excluded.updated_at, version = excluded.version, state = excluded.state,
     aggregates = excluded.aggregates, emotion_due_at = excluded.emotion_due_at";

/// The rows of `records` (with their encoded `states`), with when decay next moves each
/// one's emotion label under `emotion` (merged-away profiles have none).
fn profile_columns(
    records: &[&Record],
    states: Vec<Vec<u8>>,
    emotion: &EmotionRules,
    now_us: i64,
) -> Vec<Column> {
    let emotion_due = records
        .iter()
        .map(|r| match (&r.merged_into, &r.profile.emotion) {
            (None, Some(e)) => crate::emotion::next_change_at(e, emotion),
            _ => None,
        })
        .collect();
    vec![
        Column::Text(
            records
                .iter()
                .map(|r| r.profile.profile_id.clone())
                .collect(),
        ),
        Column::NullableText(records.iter().map(|r| r.merged_into.clone()).collect()),
        Column::Int8(records.iter().map(|r| r.created_us).collect()),
        Column::Int8(vec![now_us; records.len()]),
        Column::Int8(records.iter().map(|r| r.profile.version as i64).collect()),
        Column::Bytea(states),
        Column::Bytea(
            records
                .iter()
                .map(|r| r.aggregates.encode_to_vec())
                .collect(),
        ),
        Column::NullableInt8(emotion_due),
    ]
}

/// Everything a batch writes, computed ahead of its transaction: it can be built while
/// the previous batch's transaction runs.
pub struct BatchWrite {
    profiles: Vec<Column>,
    identities: Vec<Column>,
    /// Identifiers given up, whose rows go.
    evicted: Vec<Ident>,
    /// (survivor, merged) pairs: the merged profile's timeline moves to the survivor.
    moved: Vec<(String, String)>,
    merges: Vec<Vec<Value>>,
    /// (merged, survivor) of the merges whose merged profile was kept apart from others:
    /// its pairs pass to the survivor.
    apart_moved: Vec<(String, String)>,
    timeline: Vec<Column>,
    /// Every event the batch emits, encoded.
    outbox: Vec<Vec<u8>>,
}

impl BatchWrite {
    /// What `set` changed; `dirty` holds its changed profiles, each with its encoded state.
    pub fn new(
        set: &WorkingSet,
        dirty: &[(&Record, Vec<u8>)],
        emotion: &EmotionRules,
        now_us: i64,
    ) -> Self {
        let records: Vec<&Record> = dirty.iter().map(|(record, _)| *record).collect();
        let states = dirty.iter().map(|(_, state)| state.clone()).collect();
        let identities = &set.dirty_identities;
        let merges = set
            .merges
            .iter()
            .map(|m| {
                let evidence: Vec<serde_json::Value> = m
                    .evidence
                    .iter()
                    .map(|i| serde_json::json!({"type": i.r#type, "value": i.value}))
                    .collect();
                vec![
                    m.merge_id.as_str().into(),
                    m.survivor_id.as_str().into(),
                    m.merged_id.as_str().into(),
                    m.event_id.as_str().into(),
                    serde_json::Value::Array(evidence).to_string().into(),
                    m.at_us.into(),
                ]
            })
            .collect();
        // Each applied event is encoded once: the timeline's copy is also what goes
        // downstream, unless a later merge in the batch moved it to another profile.
        let encoded: Vec<Vec<u8>> = set.applied.iter().map(|(e, _)| e.encode_to_vec()).collect();
        let timeline: Vec<TimelineRow<'_>> = set
            .applied
            .iter()
            .zip(&encoded)
            .map(|((event, owner), bytes)| TimelineRow {
                event,
                owner: set.live(owner).to_owned(),
                origin: owner,
                encoded: bytes,
            })
            .collect();
        // Downstream copies are addressed to the live profile, with its user id.
        let addressed = |event: &Event, owner: &str| -> Option<Vec<u8>> {
            let live = set.live(owner);
            let profile = &set.records.get(live)?.profile;
            let mut event = event.clone();
            address(&mut event, live, profile).then(|| event.encode_to_vec())
        };
        let outbox = timeline
            .iter()
            .map(|row| addressed(row.event, row.origin).unwrap_or_else(|| row.encoded.to_vec()))
            .chain(set.synthetic.iter().map(|(event, owner)| {
                addressed(event, owner).unwrap_or_else(|| event.encode_to_vec())
            }))
            .chain(set.merged_away_exits.iter().map(|event| {
                // About the merged profile itself, so it keeps that id; the user id is the
                // one customer's, now held by the survivor.
                let mut copy = event.clone();
                if let Some(survivor) = set.records.get(set.live(&event.profile_id)) {
                    address(&mut copy, &event.profile_id, &survivor.profile);
                }
                copy.encode_to_vec()
            }))
            .collect();
        Self {
            profiles: profile_columns(&records, states, emotion, now_us),
            evicted: set.evicted.iter().cloned().collect(),
            identities: vec![
                Column::Text(identities.keys().map(|(t, _)| t.clone()).collect()),
                Column::Text(identities.keys().map(|(_, v)| v.clone()).collect()),
                Column::Text(
                    identities
                        .values()
                        .map(|owner| set.live(owner).to_owned())
                        .collect(),
                ),
            ],
            moved: set
                .merges
                .iter()
                .map(|m| (set.live(&m.survivor_id).to_owned(), m.merged_id.clone()))
                .collect(),
            merges,
            apart_moved: set
                .apart_moved
                .iter()
                .map(|(merged, survivor)| (merged.clone(), set.live(survivor).to_owned()))
                .collect(),
            timeline: timeline_columns(&timeline),
            outbox,
        }
    }

    /// Writes it, then queues the emitted events for `consumers`. Returns how many of
    /// its events the timeline took: fewer than it applied when some were there before.
    pub async fn execute(
        self,
        txn: &DatabaseTransaction,
        consumers: &[String],
    ) -> Result<u64, DbErr> {
        // Disjoint from the identifiers the batch writes: one given up and used again in
        // the same batch is no longer listed as given up.
        delete_identities(txn, &self.evicted).await?;
        move_timelines(txn, self.moved).await?;
        insert_rows(
            txn,
            "INSERT INTO merges (merge_id, survivor_id, merged_id, event_id, evidence, merged_at)",
            "",
            self.merges,
        )
        .await?;
        for (merged, survivor) in &self.apart_moved {
            pass_kept_apart(txn, merged, survivor).await?;
        }
        let refs: Vec<&[u8]> = self.outbox.iter().map(Vec::as_slice).collect();
        if txn.get_database_backend() == DbBackend::Postgres {
            return write_in_one_statement(
                txn,
                [
                    (PROFILES_HEAD, PROFILES_SUFFIX, self.profiles),
                    (IDENTITIES_HEAD, IDENTITIES_SUFFIX, self.identities),
                ],
                self.timeline,
                waymark_kit::outbox::postgres_insert(consumers, &refs, 1),
            )
            .await;
        }
        insert_columns(txn, PROFILES_HEAD, PROFILES_SUFFIX, self.profiles).await?;
        insert_columns(txn, IDENTITIES_HEAD, IDENTITIES_SUFFIX, self.identities).await?;
        let timeline = insert_columns(txn, TIMELINE_HEAD, TIMELINE_SUFFIX, self.timeline).await?;
        waymark_kit::outbox::enqueue(txn, consumers, &refs).await?;
        Ok(timeline)
    }
}

/// Moves the timeline rows of each merged profile to its survivor ((survivor, merged)
/// pairs; a profile is merged once, so each row moves at most once): on PostgreSQL in one
/// statement, as a batch linking many visits to their customers merges many.
async fn move_timelines(
    txn: &DatabaseTransaction,
    moved: Vec<(String, String)>,
) -> Result<(), DbErr> {
    if moved.is_empty() {
        return Ok(());
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        let (survivors, merged): (Vec<String>, Vec<String>) = moved.into_iter().unzip();
        execute(
            txn,
            "UPDATE timeline t SET profile_id = m.s FROM UNNEST(?::text[], ?::text[]) AS m(s, d)
             WHERE t.profile_id = m.d",
            [survivors.into(), merged.into()],
        )
        .await?;
        return Ok(());
    }
    for (survivor, merged) in moved {
        execute(
            txn,
            "UPDATE timeline SET profile_id = ? WHERE profile_id = ?",
            [survivor.into(), merged.into()],
        )
        .await?;
    }
    Ok(())
}

/// Points the pairs kept apart that hold for `from` at `to`, which now holds it.
async fn pass_kept_apart<C: ConnectionTrait>(conn: &C, from: &str, to: &str) -> Result<(), DbErr> {
    for column in ["live_survivor", "live_restored"] {
        execute(
            conn,
            &format!("UPDATE do_not_merge SET {column} = ? WHERE {column} = ?"),
            [to.into(), from.into()],
        )
        .await?;
    }
    Ok(())
}

const IDENTITIES_HEAD: &str = "INSERT INTO identities (id_type, id_value, profile_id)";
const IDENTITIES_SUFFIX: &str =
    "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = excluded.profile_id";
/// The timeline insert as a part of [`write_in_one_statement`], which counts the rows it
/// took.
const TIMELINE_TAKEN_SUFFIX: &str = "ON CONFLICT (event_id) DO NOTHING RETURNING 1";

/// The profiles and identities inserts, the timeline insert and the outbox insert
/// (parameters numbered from 1), as the parts of one data-modifying `WITH`: a batch's bulk
/// writes cost one round trip while it holds the applier, not one per table. The parts
/// touch different tables, so running on one snapshot changes nothing. Returns how many
/// rows the timeline took.
async fn write_in_one_statement(
    txn: &DatabaseTransaction,
    upserts: [(&str, &str, Vec<Column>); 2],
    timeline: Vec<Column>,
    outbox: Option<(String, Vec<Value>)>,
) -> Result<u64, DbErr> {
    let empty = |columns: &[Column]| columns.first().is_none_or(|c| c.len() == 0);
    if outbox.is_none() && empty(&timeline) && upserts.iter().all(|(_, _, c)| empty(c)) {
        return Ok(0);
    }
    let (mut parts, mut values) = (Vec::new(), Vec::new());
    if let Some((text, outbox_values)) = outbox {
        parts.push(format!("queued AS ({text})"));
        values = outbox_values;
    }
    for (i, (head, suffix, columns)) in upserts.into_iter().enumerate() {
        if !empty(&columns) {
            let (text, part_values) = unnest_insert(head, suffix, columns, values.len() + 1);
            parts.push(format!("upsert{i} AS ({text})"));
            values.extend(part_values);
        }
    }
    let (text, part_values) = unnest_insert(
        TIMELINE_HEAD,
        TIMELINE_TAKEN_SUFFIX,
        timeline,
        values.len() + 1,
    );
    parts.push(format!("taken AS ({text})"));
    values.extend(part_values);
    let text = format!("WITH {} SELECT count(*) FROM taken", parts.join(", "));
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            text,
            values,
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("the batch's write returned no row".into()))?;
    Ok(row.try_get_by_index::<i64>(0)?.max(0) as u64)
}

/// One event for the timeline.
pub struct TimelineRow<'a> {
    pub event: &'a Event,
    /// The live profile it shows on.
    pub owner: String,
    /// The profile it was first applied to; merges never change it, Unmerge reads it.
    pub origin: &'a str,
    /// `event` encoded, its `profile_id` being `origin`.
    pub encoded: &'a [u8],
}

/// Adds events to the timeline (already present ones stay). The whole event is kept, so
/// a profile can be rebuilt by replaying it; the entry shown is derived on read.
pub async fn insert_timeline(
    txn: &DatabaseTransaction,
    rows: &[TimelineRow<'_>],
) -> Result<(), DbErr> {
    insert_columns(txn, TIMELINE_HEAD, TIMELINE_SUFFIX, timeline_columns(rows)).await?;
    Ok(())
}

const TIMELINE_HEAD: &str = "INSERT INTO timeline (event_id, profile_id, origin_profile_id, ts, channel, event_type, name, entry, event)";
const TIMELINE_SUFFIX: &str = "ON CONFLICT (event_id) DO NOTHING";

fn timeline_columns(rows: &[TimelineRow<'_>]) -> Vec<Column> {
    let events = || rows.iter().map(|row| row.event);
    vec![
        Column::Text(events().map(|e| e.event_id.clone()).collect()),
        Column::Text(rows.iter().map(|row| row.owner.clone()).collect()),
        Column::Text(rows.iter().map(|row| row.origin.to_owned()).collect()),
        Column::Int8(events().map(entry_time_us).collect()),
        Column::Int2(events().map(|e| e.channel as i16).collect()),
        Column::Int2(events().map(|e| e.r#type as i16).collect()),
        Column::Text(events().map(|e| timeline_name(e).to_owned()).collect()),
        Column::Bytea(vec![Vec::new(); rows.len()]),
        Column::Bytea(rows.iter().map(|row| row.encoded.to_vec()).collect()),
    ]
}

/// The events first applied to any of `origins`, oldest first, with their origin. Rows
/// written before schema version 3 hold no event and are left out.
pub async fn events_of<C: ConnectionTrait>(
    conn: &C,
    origins: &[String],
) -> Result<Vec<(String, Event)>, DbErr> {
    let mut events = Vec::new();
    for chunk in origins.chunks(MAX_PARAMS / 2) {
        // Rows still on their origin profile through the profile index, rows a merge moved
        // through the partial origin index; the two halves are disjoint.
        let list = in_list(chunk.len());
        let text = format!(
            "SELECT origin_profile_id, event FROM timeline
             WHERE profile_id IN ({list}) AND origin_profile_id = profile_id AND event IS NOT NULL
             UNION ALL
             SELECT origin_profile_id, event FROM timeline
             WHERE origin_profile_id IN ({list}) AND origin_profile_id <> profile_id
               AND event IS NOT NULL"
        );
        let ids = chunk.iter().map(|s| Value::from(s.as_str()));
        let values = ids.clone().chain(ids);
        for row in query(conn, &text, values).await? {
            let bytes: Vec<u8> = row.try_get_by_index(1)?;
            let event = Event::decode(bytes.as_slice())
                .map_err(|e| DbErr::Custom(format!("stored event does not decode: {e}")))?;
            events.push((row.try_get_by_index(0)?, event));
        }
    }
    // Replay goes in event-time order across halves and chunks.
    events.sort_by(|(_, a), (_, b)| {
        (entry_time_us(a), &a.event_id).cmp(&(entry_time_us(b), &b.event_id))
    });
    Ok(events)
}

/// Filters of a timeline read.
#[derive(Debug, Default, Clone)]
pub struct TimelineFilter {
    pub profile_id: String,
    pub channels: Vec<i32>,
    pub types: Vec<i32>,
    pub name: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// (ts, event_id) of the last entry of the previous page.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// Timeline entries newest first, with their (ts, event_id) for paging.
pub async fn timeline<C: ConnectionTrait>(
    conn: &C,
    f: &TimelineFilter,
) -> Result<Vec<(i64, String, TimelineEntry)>, DbErr> {
    let backend = conn.get_database_backend();
    let mut text =
        String::from("SELECT ts, event_id, entry, event FROM timeline WHERE profile_id = ?");
    let mut values: Vec<Value> = vec![f.profile_id.as_str().into()];
    if !f.channels.is_empty() {
        text.push_str(&format!(" AND channel IN ({})", in_list(f.channels.len())));
        values.extend(f.channels.iter().map(|c| Value::from(*c as i16)));
    }
    if !f.types.is_empty() {
        text.push_str(&format!(" AND event_type IN ({})", in_list(f.types.len())));
        values.extend(f.types.iter().map(|c| Value::from(*c as i16)));
    }
    if let Some(name) = &f.name {
        text.push_str(" AND name = ?");
        values.push(name.as_str().into());
    }
    if let Some(start) = f.start {
        text.push_str(" AND ts >= ?");
        values.push(start.into());
    }
    if let Some(end) = f.end {
        text.push_str(" AND ts < ?");
        values.push(end.into());
    }
    if let Some((ts, id)) = &f.before {
        text.push_str(" AND (ts < ? OR (ts = ? AND event_id < ?))");
        values.extend([Value::from(*ts), Value::from(*ts), Value::from(id.as_str())]);
    }
    text.push_str(" ORDER BY ts DESC, event_id DESC LIMIT ?");
    values.push(i64::from(f.limit).into());
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, &text),
            values,
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let entry = match r.try_get_by_index::<Option<Vec<u8>>>(3)? {
                Some(event) => timeline_entry(
                    &Event::decode(event.as_slice()).map_err(|e| DbErr::Custom(e.to_string()))?,
                ),
                // Written before schema version 3: only the entry was kept.
                None => {
                    let bytes: Vec<u8> = r.try_get_by_index(2)?;
                    TimelineEntry::decode(bytes.as_slice())
                        .map_err(|e| DbErr::Custom(e.to_string()))?
                }
            };
            Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?, entry))
        })
        .collect()
}

/// The merge history of `live_id`, oldest first: merges into it and, through merges not
/// undone, into every profile it absorbed (A into B, then B into C: both show for C).
pub async fn merges<C: ConnectionTrait>(conn: &C, live_id: &str) -> Result<Vec<Merge>, DbErr> {
    let rows = query(
        conn,
        "WITH RECURSIVE tree(profile_id) AS (
             SELECT ?
             UNION SELECT m.merged_id FROM merges m JOIN tree t ON m.survivor_id = t.profile_id
                   WHERE m.unmerged_at IS NULL
         )
         SELECT merge_id, survivor_id, merged_id, event_id, evidence, merged_at, unmerged_at
         FROM merges WHERE survivor_id IN (SELECT profile_id FROM tree)
         ORDER BY merged_at, merge_id",
        [live_id.into()],
    )
    .await?;
    rows.iter()
        .map(|r| {
            let evidence: String = r.try_get_by_index(4)?;
            let evidence: Vec<serde_json::Value> =
                serde_json::from_str(&evidence).unwrap_or_default();
            Ok(Merge {
                merge_id: r.try_get_by_index(0)?,
                survivor_id: r.try_get_by_index(1)?,
                merged_id: r.try_get_by_index(2)?,
                event_id: r.try_get_by_index(3)?,
                evidence: evidence
                    .iter()
                    .map(|e| Identity {
                        r#type: e["type"].as_str().unwrap_or_default().to_owned(),
                        value: e["value"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect(),
                merged_at: Some(from_micros(r.try_get_by_index(5)?)),
                unmerged_at: r.try_get_by_index::<Option<i64>>(6)?.map(from_micros),
            })
        })
        .collect()
}
