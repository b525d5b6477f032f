//! The applier's memory of the profiles it wrote last: a bounded map of live records and
//! the identifiers they own, so a batch reads from the database only the identifiers no
//! recent batch touched.
//!
//! It is exact, never merely fresh enough: every transaction that takes the applier lock
//! (in any replica) advances a counter in the database, and the memory is trusted only
//! when the counter moved by exactly one since this process's own last commit, i.e. when
//! nobody else wrote in between. Anything else empties it.

use std::collections::HashMap;

use crate::identity::Ident;
use crate::resolve::Record;

/// What the applier remembers between batches; lives inside the applier lock.
#[derive(Debug)]
pub struct ApplierMemory {
    capacity: usize,
    /// The applier counter after this process's last commit, when the memory matches it.
    epoch: Option<i64>,
    /// Live profiles by id, with the batch number that last used them.
    records: HashMap<String, (Record, u64)>,
    /// Every identifier of every remembered profile.
    owners: HashMap<Ident, String>,
    batches: u64,
}

impl ApplierMemory {
    /// Remembers at most `capacity` profiles; zero remembers none.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            epoch: None,
            records: HashMap::new(),
            owners: HashMap::new(),
            batches: 0,
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.epoch = None;
        self.records.clear();
        self.owners.clear();
    }

    /// Called with the counter a transaction holding the applier lock advanced to: keeps
    /// the memory only if that transaction is the first since this process's last commit.
    pub fn begin(&mut self, epoch: i64) {
        if self.epoch.is_none_or(|last| last + 1 != epoch) {
            self.clear();
        }
        self.batches += 1;
    }

    /// Takes out the remembered profiles owning any of `idents`, and returns them with
    /// the identifiers no remembered profile owns (those must be looked up).
    pub fn take(&mut self, idents: &[Ident]) -> (Vec<Record>, Vec<Ident>) {
        let mut records = Vec::new();
        let mut unknown = Vec::new();
        for ident in idents {
            let Some(owner) = self.owners.get(ident) else {
                unknown.push(ident.clone());
                continue;
            };
            // Taken already for another identifier of the same profile.
            let Some((record, _)) = self.records.remove(owner) else {
                continue;
            };
            records.push(record);
        }
        // The identifiers of taken profiles stay mapped until `committed` replaces them;
        // drop them now so a failed batch leaves no identifier without its profile.
        for record in &records {
            for identity in &record.profile.identities {
                self.owners
                    .remove(&(identity.r#type.clone(), identity.value.clone()));
            }
        }
        (records, unknown)
    }

    /// After a batch committed at `epoch`: its profiles (`records`, every one it loaded
    /// or created) are remembered as written, merged-away ones forgotten.
    pub fn committed(&mut self, epoch: i64, records: impl IntoIterator<Item = Record>) {
        self.epoch = Some(epoch);
        if self.capacity == 0 {
            return;
        }
        for record in records {
            let id = record.profile.profile_id.clone();
            if let Some((old, _)) = self.records.remove(&id) {
                self.forget_identities(&old);
            }
            if record.merged_into.is_some() {
                continue;
            }
            for identity in &record.profile.identities {
                self.owners.insert(
                    (identity.r#type.clone(), identity.value.clone()),
                    id.clone(),
                );
            }
            self.records.insert(id, (record, self.batches));
        }
        self.evict();
    }

    fn forget_identities(&mut self, record: &Record) {
        for identity in &record.profile.identities {
            let key = (identity.r#type.clone(), identity.value.clone());
            if self.owners.get(&key) == Some(&record.profile.profile_id) {
                self.owners.remove(&key);
            }
        }
    }

    /// Over capacity: forgets the least recently used tenth, so eviction costs a sort
    /// per many batches rather than bookkeeping per profile.
    fn evict(&mut self) {
        if self.records.len() <= self.capacity {
            return;
        }
        let mut by_use: Vec<(u64, String)> = self
            .records
            .iter()
            .map(|(id, (_, used))| (*used, id.clone()))
            .collect();
        by_use.sort_unstable();
        let excess = self.records.len() - self.capacity + self.capacity / 10;
        for (_, id) in by_use.into_iter().take(excess) {
            if let Some((record, _)) = self.records.remove(&id) {
                self.forget_identities(&record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use waymark_proto::common::v1::Identity;
    use waymark_proto::profile::v1::Profile;

    use super::*;

    fn record(id: &str, idents: &[(&str, &str)]) -> Record {
        Record {
            profile: Profile {
                profile_id: id.into(),
                identities: idents
                    .iter()
                    .map(|(t, v)| Identity {
                        r#type: (*t).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                ..Profile::default()
            },
            created_us: 1,
            merged_into: None,
            aggregates: Default::default(),
        }
    }

    fn ident(t: &str, v: &str) -> Ident {
        (t.into(), v.into())
    }

    fn ids(records: &[Record]) -> Vec<&str> {
        let mut ids: Vec<&str> = records
            .iter()
            .map(|r| r.profile.profile_id.as_str())
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn remembered_profiles_come_back_and_other_identifiers_are_looked_up() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1);
        memory.committed(
            1,
            [
                record("p1", &[("user_id", "u1"), ("email", "a@x.io")]),
                record("p2", &[("user_id", "u2")]),
            ],
        );

        memory.begin(2);
        let (records, unknown) = memory.take(&[
            ident("email", "a@x.io"),
            ident("user_id", "u1"),
            ident("user_id", "u9"),
        ]);
        assert_eq!(
            ids(&records),
            ["p1"],
            "one profile, however many of its identifiers"
        );
        assert_eq!(unknown, [ident("user_id", "u9")]);
        // Taken until committed again: a failed batch must read it from the database.
        let (records, unknown) = memory.take(&[ident("user_id", "u1")]);
        assert!(records.is_empty());
        assert_eq!(unknown, [ident("user_id", "u1")]);
        let (records, _) = memory.take(&[ident("user_id", "u2")]);
        assert_eq!(ids(&records), ["p2"]);
    }

    #[test]
    fn a_write_by_anyone_else_in_between_forgets_everything() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(5);
        memory.committed(5, [record("p1", &[("user_id", "u1")])]);
        // Another transaction advanced the counter to 6; this one got 7.
        memory.begin(7);
        let (records, unknown) = memory.take(&[ident("user_id", "u1")]);
        assert!(records.is_empty());
        assert_eq!(unknown, [ident("user_id", "u1")]);
    }

    #[test]
    fn merged_profiles_are_forgotten_and_their_identifiers_belong_to_the_survivor() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1);
        memory.committed(
            1,
            [
                record("old", &[("user_id", "u1")]),
                record("new", &[("anonymous_id", "a1")]),
            ],
        );
        memory.begin(2);
        let (records, _) = memory.take(&[ident("user_id", "u1"), ident("anonymous_id", "a1")]);
        assert_eq!(records.len(), 2);
        let mut merged = record("new", &[("anonymous_id", "a1")]);
        merged.merged_into = Some("old".into());
        let survivor = record("old", &[("user_id", "u1"), ("anonymous_id", "a1")]);
        memory.committed(2, [survivor, merged]);

        memory.begin(3);
        let (records, unknown) = memory.take(&[ident("anonymous_id", "a1")]);
        assert_eq!(ids(&records), ["old"]);
        assert!(unknown.is_empty());
    }

    #[test]
    fn over_capacity_the_least_recently_used_go_first() {
        let mut memory = ApplierMemory::new(10);
        for batch in 0..20 {
            memory.begin(batch + 1);
            let id = format!("p{batch}");
            let user = format!("u{batch}");
            memory.committed(batch + 1, [record(&id, &[("user_id", &user)])]);
        }
        memory.begin(21);
        let all: Vec<Ident> = (0..20)
            .map(|b| ident("user_id", &format!("u{b}")))
            .collect();
        let (records, unknown) = memory.take(&all);
        assert!(records.len() <= 10, "{} remembered", records.len());
        assert!(ids(&records).contains(&"p19"), "the latest stays");
        assert!(unknown.contains(&ident("user_id", "u0")), "the oldest went");
        assert_eq!(records.len() + unknown.len(), 20);
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let mut memory = ApplierMemory::new(0);
        memory.begin(1);
        memory.committed(1, [record("p1", &[("user_id", "u1")])]);
        memory.begin(2);
        let (records, unknown) = memory.take(&[ident("user_id", "u1")]);
        assert!(records.is_empty());
        assert_eq!(unknown.len(), 1);
    }
}
