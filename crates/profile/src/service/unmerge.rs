//! Unmerge: splits a merged profile back out of the profile that absorbed it.
//!
//! Both sides are rebuilt by replaying their own events in event-time order, so traits,
//! computed traits, emotion and consent come out as if the merge had never happened. An
//! event belongs to the profile it was first applied to (its origin): events applied to
//! the survivor after the merge stay with the survivor, even if they carried one of the
//! merged profile's identifiers. Identifiers go back to the side that held them at the
//! time of the merge. The next event linking both sides again merges them again.

use std::collections::HashSet;

use sea_orm::TransactionTrait;
use waymark_kit::db::now_micros;
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::Profile;

use super::{ProfileError, Profiles, invalid, notice, segments, string_value};
use crate::aggregate::AggregateState;
use crate::identity::Ident;
use crate::model::{apply_event, from_micros};
use crate::resolve::{Record, Rules};
use crate::store;

/// A profile rebuilt from scratch: id, creation time, version and the memberships it is
/// listed with kept (so segment changes come out as transitions), everything else from
/// `events`.
fn rebuild(
    record: &Record,
    identities: Vec<Ident>,
    events: &[Event],
    rules: &Rules,
    now_us: i64,
) -> Record {
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
    let mut rebuilt = Record {
        profile,
        created_us: record.created_us,
        merged_into: None,
        aggregates: AggregateState::default(),
    };
    for event in events {
        apply_event(&mut rebuilt.profile, event, &rules.emotion);
        rebuilt.observe_aggregates(&rules.aggregates, event, now_us);
    }
    rebuilt
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
    pub async fn unmerge(&self, merge_id: &str) -> Result<(Profile, Profile), ProfileError> {
        if merge_id.is_empty() {
            return Err(invalid("merge_id", "is required"));
        }
        let _guard = self.exclusive_applier().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        let merge = store::merge_by_id(&txn, merge_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no merge {merge_id:?}")))?;
        if merge.unmerged_at.is_some() {
            return Err(ProfileError::FailedPrecondition(format!(
                "merge {merge_id:?} was already undone"
            )));
        }
        let merged = store::load_records(&txn, std::slice::from_ref(&merge.merged_id))
            .await?
            .pop()
            .ok_or_else(|| {
                ProfileError::NotFound(format!("profile {:?} was erased", merge.merged_id))
            })?;
        let holder = store::load_live(&txn, &merge.merged_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound("the merged profile was erased".into()))?;

        let moved = store::merge_tree(&txn, &merge.merged_id).await?;
        let moved_set: HashSet<&String> = moved.iter().collect();
        let staying: Vec<String> = store::merge_tree(&txn, &holder.profile.profile_id)
            .await?
            .into_iter()
            .filter(|id| !moved_set.contains(id))
            .collect();
        let moved_idents = idents(&merged.profile);
        let moved_ident_set: HashSet<&Ident> = moved_idents.iter().collect();
        let staying_idents: Vec<Ident> = idents(&holder.profile)
            .into_iter()
            .filter(|i| !moved_ident_set.contains(i))
            .collect();
        let events_of = |origins: Vec<(String, Event)>| -> Vec<Event> {
            origins.into_iter().map(|(_, e)| e).collect()
        };
        let moved_events = events_of(store::events_of(&txn, &moved).await?);
        let staying_events = events_of(store::events_of(&txn, &staying).await?);

        let mut restored = rebuild(
            &merged,
            moved_idents.clone(),
            &moved_events,
            &self.inner.rules,
            now,
        );
        let mut survivor = rebuild(
            &holder,
            staying_idents,
            &staying_events,
            &self.inner.rules,
            now,
        );
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
        store::save_records(
            &txn,
            &[&survivor, &restored],
            &self.inner.rules.emotion,
            now,
        )
        .await?;
        segments::save_transitions(&txn, &transitions, now).await?;
        store::assign_identities(&txn, &moved_idents, &restored.profile.profile_id).await?;
        store::move_timeline(&txn, &moved, &restored.profile.profile_id).await?;
        store::mark_unmerged(&txn, merge_id, now).await?;
        let payloads: Vec<Vec<u8>> = emitted.iter().map(prost::Message::encode_to_vec).collect();
        let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        waymark_kit::outbox::enqueue(&txn, &self.inner.consumers, &payloads).await?;
        txn.commit().await?;
        self.inner.wakeup.notify();
        self.inner.metrics.emitted(&emitted);
        self.inner.cache.put(&survivor.profile).await;
        self.inner.cache.put(&restored.profile).await;
        tracing::info!(
            merge_id,
            survivor = %survivor.profile.profile_id,
            restored = %restored.profile.profile_id,
            moved_events = moved_events.len(),
            segment_changes = transitions.len(),
            "merge undone"
        );
        Ok((survivor.profile, restored.profile))
    }
}
