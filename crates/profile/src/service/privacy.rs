//! The right to be forgotten and the right of access: erasure with suppression, export,
//! and the suppression list that ingestion is kept in step with.

use prost_types::value::Kind;
use prost_types::{ListValue, Value};
use sea_orm::TransactionTrait;
use waymark_kit::time::now_micros;
use waymark_proto::common::v1::{Event, Identity};
use waymark_proto::profile::v1::{DoNotMerge, Merge, Profile, Segment, TimelineEntry};

use super::{ProfileError, Profiles, invalid};
use crate::identity::Ident;
use crate::store::{self, SuppressionRow, TimelineFilter};

/// Identifier types a device or browser carries for whoever uses it: suppressed on
/// erasure only when no other profile's events carried the value.
const SHAREABLE: &[&str] = &["anonymous_id", "device_id"];

/// What an erasure removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Deleted {
    pub profile_id: String,
    /// The identifiers suppressed (those the person held alone), in clear for the caller
    /// only: the list keeps their keyed hashes.
    pub suppressed: Vec<Ident>,
    pub timeline_entries: u64,
}

/// Everything held about one person, a page of the timeline at a time: the profile,
/// merges, the pairs kept apart and segments come with the first page only.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub profile: Option<Profile>,
    pub timeline: Vec<TimelineEntry>,
    pub merges: Vec<Merge>,
    pub do_not_merge: Vec<DoNotMerge>,
    pub segments: Vec<Segment>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// Timeline entries an export page holds by default.
const EXPORT_PAGE_ENTRIES: u32 = 500;
/// Bytes of timeline entries after which an export page ends: a quarter of the gRPC
/// message limit leaves room for the profile, merges and segments of the first page.
const EXPORT_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A page size within 1..=1000 (0 means the default of 100).
pub(crate) fn page_size(requested: u32) -> Result<u32, ProfileError> {
    match requested {
        0 => Ok(100),
        n if n > 1000 => Err(invalid("page_size", "must be at most 1000")),
        n => Ok(n),
    }
}

