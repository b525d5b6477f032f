//! Waiting without guessing: [`eventually`] polls until a check passes, with a deadline
//! that only bounds how long a failing test takes. Tests never sleep a fixed time and
//! assume something happened (or that nothing did).

use std::fmt::Debug;
use std::time::Duration;

use tokio::time::Instant;

/// How long tests wait for something that must happen: generous, because CI machines are
/// slow and a passing test returns as soon as it happens.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a check runs.
const INTERVAL: Duration = Duration::from_millis(25);

/// What a check yields: a value once its condition holds, or nothing yet, with what it saw
/// when it can tell (shown when the wait fails).
pub trait Check {
    type Value;
    /// The value, or what was observed instead (if anything).
    fn outcome(self) -> Result<Self::Value, Option<String>>;
}

/// `true` once the condition holds.
impl Check for bool {
    type Value = ();
    fn outcome(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

/// `Some(value)` once the condition holds.
impl<T> Check for Option<T> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Ok(value)` once the condition holds, `Err(observed)` until then.
impl<T, E: Debug> Check for Result<T, E> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.map_err(|observed| Some(format!("{observed:?}")))
    }
}

/// Runs `check` until it passes and returns its value; panics naming `what` (and the last
/// thing `check` observed) when it has not passed within `within`.
pub async fn eventually<C: Check>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> C,
) -> C::Value {
    let deadline = Instant::now() + within;
    loop {
        let observed = match check().await.outcome() {
            Ok(value) => return value,
            Err(observed) => observed,
        };
        if Instant::now() >= deadline {
            match observed {
                Some(observed) => {
                    panic!("gave up after {within:?} waiting for {what}; last observed: {observed}")
                }
                None => panic!("gave up after {within:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut calls = 0;
        let value = eventually("the third call", PATIENCE, async || {
            calls += 1;
            if calls == 3 { Ok(calls) } else { Err(calls) }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a miracle; last observed: 0")]
    async fn eventually_names_what_never_happened() {
        eventually("a miracle", Duration::from_millis(100), async || {
            Err::<(), _>(0)
        })
        .await;
    }
}
