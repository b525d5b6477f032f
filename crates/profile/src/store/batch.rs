//! The write of a delivered batch: everything it changed, computed ahead of its
//! transaction, then written with one statement for the bulk rows on PostgreSQL.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, Value};
use waymark_kit::sql::{Column, insert_columns, unnest_insert};

use super::merges::{insert_merges, merge_rows, move_timelines, pass_kept_apart};
use super::records::{
    IDENTITIES_HEAD, IDENTITIES_SUFFIX, PROFILES_HEAD, PROFILES_SUFFIX, ProfileRow,
    delete_identities, profile_columns,
};
use super::timeline::{TIMELINE_HEAD, TIMELINE_SUFFIX, TimelineRow, timeline_columns};
use crate::identity::Ident;
use crate::resolve::MergeRecord;

/// What a delivered batch changed, as the core worked it out: every profile id is the
/// live one unless said otherwise.
pub struct BatchRows<'a> {
    /// The profiles it changed, merged-away ones included.
    pub profiles: Vec<ProfileRow<'a>>,
    /// The identifiers it added or moved, each with the profile owning it.
    pub identities: Vec<(&'a Ident, &'a str)>,
    /// Identifiers given up, whose rows go.
    pub evicted: Vec<Ident>,
    /// (survivor, merged) pairs: the merged profile's timeline moves to the survivor.
    pub moved: Vec<(String, String)>,
    /// Its merges, for the audit.
    pub merges: &'a [MergeRecord],
    /// (merged, survivor) of the merges whose merged profile was kept apart from others:
    /// its pairs pass to the survivor.
    pub apart_moved: Vec<(String, String)>,
    /// The events it applied.
    pub timeline: Vec<TimelineRow<'a>>,
    /// Every event it sends downstream, encoded.
    pub outbox: Vec<Vec<u8>>,
}

/// Everything a batch writes, as columns ready to bind: built ahead of its transaction,
/// while the previous batch's transaction runs.
pub struct BatchWrite {
    profiles: Vec<Column>,
    identities: Vec<Column>,
    evicted: Vec<Ident>,
    moved: Vec<(String, String)>,
    merges: Vec<Vec<Value>>,
    apart_moved: Vec<(String, String)>,
    timeline: Vec<Column>,
    outbox: Vec<Vec<u8>>,
}

impl BatchWrite {
    /// The write of `rows`, its profiles updated at `now_us`.
    pub fn new(rows: BatchRows<'_>, now_us: i64) -> Self {
        let identities = &rows.identities;
        Self {
            identities: vec![
                Column::Text(identities.iter().map(|((t, _), _)| t.clone()).collect()),
                Column::Text(identities.iter().map(|((_, v), _)| v.clone()).collect()),
                Column::Text(identities.iter().map(|(_, p)| (*p).to_owned()).collect()),
            ],
            profiles: profile_columns(rows.profiles, now_us),
            evicted: rows.evicted,
            moved: rows.moved,
            merges: merge_rows(rows.merges),
            apart_moved: rows.apart_moved,
            timeline: timeline_columns(&rows.timeline),
            outbox: rows.outbox,
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
        insert_merges(txn, self.merges).await?;
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
    let empty = |columns: &[Column]| columns.first().is_none_or(Column::is_empty);
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
            let (text, part_values) = unnest_insert(head, suffix, columns, values.len() + 1)?;
            parts.push(format!("upsert{i} AS ({text})"));
            values.extend(part_values);
        }
    }
    let (text, part_values) = unnest_insert(
        TIMELINE_HEAD,
        TIMELINE_TAKEN_SUFFIX,
        timeline,
        values.len() + 1,
    )?;
    parts.push(format!("taken AS ({text})"));
    values.extend(part_values);
    let text = format!(
        "WITH {} SELECT count(*) AS taken FROM taken",
        parts.join(", ")
    );
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            text,
            values,
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("the batch's write returned no row".into()))?;
    Ok(row.try_get::<i64>("", "taken")?.max(0) as u64)
}
