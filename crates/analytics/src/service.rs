//! The analytics core: takes delivered events (stored first, then applied to memory),
//! answers queries on a blocking thread under a budget, and keeps the journey maps.
//!
//! Deliveries store concurrently: each learns from the store which of its events are new
//! (the unique event id decides between two deliveries of one event), and applies only
//! those. Events commute in memory (each is placed by its time), and notices whose order
//! matters come from one producer, whose relay sends one delivery at a time.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use sea_orm::DatabaseConnection;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::{DeliverResponse, Event, RejectedEvent};

use futures::StreamExt;
use waymark_kit::secret::Secret;
use waymark_proto::profile::v1::UpdateTraitsRequest;
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;

use crate::error::AnalyticsError;
use crate::maps::CompiledMap;
use crate::model::{self, Incoming, Model, Notice};
use crate::scan::{Budget, Limits};
use crate::store::{self, Kind, NewEvent};

/// Memory is compacted again once this many events, or a quarter of those held, arrived
/// since the last time: amortised, each event is copied a few times at most.
const COMPACT_AFTER: u64 = 100_000;
/// Rows read per page when memory is rebuilt.
const REPLAY_PAGE: u32 = 20_000;

/// The analytics core; cheap to clone.
#[derive(Clone)]
pub struct Analytics {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    /// Queries read it on blocking threads; a delivery's writes wait for them without
    /// blocking the async workers.
    model: tokio::sync::RwLock<Model>,
    maps: RwLock<BTreeMap<String, Arc<CompiledMap>>>,
    erased: RwLock<HashSet<String>>,
    /// Deliveries hold its read side from their check against `erased` until they are
    /// applied. A delivery that erases, and a rebuild, hold its write side: no event of an
    /// erased profile is stored after the erasure, and a rebuild sees no delivery halfway.
    gate: tokio::sync::RwLock<()>,
    /// One delivery applies to memory at a time; compaction holds it from its layout to
    /// its install, so that nothing applied in between is lost, and a rebuild holds it
    /// while it replaces memory. Taken after `gate`, never before.
    writer: tokio::sync::Mutex<()>,
    /// Wakes the scrubber after an erasure.
    scrub_wanted: tokio::sync::Notify,
    /// Whether memory has been rebuilt from the store. Until then an answer from memory
    /// would be empty, and an erased profile's redelivered events could be stored again.
    loaded: AtomicBool,
    /// A delivery failed with its outcome unknown: memory may lack what it stored.
    stale: AtomicBool,
    /// Times memory was rebuilt from the store.
    rebuilds: std::sync::atomic::AtomicU64,
    /// When the last delivery was applied: memory is compacted once they pause.
    last_delivery: std::sync::Mutex<std::time::Instant>,
    limits: Limits,
    profiles: Option<ProfileWriter>,
    metrics: crate::metrics::Metrics,
}

/// Writes stages and stuck flags to profiles through `ProfileService.UpdateTraits`.
#[derive(Clone)]
pub struct ProfileWriter {
    client: ProfileServiceClient<tonic::transport::Channel>,
    admin_token: Option<Secret>,
}

impl ProfileWriter {
    /// A writer to the profile service at `endpoint` (connected lazily).
    pub fn new(endpoint: &str, admin_token: Option<Secret>) -> anyhow::Result<ProfileWriter> {
        Ok(ProfileWriter {
            client: ProfileServiceClient::new(waymark_kit::grpc::channel(endpoint)?),
            admin_token,
        })
    }

    async fn write(&self, w: &store::Written) -> Result<(), tonic::Status> {
        let traits = serde_json::Map::from_iter([
            (
                crate::maps::stage_trait(&w.map_id),
                serde_json::json!(w.stage_id),
            ),
            (
                crate::maps::stuck_trait(&w.map_id),
                serde_json::json!(w.stuck == 1),
            ),
        ]);
        let mut request = tonic::Request::new(UpdateTraitsRequest {
            profile_id: w.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(traits)),
            source: "analytics".into(),
        });
        request.set_timeout(std::time::Duration::from_secs(5));
        if let Some(token) = &self.admin_token {
            request
                .metadata_mut()
                .insert("authorization", waymark_kit::grpc::bearer(token));
        }
        self.client.clone().update_traits(request).await.map(|_| ())
    }
}

