//! The applier's memory of the profiles it wrote last: a bounded working set of live
//! records and the identifiers they own, so a batch reads from the database only the
//! identifiers no recent batch touched, and resolves in place rather than copying
//! profiles in and out.
//!
//! It is exact, never merely fresh enough: every transaction that takes the applier lock
//! (in any replica) advances a counter in the database, and the memory is trusted only
//! when the counter moved by exactly one since this process's own last commit, i.e. when
//! nobody else wrote in between. Anything else empties it, and so does a batch that
//! changed it in place but never committed (it failed, or its request was dropped).

use crate::model::micros;
use crate::resolve::{Record, WorkingSet};

/// What the applier remembers between batches; lives inside the applier lock.
#[derive(Debug)]
pub struct ApplierMemory {
    capacity: usize,
    /// The applier counter after this process's last commit, when the memory matches it.
    epoch: Option<i64>,
    /// From `begin` to `committed`: the set may hold changes the database does not.
    open: bool,
    set: WorkingSet,
}

impl ApplierMemory {
    /// Remembers at most `capacity` profiles; zero remembers none.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            epoch: None,
            open: false,
            set: WorkingSet::default(),
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.epoch = None;
        self.open = false;
        self.set = WorkingSet::default();
    }

    /// Called with the counter a transaction holding the applier lock advanced to: keeps
    /// the memory only if that transaction is the first since this process's last commit
    /// and the batch before it committed. Returns the set to resolve the batch in.
    pub fn begin(&mut self, epoch: i64) -> &mut WorkingSet {
        if self.open || self.epoch.is_none_or(|last| last + 1 != epoch) {
            self.clear();
        }
        self.open = true;
        &mut self.set
    }

    /// After the batch begun last committed at `epoch`: keeps its profiles as written,
    /// forgets the merged-away ones, and hands back what the batch changed.
    pub fn committed(&mut self, epoch: i64) -> WorkingSet {
        self.epoch = Some(epoch);
        self.open = false;
        let batch = self.set.take_batch();
        if self.capacity == 0 {
            self.set = WorkingSet::default();
            return batch;
        }
        // Their identifiers already point at the survivors.
        for merge in &batch.merges {
            self.set.records.remove(&merge.merged_id);
        }
        self.evict();
        batch
    }

    /// Over capacity: forgets the least recently written tenth, so eviction costs a sort
    /// per many batches rather than bookkeeping per profile.
    fn evict(&mut self) {
        let records = &mut self.set.records;
        if records.len() <= self.capacity {
            return;
        }
        let mut by_write: Vec<(i64, String)> = records
            .values()
            .map(|r| (last_written(r), r.profile.profile_id.clone()))
            .collect();
        by_write.sort_unstable();
        let excess = records.len() - self.capacity + self.capacity / 10;
        for (_, id) in by_write.into_iter().take(excess) {
            let Some(record) = records.remove(&id) else {
                continue;
            };
            for identity in &record.profile.identities {
                let key = (identity.r#type.clone(), identity.value.clone());
                if self.set.index.get(&key) == Some(&id) {
                    self.set.index.remove(&key);
                }
            }
        }
    }
}

fn last_written(record: &Record) -> i64 {
    record.profile.updated_at.as_ref().map_or(0, micros)
}

#[cfg(test)]
mod tests {
    use waymark_proto::common::v1::Identity;
    use waymark_proto::profile::v1::Profile;

    use super::*;
    use crate::identity::Ident;
    use crate::model::from_micros;
    use crate::resolve::MergeRecord;

    fn record(id: &str, written_us: i64, idents: &[(&str, &str)]) -> Record {
        Record {
            profile: Profile {
                profile_id: id.into(),
                updated_at: Some(from_micros(written_us)),
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

    /// Which of `idents` the memory knows, after beginning a batch at `epoch`.
    fn known(memory: &mut ApplierMemory, epoch: i64, idents: &[Ident]) -> Vec<Ident> {
        let set = memory.begin(epoch);
        let unknown = set.unknown(idents);
        idents
            .iter()
            .filter(|i| !unknown.contains(i))
            .cloned()
            .collect()
    }

    #[test]
    fn committed_profiles_are_remembered_and_other_identifiers_are_looked_up() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1).add([
            record("p1", 1, &[("user_id", "u1"), ("email", "a@x.io")]),
            record("p2", 1, &[("user_id", "u2")]),
        ]);
        memory.committed(1);

        let set = memory.begin(2);
        assert_eq!(
            set.unknown(&[ident("email", "a@x.io"), ident("user_id", "u9")]),
            [ident("user_id", "u9")]
        );
        assert_eq!(set.index[&ident("email", "a@x.io")], "p1");
        assert!(set.records.contains_key("p2"));
    }

    #[test]
    fn a_write_by_anyone_else_in_between_forgets_everything() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(5).add([record("p1", 1, &[("user_id", "u1")])]);
        memory.committed(5);
        // Another transaction advanced the counter to 6; this one got 7.
        assert!(known(&mut memory, 7, &[ident("user_id", "u1")]).is_empty());
    }

    #[test]
    fn a_batch_that_never_committed_forgets_everything() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1).add([record("p1", 1, &[("user_id", "u1")])]);
        memory.committed(1);
        // Changed in place, then rolled back (or dropped): the counter went back too.
        memory.begin(2).add([record("p2", 2, &[("user_id", "u2")])]);
        assert!(known(&mut memory, 2, &[ident("user_id", "u1")]).is_empty());
    }

    #[test]
    fn merged_profiles_are_forgotten_and_their_identifiers_belong_to_the_survivor() {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1).add([
            record("old", 1, &[("user_id", "u1")]),
            record("new", 1, &[("anonymous_id", "a1")]),
        ]);
        memory.committed(1);
        let set = memory.begin(2);
        set.records.get_mut("new").unwrap().merged_into = Some("old".into());
        set.index.insert(ident("anonymous_id", "a1"), "old".into());
        set.merges.push(MergeRecord {
            merge_id: "m1".into(),
            survivor_id: "old".into(),
            merged_id: "new".into(),
            event_id: "e1".into(),
            evidence: Vec::new(),
            at_us: 2,
        });
        let batch = memory.committed(2);
        assert_eq!(batch.merges.len(), 1, "the batch's changes are handed back");

        let set = memory.begin(3);
        assert!(set.merges.is_empty());
        assert!(!set.records.contains_key("new"));
        assert_eq!(set.index[&ident("anonymous_id", "a1")], "old");
    }

    #[test]
    fn over_capacity_the_least_recently_written_go_first() {
        let mut memory = ApplierMemory::new(10);
        for batch in 0..20 {
            let id = format!("p{batch}");
            let user = format!("u{batch}");
            memory
                .begin(batch + 1)
                .add([record(&id, batch, &[("user_id", &user)])]);
            memory.committed(batch + 1);
        }
        let all: Vec<Ident> = (0..20)
            .map(|b| ident("user_id", &format!("u{b}")))
            .collect();
        let known = known(&mut memory, 21, &all);
        assert!(known.len() <= 10, "{} remembered", known.len());
        assert!(known.contains(&ident("user_id", "u19")), "the latest stays");
        assert!(!known.contains(&ident("user_id", "u0")), "the oldest went");
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let mut memory = ApplierMemory::new(0);
        memory.begin(1).add([record("p1", 1, &[("user_id", "u1")])]);
        memory.committed(1);
        assert!(known(&mut memory, 2, &[ident("user_id", "u1")]).is_empty());
    }
}
