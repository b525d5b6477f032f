//! The write of a delivered batch: everything it changed, computed ahead of its
//! transaction, then written with one statement for the bulk rows on PostgreSQL.

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, Value};
use waymark_proto::common::v1::Event;

use super::merges::{move_timelines, pass_kept_apart};
use super::records::{
    IDENTITIES_HEAD, IDENTITIES_SUFFIX, PROFILES_HEAD, PROFILES_SUFFIX, delete_identities,
    profile_columns,
};
use super::sql::{Column, insert_columns, insert_rows, unnest_insert};
use super::timeline::{TIMELINE_HEAD, TIMELINE_SUFFIX, TimelineRow, timeline_columns};
use crate::emotion::EmotionRules;
use crate::identity::Ident;
use crate::model::address;
use crate::resolve::{Record, WorkingSet};

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