/// How often pending erasures are scrubbed when no erasure wakes the scrubber (after a
/// failed scrub, say).
const SCRUB_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Write-backs in flight at once.
const WRITE_BACK_CONCURRENCY: usize = 16;

/// How storing a delivery failed.
enum StoreFailure {
    /// Before the commit was sent: nothing was stored.
    RolledBack(sea_orm::DbErr),
    /// The commit itself: the batch may be stored.
    Unknown(sea_orm::DbErr),
}

fn lock_poisoned() -> AnalyticsError {
    AnalyticsError::Internal("a lock was poisoned by a panic".into())
}

impl Analytics {
    pub fn new(
        db: DatabaseConnection,
        limits: Limits,
        profiles: Option<ProfileWriter>,
    ) -> Analytics {
        Analytics {
            inner: Arc::new(Inner {
                db,
                model: tokio::sync::RwLock::new(Model::default()),
                maps: RwLock::new(BTreeMap::new()),
                erased: RwLock::new(HashSet::new()),
                gate: tokio::sync::RwLock::new(()),
                writer: tokio::sync::Mutex::new(()),
                scrub_wanted: tokio::sync::Notify::new(),
                loaded: AtomicBool::new(false),
                stale: AtomicBool::new(false),
                rebuilds: std::sync::atomic::AtomicU64::new(0),
                last_delivery: std::sync::Mutex::new(std::time::Instant::now()),
                limits,
                profiles,
                metrics: crate::metrics::Metrics::new(),
            }),
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Rebuilds memory from the store: the erased profiles, every event in arrival order,
    /// the journey maps.
    pub async fn prepare(&self) -> Result<(), AnalyticsError> {
        let _gate = self.inner.gate.write().await;
        self.rebuild().await
    }

    /// As [`Analytics::prepare`], with the gate's write side held. Events of profiles
    /// erased but not scrubbed yet are skipped. Takes the writer too: a compaction must
    /// not install a layout of the memory this replaces.
    async fn rebuild(&self) -> Result<(), AnalyticsError> {
        let _writer = self.inner.writer.lock().await;
        let started = std::time::Instant::now();
        let erased = store::erased(self.db()).await?;
        let mut fresh = Model::default();
        let mut after = 0;
        loop {
            let page = store::events_after(self.db(), after, REPLAY_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for row in page {
                let event = Event::decode(row.body.as_slice()).map_err(|e| {
                    AnalyticsError::Internal(format!(
                        "stored event {} does not decode: {e}",
                        row.seq
                    ))
                })?;
                if !erased.contains(&event.profile_id) {
                    apply(&mut fresh, model::classify(event));
                }
            }
        }
        fresh.compact();
        let maps = store::maps(self.db()).await?;
        let mut compiled = BTreeMap::new();
        for row in maps {
            let map = JourneyMap::decode(row.definition.as_slice()).map_err(|e| {
                AnalyticsError::Internal(format!("stored map {} does not decode: {e}", row.map_id))
            })?;
            compiled.insert(row.map_id, Arc::new(CompiledMap::new(map)));
        }
        tracing::info!(
            events = fresh.event_count(),
            profiles = fresh.slots().len(),
            took_ms = started.elapsed().as_millis() as u64,
            "analytics memory rebuilt"
        );
        *self.inner.model.write().await = fresh;
        *self.inner.maps.write().map_err(|_| lock_poisoned())? = compiled;
        *self.inner.erased.write().map_err(|_| lock_poisoned())? = erased;
        self.inner.loaded.store(true, Ordering::Release);
        self.inner.stale.store(false, Ordering::Release);
        self.inner.rebuilds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `Loading` until memory has been rebuilt from the store.
    fn loaded(&self) -> Result<(), AnalyticsError> {
        if self.inner.loaded.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(AnalyticsError::Loading)
        }
    }

    /// Stores `rows` (returning the ids new to the store) and erases `erase`, in one
    /// transaction. A failure before the commit was sent rolled everything back; one of
    /// the commit itself leaves the outcome unknown (the reply may be what was lost).
    async fn store(
        &self,
        rows: Vec<NewEvent>,
        erase: &[String],
    ) -> Result<HashSet<String>, StoreFailure> {
        let rolled_back = StoreFailure::RolledBack;
        let txn = waymark_kit::db::begin_write(self.db())
            .await
            .map_err(rolled_back)?;
        let fresh = store::insert_events(&txn, rows)
            .await
            .map_err(rolled_back)?;
        store::erase(&txn, erase, waymark_kit::time::now_micros())
            .await
            .map_err(rolled_back)?;
        txn.commit().await.map_err(StoreFailure::Unknown)?;
        Ok(fresh)
    }

    /// Stores and applies a delivered batch, once per event id.
    pub async fn deliver(&self, events: Vec<Event>) -> Result<DeliverResponse, AnalyticsError> {
        let mut response = DeliverResponse::default();
        let mut batch = Batch::prepare(events, &mut response);
        self.loaded()?;
        if self.inner.stale.load(Ordering::Acquire) {
            let _gate = self.inner.gate.write().await;
            if self.inner.stale.load(Ordering::Acquire) {
                self.rebuild().await?;
            }
        }
        let (_shared, _exclusive) = if batch.erase.is_empty() {
            (Some(self.inner.gate.read().await), None)
        } else {
            (None, Some(self.inner.gate.write().await))
        };
        let (rows, kept) = {
            let erased = self.inner.erased.read().map_err(|_| lock_poisoned())?;
            batch.unerased(&erased, &mut response)
        };
        let stored = rows.len();
        let fresh = match self.store(rows, &batch.erase).await {
            Ok(fresh) => fresh,
            Err(StoreFailure::RolledBack(e)) => return Err(e.into()),
            Err(StoreFailure::Unknown(e)) => {
                // A commit whose reply was lost may have stored the batch: its redelivery
                // would then find every event a duplicate and never apply it to memory.
                // Memory is rebuilt from the store before the next delivery instead.
                self.inner.stale.store(true, Ordering::Release);
                return Err(e.into());
            }
        };
        response.duplicates += u32::try_from(stored - fresh.len()).unwrap_or(u32::MAX);
        {
            let _writer = self.inner.writer.lock().await;
            let compact;
            {
                let mut model = self.inner.model.write().await;
                for (event_id, classified) in kept {
                    let deletion = matches!(classified, Incoming::Notice(Notice::Deleted { .. }));
                    if deletion || fresh.contains(&event_id) {
                        if !deletion {
                            response.applied += 1;
                        }
                        apply(&mut model, classified);
                    }
                }
                compact =
                    model.added_since_compaction() > COMPACT_AFTER.max(model.event_count() / 4);
            }
            if compact {
                self.compact().await?;
            }
        }
        *self
            .inner
            .last_delivery
            .lock()
            .map_err(|_| lock_poisoned())? = std::time::Instant::now();
        if !batch.erase.is_empty() {
            self.inner
                .erased
                .write()
                .map_err(|_| lock_poisoned())?
                .extend(batch.erase);
            self.inner.scrub_wanted.notify_one();
        }
        self.inner.metrics.delivered(&response);
        Ok(response)
    }

    /// Deletes the stored events of erased profiles, once at start and after every
    /// erasure (or every [`SCRUB_EVERY`], should a scrub fail), until `shutdown`.
    pub async fn run_scrub(&self, shutdown: waymark_kit::CancellationToken) {
        loop {
            let started = std::time::Instant::now();
            match store::scrub(self.db()).await {
                Ok(0) => {}
                Ok(profiles) => tracing::info!(
                    profiles,
                    took_ms = started.elapsed().as_millis() as u64,
                    "erased profiles' events scrubbed from the store"
                ),
                Err(error) => tracing::warn!(%error, "scrubbing erased profiles failed; retried"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.inner.scrub_wanted.notified() => {}
                () = tokio::time::sleep(SCRUB_EVERY) => {}
            }
        }
    }

    /// Lays memory out afresh (see [`Model::compact`]) while queries go on reading it; only
    /// putting the new arena in place waits for them. The caller holds the writer, so
    /// nothing is applied to memory meanwhile. The layout runs on a thread of its own at
    /// the lowest CPU priority: it yields the cores to queries and deliveries, and takes
    /// what they leave idle.
    async fn compact(&self) -> Result<(), AnalyticsError> {
        let started = std::time::Instant::now();
        let inner = self.inner.clone();
        let (done, layout) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("analytics-compaction".into())
            .spawn(move || {
                lowest_cpu_priority();
                let _ = done.send(inner.model.blocking_read().layout());
            })
            .map_err(|e| AnalyticsError::Internal(format!("compaction did not start: {e}")))?;
        let layout = layout
            .await
            .map_err(|_| AnalyticsError::Internal("compaction failed".into()))?;
        let mut model = self.inner.model.write().await;
        let replaced = model.install(layout);
        let events = model.event_count();
        drop(model);
        tokio::task::spawn_blocking(move || drop(replaced));
        tracing::info!(
            events,
            took_ms = started.elapsed().as_millis() as u64,
            "analytics memory compacted"
        );
        Ok(())
    }

    /// Times memory was rebuilt from the store: at start-up, and after a delivery whose
    /// commit outcome was unknown.
    pub fn rebuilds(&self) -> u64 {
        self.inner.rebuilds.load(Ordering::Relaxed)
    }

    /// Events applied since memory was last compacted.
    pub async fn uncompacted(&self) -> u64 {
        self.inner.model.read().await.added_since_compaction()
    }

    /// Compacts what arrived since the last compaction once deliveries pause for `quiet`,
    /// so queries scan one arena in order instead of scattered recent events; until
    /// `shutdown`.
    pub async fn run_compaction(
        &self,
        quiet: std::time::Duration,
        shutdown: waymark_kit::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(quiet) => {}
            }
            let Ok(_writer) = self.inner.writer.try_lock() else {
                continue;
            };
            let paused = self
                .inner
                .last_delivery
                .lock()
                .map(|at| at.elapsed() >= quiet)
                .unwrap_or(false);
            if !paused || self.uncompacted().await == 0 {
                continue;
            }
            if let Err(error) = self.compact().await {
                tracing::warn!(%error, "compacting analytics memory failed");
            }
        }
    }

    /// Runs `query` on a blocking thread over memory, under the query budget.
    async fn query<T, F>(&self, name: &'static str, query: F) -> Result<T, AnalyticsError>
    where
        T: Send + 'static,
        F: FnOnce(
                &Model,
                &BTreeMap<String, Arc<CompiledMap>>,
                &Budget,
            ) -> Result<T, AnalyticsError>
            + Send
            + 'static,
    {
        self.loaded()?;
        let inner = self.inner.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let budget = Budget::start(inner.limits);
            let maps = inner.maps.read().map_err(|_| lock_poisoned())?.clone();
            let model = inner.model.blocking_read();
            query(&model, &maps, &budget)
        })
        .await
        .map_err(|e| AnalyticsError::Internal(format!("query task failed: {e}")))?;
        self.inner
            .metrics
            .query(name, started.elapsed(), result.is_ok());
        result
    }

    pub async fn funnel(&self, req: GetFunnelRequest) -> Result<GetFunnelResponse, AnalyticsError> {
        self.query("funnel", move |model, _, budget| {
            crate::funnel::Funnel::compile(model, &req)?.run(model, budget)
        })
        .await
    }

    pub async fn paths(&self, req: GetPathsRequest) -> Result<GetPathsResponse, AnalyticsError> {
        self.query("paths", move |model, maps, budget| {
            crate::paths::Paths::compile(model, maps, &req)?.run(model, budget)
        })
        .await
    }

    /// Checks and saves a journey map.
    pub async fn put_map(&self, map: Option<JourneyMap>) -> Result<JourneyMap, AnalyticsError> {
        let map = map.ok_or_else(|| AnalyticsError::invalid("map", "is required"))?;
        crate::maps::validate(&map)?;
        self.loaded()?;
        store::put_map(
            self.db(),
            &map.id,
            map.encode_to_vec(),
            waymark_kit::time::now_micros(),
        )
        .await?;
        self.inner
            .maps
            .write()
            .map_err(|_| lock_poisoned())?
            .insert(map.id.clone(), Arc::new(CompiledMap::new(map.clone())));
        Ok(map)
    }

    pub fn map(&self, id: &str) -> Result<JourneyMap, AnalyticsError> {
        self.loaded()?;
        self.inner
            .maps
            .read()
            .map_err(|_| lock_poisoned())?
            .get(id)
            .map(|m| m.map.clone())
            .ok_or_else(|| AnalyticsError::NotFound(format!("no journey map {id:?}")))
    }

    pub fn maps(&self) -> Result<Vec<JourneyMap>, AnalyticsError> {
        self.loaded()?;
        Ok(self
            .inner
            .maps
            .read()
            .map_err(|_| lock_poisoned())?
            .values()
            .map(|m| m.map.clone())
            .collect())
    }

    pub async fn stage_distribution(
        &self,
        req: GetStageDistributionRequest,
    ) -> Result<GetStageDistributionResponse, AnalyticsError> {
        self.query("stages", move |model, maps, budget| {
            let map = find_map(maps, &req.map_id, "map_id")?;
            crate::maps::distribution(model, &map, waymark_kit::time::now_micros(), budget)
        })
        .await
    }

    pub async fn sla_breaches(
        &self,
        req: GetSlaBreachesRequest,
    ) -> Result<GetSlaBreachesResponse, AnalyticsError> {
        self.query("sla", move |model, maps, budget| {
            let map = find_map(maps, &req.map_id, "map_id")?;
            crate::maps::sla(model, &map, &req, waymark_kit::time::now_micros(), budget)
        })
        .await
    }

    pub async fn journey_report(
        &self,
        req: GetJourneyReportRequest,
    ) -> Result<GetJourneyReportResponse, AnalyticsError> {
        if req.journey_id.is_empty() {
            return Err(AnalyticsError::invalid("journey_id", "is required"));
        }
        let confidence = if req.confidence == 0.0 {
            0.95
        } else {
            req.confidence
        };
        if !(confidence > 0.0 && confidence < 1.0) {
            return Err(AnalyticsError::invalid(
                "confidence",
                "must be between 0 and 1, e.g. 0.95",
            ));
        }
        self.query("journey_report", move |model, _, _| {
            Ok(crate::journeys::report(model, &req, confidence))
        })
        .await
    }

    pub async fn cx_metrics(
        &self,
        req: GetCxMetricsRequest,
    ) -> Result<GetCxMetricsResponse, AnalyticsError> {
        self.query("cx", move |model, maps, budget| {
            crate::cx::metrics(model, maps, &req, budget)
        })
        .await
    }

    /// Each profile's stage and stuck flag on every map that writes back, where they
    /// differ from what was last written.
    pub async fn stage_changes(&self) -> Result<Vec<store::Written>, AnalyticsError> {
        let written = store::written(self.db()).await?;
        let now = waymark_kit::time::now_micros();
        self.query("write_back", move |model, maps, budget| {
            crate::maps::changes(model, maps, &written, now, budget)
        })
        .await
    }

    /// Writes changed stages and stuck flags to the profiles; returns how many profiles
    /// were written. A profile the profile service no longer knows (merged away, erased)
    /// is recorded as written so it is not retried; any other failure leaves the rest for
    /// the next round.
    pub async fn write_back(&self) -> Result<u64, AnalyticsError> {
        let Some(writer) = self.inner.profiles.clone() else {
            return Ok(0);
        };
        let changes = self.stage_changes().await?;
        let results: Vec<(store::Written, Result<(), tonic::Status>)> =
            futures::stream::iter(changes)
                .map(|w| {
                    let writer = writer.clone();
                    async move {
                        let result = writer.write(&w).await;
                        (w, result)
                    }
                })
                .buffer_unordered(WRITE_BACK_CONCURRENCY)
                .collect()
                .await;
        let mut done = Vec::new();
        let mut failed = 0;
        for (w, result) in results {
            match result {
                Ok(()) => done.push(w),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    self.inner.metrics.written_back("gone", 1);
                    done.push(w);
                }
                Err(s) => {
                    failed += 1;
                    tracing::warn!(code = ?s.code(), message = s.message(), map_id = %w.map_id, "write-back failed; retried next round");
                }
            }
        }
        store::record_written(self.db(), &done).await?;
        self.inner
            .metrics
            .written_back("written", done.len() as u64);
        self.inner.metrics.written_back("failed", failed);
        Ok(done.len() as u64)
    }

