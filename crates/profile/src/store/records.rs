//! Profile rows and the identifier index: loading profiles (by id, following merges, or by
//! the identifiers they own), saving them, and giving up identifiers.

use std::collections::HashSet;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{
    Column, MAX_PARAMS, execute, in_list, insert_columns, query, query_as, query_one,
};
use waymark_proto::profile::v1::Profile;

use super::idents::{ident_arrays, ident_pairs};
use crate::aggregate::AggregateState;
use crate::identity::Ident;
use crate::resolve::Record;

/// Columns selected for a [`RecordRow`] (the id it does not read: the state holds it).
pub(crate) const RECORD_COLUMNS: &str = "profile_id, merged_into, created_at, state, aggregates";

/// A stored profile, read by column name from [`RECORD_COLUMNS`]; [`record_from`] decodes
/// it.
#[derive(FromQueryResult)]
pub(crate) struct RecordRow {
    merged_into: Option<String>,
    created_at: i64,
    state: Vec<u8>,
    aggregates: Option<Vec<u8>>,
}

pub(crate) fn record_from(row: RecordRow) -> Result<Record, DbErr> {
    let profile = Profile::decode(row.state.as_slice())
        .map_err(|e| DbErr::Custom(format!("stored profile does not decode: {e}")))?;
    let aggregates = AggregateState::decode(row.aggregates.as_deref().unwrap_or_default())
        .map_err(|e| DbErr::Custom(format!("stored aggregates do not decode: {e}")))?;
    Ok(Record {
        profile,
        created_us: row.created_at,
        merged_into: row.merged_into,
        aggregates,
    })
}

/// The profiles a query selecting [`RECORD_COLUMNS`] returns, decoded.
pub(crate) async fn query_records<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<Record>, DbErr> {
    query_as::<RecordRow, _>(conn, text, values)
        .await?
        .into_iter()
        .map(record_from)
        .collect()
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
        #[derive(FromQueryResult)]
        struct OwnerRow {
            #[sea_orm(nested)]
            record: RecordRow,
            kept_apart: Vec<String>,
        }
        let rows: Vec<OwnerRow> = query_as(
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
                     WHERE d.live_restored = p.profile_id) AS kept_apart
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
        for row in rows {
            let record = record_from(row.record)?;
            let id = &record.profile.profile_id;
            apart.extend(row.kept_apart.into_iter().map(|other| (id.clone(), other)));
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
            owners.insert(row.try_get("", "profile_id")?);
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
    #[derive(FromQueryResult)]
    struct Pair {
        live_survivor: String,
        live_restored: String,
    }
    let mut apart = Vec::new();
    for chunk in ids.chunks(MAX_PARAMS / 2) {
        let list = in_list(chunk.len());
        let values: Vec<Value> = chunk.iter().map(|s| s.as_str().into()).collect();
        let text = format!(
            "SELECT live_survivor, live_restored FROM do_not_merge
             WHERE live_survivor IN ({list}) OR live_restored IN ({list})"
        );
        let pairs: Vec<Pair> = query_as(conn, &text, values.iter().chain(&values).cloned()).await?;
        apart.extend(
            pairs
                .into_iter()
                .map(|p| (p.live_survivor, p.live_restored)),
        );
    }
    Ok(apart)
}

/// Profiles by id (live or merged).
pub async fn load_records<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<Vec<Record>, DbErr> {
    let mut records = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_PARAMS) {
        let text = format!(
            "SELECT {RECORD_COLUMNS} FROM profiles WHERE profile_id IN ({})",
            in_list(chunk.len())
        );
        let values = chunk.iter().map(|s| Value::from(s.as_str()));
        records.extend(query_records(conn, &text, values).await?);
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
    let row = query_one(
        conn,
        "SELECT profile_id FROM identities WHERE id_type = ? AND id_value = ?",
        [id_type.into(), value.into()],
    )
    .await?;
    row.map(|r| r.try_get("", "profile_id")).transpose()
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

/// A profile row to write.
pub struct ProfileRow<'a> {
    pub record: &'a Record,
    /// `record.profile` encoded.
    pub state: Vec<u8>,
    /// When decay next moves its emotion label; the settling pass reads profiles by it.
    pub emotion_due_at: Option<i64>,
}

/// Writes profiles (upsert), as updated at `now_us`.
pub async fn save_profiles(
    txn: &DatabaseTransaction,
    rows: Vec<ProfileRow<'_>>,
    now_us: i64,
) -> Result<(), DbErr> {
    let columns = profile_columns(rows, now_us);
    insert_columns(txn, PROFILES_HEAD, PROFILES_SUFFIX, columns).await?;
    Ok(())
}

pub(super) const PROFILES_HEAD: &str = "INSERT INTO profiles (profile_id, merged_into, created_at, updated_at, version, state, aggregates, emotion_due_at)";
pub(super) const PROFILES_SUFFIX: &str = "ON CONFLICT (profile_id) DO UPDATE SET merged_into = excluded.merged_into, created_at = excluded.created_at,
     updated_at = excluded.updated_at, version = excluded.version, state = excluded.state,
     aggregates = excluded.aggregates, emotion_due_at = excluded.emotion_due_at";

/// `rows` as the columns of [`PROFILES_HEAD`], as updated at `now_us`.
pub(super) fn profile_columns(rows: Vec<ProfileRow<'_>>, now_us: i64) -> Vec<Column> {
    let records = || rows.iter().map(|row| row.record);
    let profile_ids = records().map(|r| r.profile.profile_id.clone()).collect();
    let merged_into = records().map(|r| r.merged_into.clone()).collect();
    let created = records().map(|r| r.created_us).collect();
    let versions = records().map(|r| r.profile.version as i64).collect();
    let aggregates = records().map(|r| r.aggregates.encode_to_vec()).collect();
    let emotion_due = rows.iter().map(|row| row.emotion_due_at).collect();
    let updated = vec![now_us; rows.len()];
    let states = rows.into_iter().map(|row| row.state).collect();
    vec![
        Column::Text(profile_ids),
        Column::NullableText(merged_into),
        Column::Int8(created),
        Column::Int8(updated),
        Column::Int8(versions),
        Column::Bytea(states),
        Column::Bytea(aggregates),
        Column::NullableInt8(emotion_due),
    ]
}

pub(super) const IDENTITIES_HEAD: &str = "INSERT INTO identities (id_type, id_value, profile_id)";
pub(super) const IDENTITIES_SUFFIX: &str =
    "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = excluded.profile_id";
