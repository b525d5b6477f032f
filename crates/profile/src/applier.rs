//! The applier's memory of the profiles it wrote last: a bounded working set of live
//! records and the identifiers they own, so a batch reads from the database only the
//! identifiers no recent batch touched, and resolves in place rather than copying
//! profiles in and out.
//!
//! It is exact, never merely fresh enough: every transaction that takes the applier lock
//! (in any replica) advances a counter in the database, and the memory is trusted only
//! when the counter moved by exactly one since this process's own last batch, i.e. when
//! nobody else wrote in between. Anything else empties it, and so does a batch that
//! changed it in place but never committed (it failed, or its request was dropped).
//!
//! A batch may resolve *ahead*: in memory, before the batches resolved before it have
//! committed, so its resolution overlaps their writes. It then reserves the next counter
//! value and waits, at the database, behind them; it may commit only if every batch it
//! built on committed and the counter is the one it reserved. Until then its profiles
//! stay in memory (never evicted), so a later batch finds them there rather than reading
//! the database's older copy.

use tokio::sync::watch;
use waymark_kit::time::micros;

use crate::resolve::{Record, WorkingSet};

/// What the applier remembers between batches; lives inside the applier lock.
#[derive(Debug)]
pub struct ApplierMemory {
    capacity: usize,
    /// The counter after the last batch resolved here (committed, or still in flight),
    /// when the memory matches the database plus the batches in flight.
    epoch: Option<i64>,
    /// From `begin` to `committed` (or `reserve`): the set may hold changes no batch
    /// owns.
    open: bool,
    set: WorkingSet,
    /// Batches resolved ahead, oldest first, not yet known to have committed.
    in_flight: Vec<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    stage: Stage,
    /// The profiles it wrote: kept in memory until it settles.
    profiles: Vec<String>,
}

/// Where a batch resolved ahead is, as told to the batches resolved after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Resolved,
    /// It holds the database's applier lock: a batch after it queues behind it there.
    Locked,
    Committed,
    /// Rolled back, failed or dropped: the memory holds changes the database does not.
    Failed,
}

/// A batch's view of the stage of another batch resolved ahead (or of itself).
#[derive(Debug, Clone)]
pub struct Stage(watch::Receiver<Step>);

impl Stage {
    fn now(&self) -> Step {
        *self.0.borrow()
    }

    /// Waits until the batch holds the database lock or has settled; false when it
    /// failed.
    pub async fn locked(&mut self) -> bool {
        self.wait(|step| step != Step::Resolved).await != Step::Failed
    }

    /// Waits until the batch settled; true when it committed.
    pub async fn committed(&mut self) -> bool {
        self.wait(|step| matches!(step, Step::Committed | Step::Failed))
            .await
            == Step::Committed
    }

    async fn wait(&mut self, reached: impl Fn(Step) -> bool) -> Step {
        // A batch whose request was dropped never says how it ended: it failed.
        match self.0.wait_for(|step| reached(*step)).await {
            Ok(step) => *step,
            Err(_) => Step::Failed,
        }
    }
}

/// The batch's own side of its [`Stage`]; dropped without [`Settle::committed`], the
/// batch failed.
#[derive(Debug)]
pub struct Settle(watch::Sender<Step>);

impl Settle {
    /// The batch holds the database lock.
    pub fn locked(&self) {
        self.0.send_replace(Step::Locked);
    }

    /// The batch committed.
    pub fn committed(self) {
        self.0.send_replace(Step::Committed);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.0.send_if_modified(|step| {
            let unsettled = *step != Step::Committed;
            if unsettled {
                *step = Step::Failed;
            }
            unsettled
        });
    }
}

/// A batch resolved ahead, once it reserved its counter value.
#[derive(Debug)]
pub struct Reserved {
    /// What the batch changed.
    pub batch: WorkingSet,
    /// The batch resolved just before it, while that one has not settled: it must wait
    /// behind it and commit only if it committed.
    pub ahead: Option<Stage>,
    pub settle: Settle,
}