impl Profiles {
    /// Erases a profile and everything merged into it, suppresses its identifiers and
    /// tells downstream services with `Profile Deleted`.
    pub async fn delete(&self, profile_id: &str, reason: &str) -> Result<Deleted, ProfileError> {
        if profile_id.is_empty() {
            return Err(invalid("profile_id", "is required"));
        }
        let _guard = self.exclusive_applier().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        let record = store::load_live(&txn, profile_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no profile {profile_id:?}")))?;
        let live_id = record.profile.profile_id.clone();
        let tree = store::merge_tree(&txn, &live_id).await?;
        let mut identities = store::identities_of(&txn, &live_id).await?;
        for identity in &record.profile.identities {
            let ident = (identity.r#type.clone(), identity.value.clone());
            if !identities.contains(&ident) {
                identities.push(ident);
            }
        }
        // An anonymous or device id that another profile's events carried too (a shared
        // browser or tablet) is erased from this profile but not suppressed: suppressing it
        // would drop the other person's events for good.
        let shared = self.shared_with_others(&txn, &tree, &identities).await?;
        let suppressed: Vec<Ident> = identities
            .iter()
            .filter(|i| !shared.contains(*i))
            .cloned()
            .collect();
        let erased = store::erase(&txn, &tree, &identities).await?;
        // Queued events of the person leave with the rest (the notice below goes after):
        // the downstream outboxes may have no consumer yet and keep their rows for good.
        let outbox_events =
            scrub_outbox(&txn, &self.inner.rules.identity, &tree, &suppressed).await?;
        let hashed: Vec<Ident> = suppressed
            .iter()
            .map(|i| self.inner.hasher.hashed(i))
            .collect();
        store::suppress(&txn, &hashed, now).await?;
        store::bump_suppressions(&txn).await?;
        // Until its tombstone is in the cache, no restart may serve the profile from there.
        store::add_pending_tombstones(&txn, &tree, now).await?;
        let notice = profile_deleted(&live_id, &tree, now);
        waymark_kit::outbox::enqueue(
            &txn,
            &self.inner.consumers,
            &[prost::Message::encode_to_vec(&notice).as_slice()],
        )
        .await?;
        let tombstones = self.inner.tombstones.lock().await;
        self.skip_cache_for(&tree);
        txn.commit().await?;
        self.inner.wakeup.notify();
        self.inner.suppressions_pending.notify_one();
        self.inner.metrics.emitted([&notice]);
        // Profile ids are never reused, so the highest version keeps every id out for good.
        let mut settled = Vec::with_capacity(tree.len());
        for id in &tree {
            let keys: &[Ident] = if *id == live_id { &identities } else { &[] };
            if self.inner.cache.invalidate(id, u64::MAX, keys).await {
                settled.push(id.clone());
            }
        }
        self.tombstones_settled(&settled).await;
        drop(tombstones);
        if let Err(error) = waymark_kit::db::forget_overwritten(&self.inner.db).await {
            tracing::warn!(%error, "emptying the write-ahead log after an erasure failed");
        }
        tracing::info!(
            profile_id = %live_id,
            profiles = tree.len(),
            identities = identities.len(),
            shared = shared.len(),
            timeline_entries = erased.timeline_entries,
            outbox_events,
            reason,
            "profile erased"
        );
        Ok(Deleted {
            profile_id: live_id,
            suppressed,
            timeline_entries: erased.timeline_entries,
        })
    }

    /// A page of everything held about the person a profile id (or a merged-away id)
    /// belongs to; `page_token` is empty for the first page.
    pub async fn export(
        &self,
        profile_id: &str,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<Export, ProfileError> {
        if profile_id.is_empty() {
            return Err(invalid("profile_id", "is required"));
        }
        let limit = match page_size_requested {
            0 => EXPORT_PAGE_ENTRIES,
            n if n > 1000 => return Err(invalid("page_size", "must be at most 1000")),
            n => n,
        };
        let before = if page_token.is_empty() {
            None
        } else {
            Some(
                page_token
                    .split_once('/')
                    .and_then(|(ts, id)| Some((ts.parse::<i64>().ok()?, id.to_owned())))
                    .ok_or_else(|| invalid("page_token", "is not a token from a previous page"))?,
            )
        };
        let db = &self.inner.db;
        let record = store::load_live(db, profile_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no profile {profile_id:?}")))?;
        let live_id = record.profile.profile_id.clone();
        let first = before.is_none();
        let filter = TimelineFilter {
            profile_id: live_id.clone(),
            before,
            limit: limit + 1,
            ..TimelineFilter::default()
        };
        let rows = store::timeline(db, &filter).await?;
        let mut timeline = Vec::new();
        let mut bytes = 0;
        let mut last = None;
        let mut more = false;
        for (ts, event_id, entry) in rows {
            let size = prost::Message::encoded_len(&entry);
            if timeline.len() == limit as usize
                || (!timeline.is_empty() && bytes + size > EXPORT_PAGE_BYTES)
            {
                more = true;
                break;
            }
            bytes += size;
            timeline.push(entry);
            last = Some((ts, event_id));
        }
        let next_page_token = match last {
            Some((ts, event_id)) if more => format!("{ts}/{event_id}"),
            _ => String::new(),
        };
        if !first {
            return Ok(Export {
                profile: None,
                timeline,
                merges: Vec::new(),
                do_not_merge: Vec::new(),
                segments: Vec::new(),
                next_page_token,
            });
        }
        let merges = store::merges(db, &live_id).await?;
        // A pair's evidence may name the other person's identifiers (the e-mail someone
        // typed that was not theirs): the export shows only those this person holds.
        let held = &record.profile.identities;
        let mut do_not_merge = store::kept_apart_from(db, &live_id).await?;
        for pair in &mut do_not_merge {
            pair.evidence.retain(|identity| held.contains(identity));
        }
        let mut segments = Vec::new();
        for segment_id in &record.profile.segments {
            if let Some(row) = store::segment(db, segment_id).await? {
                segments.push(super::segments::segment_message(row));
            }
        }
        Ok(Export {
            profile: Some(record.profile),
            timeline,
            merges,
            do_not_merge,
            segments,
            next_page_token,
        })
    }

    /// The anonymous and device ids among `identities` that an event applied to a profile
    /// outside `tree` carried, as `waymark-identity` extracts them. The timeline keeps
    /// every applied event whole; the database finds the rows holding one of the values'
    /// bytes (one pass in key order per 100 values, a value leaving the search once found
    /// shared) and each row is checked exactly here. Other types name a person (user id,
    /// e-mail, phone, custom identifiers) and are always suppressed.
    async fn shared_with_others(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        tree: &[String],
        identities: &[Ident],
    ) -> Result<std::collections::HashSet<Ident>, ProfileError> {
        use prost::Message;
        let tree: std::collections::HashSet<&str> = tree.iter().map(String::as_str).collect();
        let candidates: Vec<&Ident> = identities
            .iter()
            .filter(|(t, _)| SHAREABLE.contains(&t.as_str()))
            .collect();
        let mut shared = std::collections::HashSet::new();
        for chunk in candidates.chunks(100) {
            let mut open = chunk.to_vec();
            let mut after = String::new();
            while !open.is_empty() {
                let needles: Vec<&str> = open.iter().map(|(_, v)| v.as_str()).collect();
                let rows = store::events_containing(txn, &needles, &after, 100).await?;
                if rows.is_empty() {
                    break;
                }
                for (event_id, profile_id, bytes) in rows {
                    after = event_id;
                    if tree.contains(profile_id.as_str()) {
                        continue;
                    }
                    let event = Event::decode(bytes.as_slice())
                        .map_err(|e| ProfileError::Internal(format!("timeline event: {e}")))?;
                    let carried = self.inner.rules.identity.extract(&event);
                    open.retain(|ident| {
                        let found = carried.contains(ident);
                        if found {
                            shared.insert((*ident).clone());
                        }
                        !found
                    });
                }
            }
        }
        Ok(shared)
    }

    /// Whether a read of `profile_id` may be answered from the cache: not before the
    /// pending tombstones are loaded, and not for an erased profile whose tombstone has
    /// not reached the cache.
    pub(crate) fn cache_trusted_for(&self, profile_id: &str) -> bool {
        self.inner
            .pending_tombstones
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|pending| !pending.contains(profile_id))
    }

    fn skip_cache_for(&self, ids: &[String]) {
        if let Some(pending) = self
            .inner
            .pending_tombstones
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            pending.extend(ids.iter().cloned());
        }
    }

    /// Forgets the pending tombstones that reached the cache. Best effort: a row left
    /// behind is settled again by the next [`Profiles::settle_tombstones`].
    async fn tombstones_settled(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        if let Err(error) = store::drop_pending_tombstones(&self.inner.db, ids).await {
            tracing::warn!(%error, "recording settled cache tombstones failed");
            return;
        }
        if let Some(pending) = self
            .inner
            .pending_tombstones
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            for id in ids {
                pending.remove(id);
            }
        }
    }

    /// Writes the tombstones of erased profiles that have not reached the cache yet (this
    /// replica's, or another's whose Redis write failed), and holds the rest so their
    /// reads skip the cache. Runs at start-up, before any read trusts the cache, and
    /// every second while serving. Returns how many are still pending.
    pub async fn settle_tombstones(&self) -> Result<usize, ProfileError> {
        let _tombstones = self.inner.tombstones.lock().await;
        let pending = store::pending_tombstones(&self.inner.db).await?;
        *self
            .inner
            .pending_tombstones
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(pending.iter().cloned().collect());
        let mut settled = Vec::new();
        for id in &pending {
            if !self.inner.cache.invalidate(id, u64::MAX, &[]).await {
                // Redis is still unreachable: the rest would fail alike.
                break;
            }
            settled.push(id.clone());
        }
        self.tombstones_settled(&settled).await;
        Ok(pending.len() - settled.len())
    }

    /// Work before the service is trusted, after every (re)connection to the database:
    /// suppressions stored in clear by earlier releases are replaced by their keyed
    /// hashes, and the pending cache tombstones are loaded and retried.
    pub async fn prepare(&self) -> Result<(), ProfileError> {
        let hasher = &self.inner.hasher;
        let txn = self.inner.db.begin().await?;
        let rewritten = store::hash_clear_suppressions(&txn, |i| hasher.hashed(i)).await?;
        if rewritten > 0 {
            // Replicas reload the list (as hashes) at their next batch.
            store::bump_suppressions(&txn).await?;
        }
        txn.commit().await?;
        if rewritten > 0 {
            tracing::info!(
                rewritten,
                "suppressions stored in clear replaced by their hashes"
            );
        }
        self.settle_tombstones().await?;
        let pending = self.reconcile_aggregates().await?;
        if pending > 0 {
            tracing::info!(pending, "aggregates await their backfill");
        }
        Ok(())
    }

    /// A page of the suppression list (identifiers as keyed hashes), newest first, and
    /// the next page token.
    pub async fn suppressions(
        &self,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<(Vec<SuppressionRow>, String), ProfileError> {
        let limit = page_size(page_size_requested)?;
        let after = if page_token.is_empty() {
            None
        } else {
            Some(
                parse_suppression_token(page_token)
                    .ok_or_else(|| invalid("page_token", "is not a token from a previous page"))?,
            )
        };
        let mut rows = store::suppressions(&self.inner.db, after.as_ref(), limit + 1).await?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last()
                .map(|r| format!("{}/{}/{}", r.suppressed_at, r.id_type, r.id_value))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// Suppressions ingestion has not acknowledged yet, as `(type, keyed hash)`. Ingestion
    /// knows the same identifier types (custom ones included: both read
    /// `custom_identity_types`) and the same key (`identifier_hash_key`).
    pub async fn unsynced_suppressions(&self, limit: u32) -> Result<Vec<Ident>, ProfileError> {
        Ok(store::unsynced_suppressions(&self.inner.db, limit).await?)
    }

    /// Records that ingestion has the suppressions.
    pub async fn mark_suppressions_synced(&self, identities: &[Ident]) -> Result<(), ProfileError> {
        Ok(store::mark_synced(&self.inner.db, identities, now_micros()).await?)
    }

    /// Resolves once a deletion has added suppressions to push.
    pub async fn suppressions_added(&self) {
        self.inner.suppressions_pending.notified().await;
    }
}

/// Removes from the service's outbox every queued event of the erased person: events
/// applied to one of the `tree`'s profiles (and the notices about them), and any event
/// carrying one of the identifiers they held alone, as `waymark-identity` extracts them
/// (an alias's previous id counts as a user id too, as ingestion checks it). Returns how
/// many.
async fn scrub_outbox(
    txn: &sea_orm::DatabaseTransaction,
    rules: &crate::identity::IdentityRules,
    tree: &[String],
    identities: &[Ident],
) -> Result<u64, sea_orm::DbErr> {
    let profiles: std::collections::HashSet<&str> = tree.iter().map(String::as_str).collect();
    let idents: std::collections::HashSet<&Ident> = identities.iter().collect();
    waymark_kit::outbox::scrub(txn, |event| {
        profiles.contains(event.profile_id.as_str())
            || rules.extract(event).iter().any(|i| idents.contains(i))
            || crate::identity::normalise("user_id", &event.previous_id)
                .is_some_and(|v| idents.contains(&("user_id".to_owned(), v)))
    })
    .await
}

fn parse_suppression_token(token: &str) -> Option<(i64, String, String)> {
    let (at, rest) = token.split_once('/')?;
    let (id_type, value) = rest.split_once('/')?;
    Some((at.parse().ok()?, id_type.to_owned(), value.to_owned()))
}

/// The downstream notice of an erasure. It carries ids only: the identifiers are gone.
fn profile_deleted(live_id: &str, tree: &[String], now_us: i64) -> Event {
    let ids = tree.iter().map(|id| super::string_value(id)).collect();
    let erased = Value {
        kind: Some(Kind::ListValue(ListValue { values: ids })),
    };
    super::notice(
        "Profile Deleted",
        live_id,
        [("erased_profile_ids", erased)],
        now_us,
    )
}

/// An identifier as the API shows it.
pub fn identity((id_type, value): &Ident) -> Identity {
    Identity {
        r#type: id_type.clone(),
        value: value.clone(),
    }
}
