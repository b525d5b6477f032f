//! Unmerge: splits a merged profile back out of the profile that absorbed it.
//!
//! Both sides are rebuilt by replaying their own events in event-time order, so traits,
//! computed traits, emotion and consent come out as if the merge had never happened. An
//! event belongs to the profile it was first applied to (its origin): events applied to
//! the survivor after the merge stay with the survivor, even if they carried one of the
//! merged profile's identifiers. Identifiers go back to the side that held them at the
//! time of the merge. The two are then kept apart (`do_not_merge`): the operator said they
//! are two people, so no later event merges them again until AllowMerge lifts the pair.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};
use waymark_kit::time::{from_micros, now_micros};
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::{DoNotMerge, Profile};

use super::{ProfileError, Profiles, invalid, notice, segments, string_value};
use crate::aggregate::AggregateState;
use crate::identity::Ident;
use crate::model::apply_event;
use crate::resolve::{Record, Rules};
use crate::store;

/// A profile to rebuild from scratch: id, creation time, version and the memberships it is
/// listed with kept (so segment changes come out as transitions), everything else from
/// the events [`replay`] applies to it.
fn blank(record: &Record, identities: Vec<Ident>, now_us: i64) -> Record {
    let profile = Profile {
        profile_id: record.profile.profile_id.clone(),
        version: record.profile.version + 1,
        identities: identities.iter().map(super::identity).collect(),
        segments: match record.merged_into {
            // Merged-away profiles left every segment when they were merged.
            Some(_) => Vec::new(),
            None => record.profile.segments.clone(),
        },
        created_at: record.profile.created_at,
        updated_at: Some(from_micros(now_us)),
        ..Profile::default()
    };
    Record {
        profile,
        created_us: record.created_us,
        merged_into: None,
        aggregates: AggregateState::default(),
    }
}

/// Replays the events first applied to `origins` into `rebuilt`, a page at a time, in
/// event-time order; returns how many there were.
async fn replay<C: ConnectionTrait>(
    conn: &C,
    origins: &[String],
    rebuilt: &mut Record,
    rules: &Rules,
    now_us: i64,
) -> Result<usize, ProfileError> {
    let mut after = (i64::MIN, String::new());
    let mut replayed = 0;
    loop {
        let page = store::events_page(conn, origins, &after, REPLAY_PAGE).await?;
        let Some((_, last)) = page.last() else {
            return Ok(replayed);
        };
        after = (crate::resolve::entry_time_us(last), last.event_id.clone());
        replayed += page.len();
        for (_, event) in &page {
            apply_event(&mut rebuilt.profile, event, &rules.emotion);
            rebuilt.observe_aggregates(&rules.aggregates, event, now_us);
        }
    }
}

/// Events read and replayed per page.
const REPLAY_PAGE: u32 = 1000;
/// Times an Unmerge reads and replays both sides without holding the applier before it
/// does so holding it: each attempt is undone by an event, merge or update that reaches
/// either side before the applier is taken to write.
const UNLOCKED_ATTEMPTS: usize = 3;

/// Both sides of a merge as read, and rebuilt.
struct Split {
    merge: store::MergeRow,
    /// The merged profile's version and the live profile holding it, with its version:
    /// every writer advances a profile's version, so the same versions mean nothing
    /// reached either side since they were read.
    merged_version: u64,
    holder: (String, u64),
    moved: Vec<String>,
    moved_idents: Vec<Ident>,
    moved_events: usize,
    survivor: Record,
    restored: Record,
}

