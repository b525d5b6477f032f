//! The in-process backend of `waymark dev` and tests without Redis.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::Profile;

/// A cached profile, or a tombstone (`None`) holding its last version.
struct MemoryEntry {
    version: u64,
    profile: Option<Profile>,
    expires: Instant,
    /// Which write put it here; older slots in the write order are stale.
    write: u64,
}

/// The in-process backend: Redis's semantics (versions never go back, TTL on every key)
/// within a bounded number of entries, evicting the least recently written first.
pub(crate) struct MemoryBackend {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<String, MemoryEntry>,
    /// Identifier → (profile id, expiry).
    identities: HashMap<(String, String), (String, Instant)>,
    /// Profile ids in write order; a slot whose write number no longer matches its
    /// entry's was superseded and is skipped, so each write costs O(1) amortised.
    order: VecDeque<(u64, String)>,
    writes: u64,
}

impl MemoryBackend {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            entries: HashMap::new(),
            identities: HashMap::new(),
            order: VecDeque::new(),
            writes: 0,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.identities.clear();
        self.order.clear();
    }

    pub(crate) fn get_profile(&mut self, id: &str) -> Option<Profile> {
        let entry = self.entries.get(id)?;
        if entry.expires <= Instant::now() {
            self.remove(id);
            return None;
        }
        entry.profile.clone()
    }

    pub(crate) fn resolve(&mut self, id_type: &str, value: &str) -> Option<String> {
        let key = (id_type.to_owned(), value.to_owned());
        let (id, expires) = self.identities.get(&key)?;
        if *expires <= Instant::now() {
            self.identities.remove(&key);
            return None;
        }
        Some(id.clone())
    }

    pub(crate) fn put(&mut self, profile: &Profile, identities: &[&Identity]) {
        if !self.newer(&profile.profile_id, profile.version) {
            return;
        }
        let expires = Instant::now() + self.ttl;
        for identity in identities {
            self.identities.insert(
                (identity.r#type.clone(), identity.value.clone()),
                (profile.profile_id.clone(), expires),
            );
        }
        self.store(&profile.profile_id, profile.version, Some(profile.clone()));
    }

    pub(crate) fn remember_identity(&mut self, id_type: &str, value: &str, profile_id: &str) {
        let key = (id_type.to_owned(), value.to_owned());
        if self.resolve(id_type, value).is_none() {
            self.identities
                .insert(key, (profile_id.to_owned(), Instant::now() + self.ttl));
        }
    }

    pub(crate) fn forget_identities(&mut self, identities: &[(String, String)]) {
        for key in identities {
            self.identities.remove(key);
        }
    }

    pub(crate) fn invalidate(
        &mut self,
        profile_id: &str,
        version: u64,
        identities: &[(String, String)],
    ) {
        if !self.newer(profile_id, version) {
            return;
        }
        for (t, v) in identities {
            let key = (t.clone(), v.clone());
            if self
                .identities
                .get(&key)
                .is_some_and(|(id, _)| id == profile_id)
            {
                self.identities.remove(&key);
            }
        }
        self.store(profile_id, version, None);
    }

    /// Makes `version` and every older one of `profile_id` stale, if it holds the profile:
    /// a profile held at such a version becomes a tombstone, so later writes need a newer
    /// version.
    pub(crate) fn forget_up_to(&mut self, profile_id: &str, version: u64) {
        if self
            .entries
            .get(profile_id)
            .is_some_and(|e| e.expires > Instant::now() && e.version <= version)
        {
            self.remove(profile_id);
            self.store(profile_id, version, None);
        }
    }

    /// Whether `version` is newer than the live entry of `id` (expired ones count as gone).
    fn newer(&self, id: &str, version: u64) -> bool {
        self.entries
            .get(id)
            .is_none_or(|e| e.expires <= Instant::now() || e.version < version)
    }

    fn store(&mut self, id: &str, version: u64, profile: Option<Profile>) {
        self.writes += 1;
        let entry = MemoryEntry {
            version,
            profile,
            expires: Instant::now() + self.ttl,
            write: self.writes,
        };
        self.entries.insert(id.to_owned(), entry);
        self.order.push_back((self.writes, id.to_owned()));
        while self.entries.len() > self.capacity {
            let Some((write, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&oldest).is_some_and(|e| e.write == write) {
                self.remove(&oldest);
            }
        }
        // Superseded slots pile up when the same profiles are rewritten; compact them.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order
                .retain(|(write, id)| entries.get(id).is_some_and(|e| e.write == *write));
        }
    }

    /// Drops an entry and the identifiers pointing at it.
    pub(crate) fn remove(&mut self, id: &str) {
        if let Some(MemoryEntry {
            profile: Some(profile),
            ..
        }) = self.entries.remove(id)
        {
            for identity in &profile.identities {
                let key = (identity.r#type.clone(), identity.value.clone());
                if self
                    .identities
                    .get(&key)
                    .is_some_and(|(owner, _)| owner == id)
                {
                    self.identities.remove(&key);
                }
            }
        }
    }
}
