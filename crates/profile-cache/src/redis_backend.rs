//! The Redis backend: one managed connection, redialled at most once a second while Redis
//! is down, and the script that writes profiles only when newer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::lock;

/// Writes several profiles, each only when newer than the cached one. `ARGV[1]` is the
/// TTL, `ARGV[2]` the channel where written versions are announced; then per profile four
/// arguments: version, encoded profile (empty: a tombstone that makes reads miss and keeps
/// older writes out), profile id, and how many identifier keys follow its profile key in
/// `KEYS`. Those keys are pointed at the profile id. All keys get the TTL. The profiles
/// written are announced in one message, a line each: `id version`, with ` dead` after a
/// tombstone. Returns how many profiles were written.
pub(crate) const PUT_IF_NEWER: &str = r"
local ttl = ARGV[1]
local k = 1
local written = {}
for i = 3, #ARGV, 4 do
  local key, idents = KEYS[k], tonumber(ARGV[i + 3])
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) < tonumber(ARGV[i]) then
    redis.call('HSET', key, 'v', ARGV[i], 'p', ARGV[i + 1])
    redis.call('PEXPIRE', key, ttl)
    for j = k + 1, k + idents do
      redis.call('SET', KEYS[j], ARGV[i + 2], 'PX', ttl)
    end
    local line = ARGV[i + 2] .. ' ' .. ARGV[i]
    if ARGV[i + 1] == '' then
      line = line .. ' dead'
    end
    written[#written + 1] = line
  end
  k = k + 1 + idents
end
if #written > 0 then
  redis.call('PUBLISH', ARGV[2], table.concat(written, '\n'))
end
return #written
";

/// Redis calls taking longer than this count as Redis being down: a cache must be faster
/// than the database it shields.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Pause between reconnection attempts while Redis is down.
pub(crate) const RECONNECT_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct RedisBackend {
    pub(crate) client: redis::Client,
    /// The live connection; cloned per call without awaiting under the lock.
    pub(crate) connection: Mutex<Option<ConnectionManager>>,
    /// Held while connecting, so concurrent callers do not all dial Redis.
    pub(crate) connecting: tokio::sync::Mutex<()>,
    pub(crate) last_attempt: Mutex<Option<Instant>>,
    pub(crate) script: redis::Script,
}

impl RedisBackend {
    /// A connection, connecting first when needed (at most once per RECONNECT_EVERY).
    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(c) = lock(&self.connection).as_ref() {
            return Ok(c.clone());
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = lock(&self.connection).as_ref() {
            return Ok(c.clone());
        }
        {
            let mut last = lock(&self.last_attempt);
            if last.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "redis reconnect pending",
                )));
            }
            *last = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(RECONNECT_EVERY);
        let manager = self
            .client
            .get_connection_manager_with_config(config)
            .await?;
        tracing::info!("profile cache connected to redis");
        *lock(&self.connection) = Some(manager.clone());
        Ok(manager)
    }

    pub(crate) async fn run(&self, cmd: &redis::Cmd) -> Result<Option<Vec<u8>>, redis::RedisError> {
        let mut c = self.connection().await?;
        cmd.query_async(&mut c).await
    }

    pub(crate) async fn run_string(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<Option<String>, redis::RedisError> {
        let mut c = self.connection().await?;
        cmd.query_async(&mut c).await
    }

    /// Runs `pipe`, whose commands each answer bytes or nothing, in one round trip.
    pub(crate) async fn pipe_values(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<Option<Vec<u8>>>, redis::RedisError> {
        let mut c = self.connection().await?;
        pipe.query_async(&mut c).await
    }

    pub(crate) async fn pipe(&self, pipe: &redis::Pipeline) -> Result<(), redis::RedisError> {
        let mut c = self.connection().await?;
        pipe.query_async::<()>(&mut c).await
    }

    pub(crate) async fn tombstone(
        &self,
        key: &str,
        channel: &str,
        profile_id: &str,
        version: u64,
        ttl_ms: u64,
    ) -> Result<(), redis::RedisError> {
        let mut c = self.connection().await?;
        self.script
            .key(key)
            .arg(ttl_ms.max(1))
            .arg(channel)
            .arg(version)
            .arg("")
            .arg(profile_id)
            .arg(0)
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }
}
