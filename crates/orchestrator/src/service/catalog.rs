//! The journeys in memory: compiled versions, and an index of live journeys by the event
//! that enters them, so an event finds its journeys without scanning them all. Replicas
//! notice each other's changes by a stamp of the journeys table, checked at most once a
//! second before a delivery.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sea_orm::{DatabaseConnection, DbErr};
use waymark_proto::orchestration::v1 as pb;

use crate::journey::{self, Journey};
use crate::policy::Policy;
use crate::store;

/// How stale the in-memory journeys may get before a delivery checks the stamp.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// The running journeys at one moment.
#[derive(Default)]
pub struct Snapshot {
    /// Live (not paused) journeys' live versions, by trigger event name.
    by_trigger: HashMap<String, Vec<Arc<Journey>>>,
    /// Journey id to status, for running journeys.
    status: HashMap<String, pb::JourneyStatus>,
    /// Every compiled live version, by journey id.
    live: HashMap<String, Arc<Journey>>,
    /// Event names any running journey enters on or waits for.
    listened: HashSet<String>,
}

impl Snapshot {
    /// Live journeys that `event_name` enters.
    pub fn entries(&self, event_name: &str) -> &[Arc<Journey>] {
        self.by_trigger.get(event_name).map_or(&[], Vec::as_slice)
    }

    /// Whether any running journey reacts to `event_name`. Enrollments on older versions
    /// may wait for other names too; their profiles are then read inside the transaction.
    pub fn is_listened(&self, event_name: &str) -> bool {
        self.listened.contains(event_name)
    }

    pub fn is_paused(&self, journey_id: &str) -> bool {
        self.status.get(journey_id) == Some(&pb::JourneyStatus::Paused)
    }

    /// A live version, when it is the one asked for.
    pub fn version(&self, journey_id: &str, version: u32) -> Option<Arc<Journey>> {
        self.live
            .get(journey_id)
            .filter(|j| j.version == version)
            .cloned()
    }
}

/// The journeys and the contact policy, shared by every task of the service.
pub struct Catalog {
    db: DatabaseConnection,
    snapshot: RwLock<Arc<Snapshot>>,
    policy: RwLock<Arc<Policy>>,
    /// Compiled versions of any journey, loaded on demand (enrollments on old versions).
    versions: Mutex<HashMap<(String, u32), Arc<Journey>>>,
    checked: Mutex<(Instant, (i64, i64, i64))>,
}

impl Catalog {
    pub fn new(db: DatabaseConnection) -> Catalog {
        Catalog {
            db,
            snapshot: RwLock::default(),
            policy: RwLock::new(Arc::new(Policy::default())),
            versions: Mutex::default(),
            checked: Mutex::new((Instant::now(), (-1, -1, -1))),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads when another replica (or this one) changed a journey or the policy and
    /// the last check is older than a second.
    pub async fn refresh_if_stale(&self) -> Result<(), DbErr> {
        {
            let checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.0.elapsed() < STALE_AFTER && checked.1.0 >= 0 {
                return Ok(());
            }
        }
        let stamp = store::catalog_stamp(&self.db).await?;
        let unchanged = self.checked.lock().unwrap_or_else(|e| e.into_inner()).1 == stamp;
        if unchanged {
            *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), stamp);
            return Ok(());
        }
        self.reload().await
    }

    /// Loads every running journey and the policy now.
    pub async fn reload(&self) -> Result<(), DbErr> {
        let stamp = store::catalog_stamp(&self.db).await?;
        let mut next = Snapshot::default();
        for (row, definition) in store::running(&self.db).await? {
            let version = u32::try_from(row.live_version).unwrap_or(0);
            let Some(journey) = self.compiled(&definition, version) else {
                continue;
            };
            let status = pb::JourneyStatus::try_from(i32::from(row.status)).unwrap_or_default();
            if status == pb::JourneyStatus::Live {
                next.by_trigger
                    .entry(journey.entry.trigger.event.clone())
                    .or_default()
                    .push(journey.clone());
            }
            next.listened.insert(journey.entry.trigger.event.clone());
            next.listened.extend(journey.listens_to.iter().cloned());
            next.status.insert(row.journey_id.clone(), status);
            next.live.insert(row.journey_id, journey);
        }
        if !next.listened.is_empty() {
            // It moves local-time delays to a customer's new time zone.
            next.listened.insert("Trait Changed".to_owned());
        }
        // Higher priority journeys enter first, so their messages meet caps first.
        for list in next.by_trigger.values_mut() {
            list.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then(a.journey_id.cmp(&b.journey_id))
            });
        }
        let policy = match store::contact_policy(&self.db).await? {
            None => Policy::default(),
            Some(p) => Policy::compile(&p).unwrap_or_else(|(field, problem)| {
                tracing::error!(%field, %problem, "the stored contact policy does not compile; using none");
                Policy::default()
            }),
        };
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), stamp);
        Ok(())
    }

    /// `definition` compiled as `version`, from the cache when it was compiled before.
    fn compiled(&self, definition: &pb::JourneyDefinition, version: u32) -> Option<Arc<Journey>> {
        let key = (definition.journey_id.clone(), version);
        if let Some(j) = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(j.clone());
        }
        match journey::compile(definition, version) {
            Ok(j) => {
                let j = Arc::new(j);
                self.versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, j.clone());
                Some(j)
            }
            Err(problems) => {
                tracing::error!(journey = %definition.journey_id, version, ?problems, "a published version does not compile");
                None
            }
        }
    }

    /// The compiled versions `wanted` names, loading those not in memory.
    pub async fn versions_for(
        &self,
        wanted: &[(String, u32)],
    ) -> Result<HashMap<(String, u32), Arc<Journey>>, DbErr> {
        let mut out = HashMap::new();
        for (journey_id, version) in wanted {
            let (journey_id, version) = (journey_id.as_str(), *version);
            let key = (journey_id.to_owned(), version);
            if out.contains_key(&key) {
                continue;
            }
            let cached = self
                .versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            let journey = match cached {
                Some(j) => Some(j),
                None => match store::version(&self.db, journey_id, version).await? {
                    Some(definition) => self.compiled(&definition, version),
                    None => None,
                },
            };
            if let Some(j) = journey {
                out.insert(key, j);
            }
        }
        Ok(out)
    }

    /// One compiled version.
    pub async fn version(
        &self,
        journey_id: &str,
        version: u32,
    ) -> Result<Option<Arc<Journey>>, DbErr> {
        Ok(self
            .versions_for(&[(journey_id.to_owned(), version)])
            .await?
            .remove(&(journey_id.to_owned(), version)))
    }
}