fn idents(profile: &Profile) -> Vec<Ident> {
    profile
        .identities
        .iter()
        .map(|i| (i.r#type.clone(), i.value.clone()))
        .collect()
}

fn profile_unmerged(survivor: &str, restored: &str, merge_id: &str, now_us: i64) -> Event {
    notice(
        "Profile Unmerged",
        survivor,
        [
            ("survivor_profile_id", string_value(survivor)),
            ("restored_profile_id", string_value(restored)),
            ("merge_id", string_value(merge_id)),
        ],
        now_us,
    )
}

impl Profiles {
    /// Undoes one merge; returns (the profile that had absorbed it, the restored one).
    ///
    /// Both sides are read and replayed a page at a time without holding the applier, so
    /// deliveries go on meanwhile; the applier is then taken only to check that neither
    /// side changed since (their versions) and to write. Should one have changed, it reads
    /// again, and after [`UNLOCKED_ATTEMPTS`] it reads holding the applier throughout.
    pub async fn unmerge(&self, merge_id: &str) -> Result<(Profile, Profile), ProfileError> {
        if merge_id.is_empty() {
            return Err(invalid("merge_id", "is required"));
        }
        let now = now_micros();
        let mut attempt = 0;
        let (txn, split, _guard) = loop {
            attempt += 1;
            let unlocked = match attempt <= UNLOCKED_ATTEMPTS {
                true => Some(self.read_split(&self.inner.db, merge_id, now).await?),
                false => None,
            };
            let guard = self.exclusive_applier().await;
            let txn = self.inner.db.begin().await?;
            self.lock_applier(&txn).await?;
            match unlocked {
                None => {
                    let split = self.read_split(&txn, merge_id, now).await?;
                    break (txn, split, guard);
                }
                Some(split) if unchanged(&txn, &split).await? => break (txn, split, guard),
                Some(_) => {
                    txn.rollback().await?;
                    tracing::debug!(
                        merge_id,
                        attempt,
                        "a side changed while unmerging; reading again"
                    );
                }
            }
        };
        let Split {
            merge,
            moved,
            moved_idents,
            moved_events,
            mut survivor,
            mut restored,
            ..
        } = split;
        let mut transitions = Vec::new();
        let mut emitted = vec![profile_unmerged(
            &survivor.profile.profile_id,
            &restored.profile.profile_id,
            merge_id,
            now,
        )];
        for record in [&mut survivor, &mut restored] {
            let (t, events) = self.evaluate_profile(&mut record.profile, now);
            transitions.extend(t);
            emitted.extend(events);
        }
        super::save_profiles(
            &txn,
            &[&survivor, &restored],
            &self.inner.rules.emotion,
            now,
        )
        .await?;
        segments::save_transitions(&txn, &transitions, now).await?;
        store::assign_identities(&txn, &moved_idents, &restored.profile.profile_id).await?;
        store::move_timeline(&txn, &moved, &restored.profile.profile_id).await?;
        store::mark_unmerged(&txn, &merge.merge_id, now).await?;
        store::restore_kept_apart(&txn, &moved, &restored.profile.profile_id).await?;
        store::keep_apart(
            &txn,
            &merge,
            &survivor.profile.profile_id,
            &restored.profile.profile_id,
            now,
        )
        .await?;
        super::emit(
            &txn,
            &self.inner.consumers,
            &mut emitted,
            &[&survivor.profile, &restored.profile],
        )
        .await?;
        txn.commit().await?;
        self.inner.wakeup.notify();
        self.inner.metrics.emitted(&emitted);
        self.inner.cache.put(&survivor.profile).await;
        self.inner.cache.put(&restored.profile).await;
        tracing::info!(
            merge_id,
            survivor = %survivor.profile.profile_id,
            restored = %restored.profile.profile_id,
            moved_events,
            segment_changes = transitions.len(),
            "merge undone"
        );
        Ok((survivor.profile, restored.profile))
    }

    /// Lifts the pair recorded by undoing `merge_id`, so later evidence may merge the two
    /// again; returns it.
    pub async fn allow_merge(&self, merge_id: &str) -> Result<DoNotMerge, ProfileError> {
        if merge_id.is_empty() {
            return Err(invalid("merge_id", "is required"));
        }
        // Under the applier, whose memory holds the pairs of the profiles it remembers:
        // the lock's counter makes every replica's memory forget them.
        let _guard = self.exclusive_applier().await;
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        let allowed = store::allow_merge(&txn, merge_id).await?.ok_or_else(|| {
            ProfileError::NotFound(format!("no profiles kept apart by merge {merge_id:?}"))
        })?;
        txn.commit().await?;
        tracing::info!(
            merge_id,
            survivor = %allowed.survivor_id,
            restored = %allowed.restored_id,
            "profiles no longer kept apart"
        );
        Ok(allowed)
    }

    /// Reads the merge and both sides through `conn`, and rebuilds them.
    async fn read_split<C: ConnectionTrait>(
        &self,
        conn: &C,
        merge_id: &str,
        now: i64,
    ) -> Result<Split, ProfileError> {
        let merge = store::merge_by_id(conn, merge_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no merge {merge_id:?}")))?;
        if merge.unmerged_at.is_some() {
            return Err(ProfileError::FailedPrecondition(format!(
                "merge {merge_id:?} was already undone"
            )));
        }
        let merged = store::load_records(conn, std::slice::from_ref(&merge.merged_id))
            .await?
            .pop()
            .ok_or_else(|| {
                ProfileError::NotFound(format!("profile {:?} was erased", merge.merged_id))
            })?;
        let holder = store::load_live(conn, &merge.merged_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound("the merged profile was erased".into()))?;

        let moved = store::merge_tree(conn, &merge.merged_id).await?;
        let moved_set: HashSet<&String> = moved.iter().collect();
        let staying: Vec<String> = store::merge_tree(conn, &holder.profile.profile_id)
            .await?
            .into_iter()
            .filter(|id| !moved_set.contains(id))
            .collect();
        // The merged profile's row keeps the identifiers it had when it was merged away;
        // an Unmerge inside the holder since may have given some of them to a third
        // profile. Only those the holder still has go back.
        let holder_idents = idents(&holder.profile);
        let moved_idents: Vec<Ident> = idents(&merged.profile)
            .into_iter()
            .filter(|i| holder_idents.contains(i))
            .collect();
        let moved_ident_set: HashSet<&Ident> = moved_idents.iter().collect();
        let staying_idents: Vec<Ident> = holder_idents
            .into_iter()
            .filter(|i| !moved_ident_set.contains(i))
            .collect();
        let rules = &self.inner.rules;
        let mut restored = blank(&merged, moved_idents.clone(), now);
        let moved_events = replay(conn, &moved, &mut restored, rules, now).await?;
        let mut survivor = blank(&holder, staying_idents, now);
        replay(conn, &staying, &mut survivor, rules, now).await?;
        Ok(Split {
            merged_version: merged.profile.version,
            holder: (holder.profile.profile_id.clone(), holder.profile.version),
            merge,
            moved,
            moved_idents,
            moved_events,
            survivor,
            restored,
        })
    }
}

/// Whether the merge is still in force and neither side changed since `split` was read.
async fn unchanged(txn: &DatabaseTransaction, split: &Split) -> Result<bool, ProfileError> {
    let merge = store::merge_by_id(txn, &split.merge.merge_id).await?;
    if merge.is_none_or(|m| m.unmerged_at.is_some()) {
        return Ok(false);
    }
    let merged = store::load_records(txn, std::slice::from_ref(&split.merge.merged_id))
        .await?
        .pop();
    let holder = store::load_live(txn, &split.merge.merged_id).await?;
    Ok(
        merged.is_some_and(|m| m.profile.version == split.merged_version)
            && holder.is_some_and(|h| (h.profile.profile_id, h.profile.version) == split.holder),
    )
}