impl ApplierMemory {
    /// Remembers at most `capacity` profiles; zero remembers none.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            epoch: None,
            open: false,
            set: WorkingSet::default(),
            in_flight: Vec::new(),
        }
    }

    /// Forgets everything it remembers; batches in flight still have to settle.
    pub fn clear(&mut self) {
        self.epoch = None;
        self.open = false;
        self.set = WorkingSet::default();
    }

    /// The batches resolved ahead that have not settled, to wait for before taking the
    /// database lock: one that took it first would wait there for them while they wait
    /// for it to end.
    pub fn unsettled(&self) -> Vec<Stage> {
        self.in_flight.iter().map(|f| f.stage.clone()).collect()
    }

    /// Once every batch resolved ahead settled (`all_committed` when each committed):
    /// the memory holds what they wrote, or forgets it.
    pub fn settled(&mut self, all_committed: bool) {
        self.in_flight.clear();
        if !all_committed {
            self.clear();
        }
    }

    /// Called with the counter a transaction holding the applier lock advanced to (every
    /// batch resolved ahead having settled): keeps the memory only if that transaction is
    /// the first since this process's last batch and that batch was not left open.
    /// Returns the set to resolve the batch in.
    pub fn begin(&mut self, epoch: i64) -> &mut WorkingSet {
        if self.open || self.epoch.is_none_or(|last| last + 1 != epoch) {
            self.clear();
        }
        self.open = true;
        &mut self.set
    }

    /// For a batch that resolves ahead, before it takes the database lock: the counter
    /// value it must find there (it resolves in [`set`](Self::set)). None when there is nothing
    /// exact to build on (the memory is empty, was left open, holds nothing by
    /// configuration, or a batch in flight failed): the batch then resolves under the
    /// lock.
    pub fn begin_ahead(&mut self) -> Option<i64> {
        self.in_flight.retain(|f| f.stage.now() != Step::Committed);
        let failed = self.in_flight.iter().any(|f| f.stage.now() == Step::Failed);
        if self.open || failed {
            self.clear();
        }
        if self.capacity == 0 {
            return None;
        }
        let epoch = self.epoch? + 1;
        self.open = true;
        Some(epoch)
    }

    /// The set a batch begun ahead resolves in.
    pub fn set(&mut self) -> &mut WorkingSet {
        &mut self.set
    }

    /// A batch begun ahead that turned out to have nothing to resolve: the memory is as
    /// it was.
    pub fn abandon(&mut self) {
        self.open = false;
    }

    /// After a batch resolved ahead at `epoch`: it is in flight, holding `epoch`; keeps
    /// its profiles as written and hands back what it changed, with the batch to wait
    /// behind.
    pub fn reserve(&mut self, epoch: i64) -> Reserved {
        let ahead = self.in_flight.last().map(|f| f.stage.clone());
        let batch = self.finish(epoch);
        let (sender, receiver) = watch::channel(Step::Resolved);
        self.in_flight.push(InFlight {
            stage: Stage(receiver),
            profiles: batch.dirty.iter().cloned().collect(),
        });
        self.evict();
        Reserved {
            batch,
            ahead,
            settle: Settle(sender),
        }
    }

    /// After the batch begun last committed at `epoch`: keeps its profiles as written,
    /// forgets the merged-away ones, and hands back what the batch changed.
    pub fn committed(&mut self, epoch: i64) -> WorkingSet {
        let batch = self.finish(epoch);
        if self.capacity == 0 {
            self.set = WorkingSet::default();
        } else {
            self.evict();
        }
        batch
    }

    fn finish(&mut self, epoch: i64) -> WorkingSet {
        self.epoch = Some(epoch);
        self.open = false;
        let batch = self.set.take_batch();
        // Their identifiers already point at the survivors.
        for merge in &batch.merges {
            self.set.forget(&merge.merged_id);
        }
        batch
    }

    /// Over capacity: forgets the least recently written tenth, so eviction costs a sort
    /// per many batches rather than bookkeeping per profile. Profiles of batches in
    /// flight stay: the database may not hold them yet.
    fn evict(&mut self) {
        let records = &self.set.records;
        if records.len() <= self.capacity {
            return;
        }
        let pinned: std::collections::HashSet<&str> = self
            .in_flight
            .iter()
            .flat_map(|f| f.profiles.iter().map(String::as_str))
            .collect();
        let mut by_write: Vec<(i64, String)> = records
            .values()
            .filter(|r| !pinned.contains(r.profile.profile_id.as_str()))
            .map(|r| (last_written(r), r.profile.profile_id.clone()))
            .collect();
        by_write.sort_unstable();
        let excess = records.len() - self.capacity + self.capacity / 10;
        for (_, id) in by_write.into_iter().take(excess) {
            let Some(record) = self.set.forget(&id) else {
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
    use crate::resolve::MergeRecord;
    use waymark_kit::time::from_micros;

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
    fn evicted_profiles_take_their_pairs_kept_apart_with_them() {
        let mut memory = ApplierMemory::new(1);
        let set = memory.begin(1);
        set.add([
            record("old", 1, &[("user_id", "u1")]),
            record("new", 2, &[("user_id", "u2")]),
        ]);
        set.keep_apart([("old".to_owned(), "new".to_owned())]);
        memory.committed(1);
        let set = memory.begin(2);
        assert!(!set.records.contains_key("old"));
        assert!(!set.apart.contains_key("old"), "gone with its profile");
        assert!(set.apart["new"].contains("old"), "still kept apart from it");
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let mut memory = ApplierMemory::new(0);
        memory.begin(1).add([record("p1", 1, &[("user_id", "u1")])]);
        memory.committed(1);
        assert!(known(&mut memory, 2, &[ident("user_id", "u1")]).is_empty());
    }

    /// A memory holding `p1` (user `u1`) as committed at counter 1.
    fn committed_one() -> ApplierMemory {
        let mut memory = ApplierMemory::new(10);
        memory.begin(1).add([record("p1", 1, &[("user_id", "u1")])]);
        memory.committed(1);
        memory
    }

    /// Resolves a batch ahead that writes `id` (owning `user`); returns its reservation.
    fn resolve_ahead(memory: &mut ApplierMemory, id: &str, user: &str) -> (i64, Reserved) {
        let epoch = memory.begin_ahead().expect("the memory is exact");
        let set = memory.set();
        set.add([record(id, epoch, &[("user_id", user)])]);
        set.dirty.insert(id.into());
        (epoch, memory.reserve(epoch))
    }

    #[tokio::test]
    async fn batches_resolve_ahead_on_top_of_each_other_and_wait_in_order() {
        let mut memory = committed_one();
        let (first_epoch, first) = resolve_ahead(&mut memory, "p2", "u2");
        let (second_epoch, mut second) = resolve_ahead(&mut memory, "p3", "u3");
        assert_eq!((first_epoch, second_epoch), (2, 3));
        assert!(
            first.ahead.is_none(),
            "nothing was in flight before the first"
        );
        // The second sees the first's profile in memory, and waits behind it.
        assert!(memory.set().index.contains_key(&ident("user_id", "u2")));
        let mut behind = second.ahead.take().expect("the first is in flight");
        first.settle.locked();
        assert!(behind.locked().await);
        first.settle.committed();
        assert!(behind.committed().await);
    }

    #[tokio::test]
    async fn a_batch_ahead_that_fails_fails_the_ones_built_on_it_and_empties_the_memory() {
        let mut memory = committed_one();
        let (_, first) = resolve_ahead(&mut memory, "p2", "u2");
        let (_, mut second) = resolve_ahead(&mut memory, "p3", "u3");
        // Dropped without committing: its request went away, or it rolled back.
        drop(first.settle);
        let mut behind = second.ahead.take().expect("the first is in flight");
        assert!(!behind.locked().await);
        assert!(!behind.committed().await);
        // So the second gives up, as it would resolving again under the lock.
        drop(second.settle);
        assert!(memory.begin_ahead().is_none(), "nothing exact to build on");
        let mut all_committed = true;
        for mut stage in memory.unsettled() {
            all_committed &= stage.committed().await;
        }
        assert!(!all_committed);
        memory.settled(all_committed);
        assert!(known(&mut memory, 4, &[ident("user_id", "u1")]).is_empty());
    }

    #[test]
    fn nothing_resolves_ahead_without_an_exact_memory() {
        assert!(ApplierMemory::new(10).begin_ahead().is_none(), "empty");
        let mut open = committed_one();
        open.begin(2);
        assert!(
            open.begin_ahead().is_none(),
            "left open by a batch that never ended"
        );
        let mut none = ApplierMemory::new(0);
        none.begin(1);
        none.committed(1);
        assert!(
            none.begin_ahead().is_none(),
            "configured to remember nothing"
        );
    }

    #[test]
    fn profiles_of_batches_in_flight_are_never_evicted() {
        let mut memory = ApplierMemory::new(2);
        memory
            .begin(1)
            .add([record("old", 1, &[("user_id", "u0")])]);
        memory.committed(1);
        // Written long ago by the clock, yet still in flight: it must stay.
        let epoch = memory.begin_ahead().unwrap();
        memory
            .set()
            .add([record("in-flight", 0, &[("user_id", "u1")])]);
        memory.set().dirty.insert("in-flight".into());
        // Held, so none of them counts as failed.
        let mut reserved = vec![memory.reserve(epoch)];
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let epoch = memory.begin_ahead().unwrap();
            memory
                .set()
                .add([record(id, 10 + i as i64, &[("user_id", id)])]);
            reserved.push(memory.reserve(epoch));
        }
        assert!(memory.set().records.contains_key("in-flight"));
        assert!(!memory.set().records.contains_key("old"));
    }
}