    /// Writes back every `every` until `shutdown`.
    pub async fn run_write_back(
        &self,
        every: std::time::Duration,
        shutdown: waymark_kit::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = self.write_back().await {
                tracing::warn!(%error, "write-back round failed");
            }
        }
    }
}

/// A map by id, or NOT_FOUND / INVALID_ARGUMENT naming `field`.
fn find_map(
    maps: &BTreeMap<String, Arc<CompiledMap>>,
    id: &str,
    field: &str,
) -> Result<Arc<CompiledMap>, AnalyticsError> {
    if id.is_empty() {
        return Err(AnalyticsError::invalid(field, "is required"));
    }
    maps.get(id)
        .cloned()
        .ok_or_else(|| AnalyticsError::NotFound(format!("no journey map {id:?}")))
}

/// A delivered batch made ready to store, before anything is locked: encoded, classified
/// and rid of repeats within it.
struct Batch {
    events: Vec<Prepared>,
    /// Profiles its `Profile Deleted` notices erase.
    erase: Vec<String>,
}

struct Prepared {
    row: Option<NewEvent>,
    event_id: String,
    classified: Incoming,
}

impl Batch {
    fn prepare(events: Vec<Event>, response: &mut DeliverResponse) -> Batch {
        let mut prepared = Vec::with_capacity(events.len());
        let mut erase = Vec::new();
        let mut ids = HashSet::new();
        for (i, event) in events.into_iter().enumerate() {
            if event.event_id.is_empty() {
                response.rejected.push(RejectedEvent {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    event_id: String::new(),
                    field: "event_id".into(),
                    reason: "is required: events are applied once by their id".into(),
                });
                continue;
            }
            if event.profile_id.is_empty() {
                response.unattributed += 1;
                continue;
            }
            let event = slim(event);
            let body = event.encode_to_vec();
            let (event_id, profile_id) = (event.event_id.clone(), event.profile_id.clone());
            let classified = model::classify(event);
            let kind = match &classified {
                Incoming::Customer(_) => Kind::Customer,
                Incoming::JourneyStep(_) => Kind::JourneyStep,
                Incoming::Notice(Notice::Deleted { profiles }) => {
                    erase.extend(profiles.iter().cloned());
                    prepared.push(Prepared {
                        row: None,
                        event_id,
                        classified,
                    });
                    continue;
                }
                Incoming::Notice(_) => Kind::Notice,
            };
            if !ids.insert(event_id.clone()) {
                response.duplicates += 1;
                continue;
            }
            prepared.push(Prepared {
                row: Some(NewEvent {
                    event_id: event_id.clone(),
                    profile_id,
                    kind,
                    body,
                }),
                event_id,
                classified,
            });
        }
        erase.sort();
        erase.dedup();
        Batch {
            events: prepared,
            erase,
        }
    }

