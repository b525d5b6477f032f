//! Durable timers: an enrollment's `waiting_until` is its timer. Due ones are claimed
//! under a lease (replicas skip each other's claims) and each fires in its own
//! transaction, guarded by the enrollment's step number, so a timer fires once even when
//! a lease expires mid-step and another replica takes it.

use std::time::Duration;

use sea_orm::DbErr;
use waymark_kit::CancellationToken;

use super::Orchestrator;
use crate::engine::{self, Effects, Env};
use crate::model::Enrollment;
use crate::store::{self, Changed};

/// Timers claimed per round.
const CLAIM: u64 = 200;
/// The longest the loop sleeps without looking: timers another replica set, and a test's
/// manual clock, are noticed within it.
const IDLE: Duration = Duration::from_millis(200);

impl Orchestrator {
    /// Fires every wait due now; returns how many fired.
    pub async fn fire_due(&self) -> Result<usize, DbErr> {
        let mut fired = 0;
        loop {
            let now = self.now();
            let claimed =
                store::claim_due(self.db(), now, self.inner.settings.lease_us, CLAIM).await?;
            let n = claimed.len();
            for enrollment in claimed {
                match self.fire(enrollment).await {
                    Ok(true) => fired += 1,
                    Ok(false) => {}
                    // Another replica moved it first: its step stands.
                    Err(DbErr::RecordNotUpdated) => {}
                    Err(e) => return Err(e),
                }
            }
            if n < CLAIM as usize {
                return Ok(fired);
            }
        }
    }

    #[tracing::instrument(skip_all, fields(enrollment = %enrollment.enrollment_id, journey = %enrollment.journey_id, node = %enrollment.node_id))]
    async fn fire(&self, mut enrollment: Enrollment) -> Result<bool, DbErr> {
        let Some(journey) = self
            .inner
            .catalog
            .version(&enrollment.journey_id, enrollment.version)
            .await?
        else {
            return Ok(false);
        };
        let policy = self.inner.catalog.policy();
        let env = Env {
            now_us: self.now(),
            policy: &policy,
            emotion: self.inner.settings.emotion,
        };
        let ids = [enrollment.profile_id.clone()];
        let prefetched = self.profiles(&ids).await;
        let txn = waymark_kit::db::begin_write(self.db()).await?;
        let mut facts = self.facts(&txn, &ids, prefetched, &env).await?;
        let Some(f) = facts.get_mut(&enrollment.profile_id) else {
            return Ok(false);
        };
        let loaded = enrollment.seq;
        let mut fx = Effects::default();
        if !engine::on_timer(&journey, &mut enrollment, f, &env, &mut fx) {
            return Ok(false);
        }
        let changed = [Changed {
            enrollment: &enrollment,
            loaded_seq: Some(loaded),
        }];
        self.commit_run(&txn, &changed, &fx).await?;
        txn.commit().await?;
        self.after_commit(&changed, &fx);
        Ok(true)
    }

    /// Fires due waits until `shutdown`, sleeping until the next one (or a wake-up).
    pub async fn run_timers(&self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.fire_due().await {
                tracing::warn!(%error, "firing due waits failed");
            }
            let next = store::next_due(self.db()).await.ok().flatten();
            let sleep = super::sleep_until(next, self.now(), IDLE);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.inner.timers.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Forgets the ids of applied events once no redelivery can come, every minute
    /// until `shutdown`.
    pub async fn run_housekeeping(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before = self
                .now()
                .saturating_sub(self.inner.settings.dedupe_window_us);
            match store::forget_applied(self.db(), before).await {
                Ok(n) if n > 0 => tracing::debug!(forgotten = n, "applied event ids forgotten"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "forgetting applied event ids failed"),
            }
        }
    }

    /// The webhook an enrollment waits for settled: move it on (in its own transaction,
    /// guarded like a timer).
    pub(super) async fn action_settled(
        &self,
        enrollment_id: &str,
        action_id: &str,
        outcome: Result<(), &str>,
    ) -> Result<(), DbErr> {
        for _ in 0..5 {
            let Some(mut enrollment) = store::enrollment(self.db(), enrollment_id).await? else {
                return Ok(());
            };
            let Some(journey) = self
                .inner
                .catalog
                .version(&enrollment.journey_id, enrollment.version)
                .await?
            else {
                return Ok(());
            };
            let policy = self.inner.catalog.policy();
            let env = Env {
                now_us: self.now(),
                policy: &policy,
                emotion: self.inner.settings.emotion,
            };
            let ids = [enrollment.profile_id.clone()];
            let prefetched = self.profiles(&ids).await;
            let txn = waymark_kit::db::begin_write(self.db()).await?;
            let mut facts = self.facts(&txn, &ids, prefetched, &env).await?;
            let Some(f) = facts.get_mut(&enrollment.profile_id) else {
                return Ok(());
            };
            let loaded = enrollment.seq;
            let mut fx = Effects::default();
            if !engine::on_action_settled(
                &journey,
                &mut enrollment,
                action_id,
                outcome,
                f,
                &env,
                &mut fx,
            ) {
                return Ok(());
            }
            let changed = [Changed {
                enrollment: &enrollment,
                loaded_seq: Some(loaded),
            }];
            match self.commit_run(&txn, &changed, &fx).await {
                Err(DbErr::RecordNotUpdated) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            txn.commit().await?;
            self.after_commit(&changed, &fx);
            return Ok(());
        }
        Ok(())
    }
}
