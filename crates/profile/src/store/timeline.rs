//! The timeline: every applied event whole, on the live profile it shows on and with the
//! profile it was first applied to; read as entries newest first, or as events to replay.

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{Column, MAX_PARAMS, in_list, insert_columns, query_as};
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::TimelineEntry;

use crate::model::{timeline_entry, timeline_name};
use crate::resolve::entry_time_us;

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

pub(super) const TIMELINE_HEAD: &str = "INSERT INTO timeline (event_id, profile_id, origin_profile_id, ts, channel, event_type, name, entry, event)";
pub(super) const TIMELINE_SUFFIX: &str = "ON CONFLICT (event_id) DO NOTHING";

pub(super) fn timeline_columns(rows: &[TimelineRow<'_>]) -> Vec<Column> {
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

/// A stored event with the profile it was first applied to.
#[derive(FromQueryResult)]
pub(super) struct OriginEvent {
    origin_profile_id: String,
    event: Vec<u8>,
}

impl OriginEvent {
    /// The origin and the event, decoded.
    pub(super) fn decode(self) -> Result<(String, Event), DbErr> {
        let event = Event::decode(self.event.as_slice())
            .map_err(|e| DbErr::Custom(format!("stored event does not decode: {e}")))?;
        Ok((self.origin_profile_id, event))
    }
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
        for row in query_as::<OriginEvent, _>(conn, &text, values).await? {
            events.push(row.decode()?);
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
    #[derive(FromQueryResult)]
    struct Stored {
        ts: i64,
        event_id: String,
        entry: Vec<u8>,
        event: Option<Vec<u8>>,
    }
    let rows: Vec<Stored> = query_as(conn, &text, values).await?;
    rows.into_iter()
        .map(|r| {
            let entry = match r.event {
                Some(event) => timeline_entry(
                    &Event::decode(event.as_slice()).map_err(|e| DbErr::Custom(e.to_string()))?,
                ),
                // Written before schema version 3: only the entry was kept.
                None => TimelineEntry::decode(r.entry.as_slice())
                    .map_err(|e| DbErr::Custom(e.to_string()))?,
            };
            Ok((r.ts, r.event_id, entry))
        })
        .collect()
}