    /// The rows to store and what to apply once stored, without the events of profiles
    /// already erased.
    fn unerased(
        &mut self,
        erased: &HashSet<String>,
        response: &mut DeliverResponse,
    ) -> (Vec<NewEvent>, Vec<(String, Incoming)>) {
        let mut rows = Vec::with_capacity(self.events.len());
        let mut kept = Vec::with_capacity(self.events.len());
        for p in self.events.drain(..) {
            if let Some(row) = p.row {
                if erased.contains(&row.profile_id) {
                    response.suppressed += 1;
                    continue;
                }
                rows.push(row);
            }
            kept.push((p.event_id, p.classified));
        }
        (rows, kept)
    }
}

/// Lowers the calling thread to the lowest CPU priority (nice 19) where the platform
/// allows it; a thread can always lower its own.
fn lowest_cpu_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(%error, "compaction runs at normal priority");
    }
}

/// An event without what analytics never reads (context, traits, integrations and the
/// client's clocks): a third of the bytes to store and to read back at start-up.
fn slim(event: Event) -> Event {
    Event {
        context: None,
        traits: None,
        integrations: None,
        original_timestamp: None,
        sent_at: None,
        ..event
    }
}

/// Applies one stored (or erasing) event to memory.
fn apply(model: &mut Model, incoming: Incoming) {
    match incoming {
        Incoming::Customer(event) => model.add_event(&event),
        Incoming::JourneyStep(event) => model.add_step(&event),
        Incoming::Notice(notice) => model.apply_notice(&notice),
    }
}
