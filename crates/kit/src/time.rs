//! Times as every service stores them: integer microseconds since the Unix epoch, which
//! sort and index the same on both database backends. Conversions saturate: a timestamp
//! from a request may hold anything and must never overflow.

use std::time::Duration;

use prost_types::Timestamp;

/// Now, in microseconds since the epoch.
pub fn now_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    duration_micros(now)
}

/// A timestamp in microseconds since the epoch (rounded down), saturating at the ends of
/// `i64`.
pub fn micros(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos.div_euclid(1000)))
}

/// The timestamp of microseconds since the epoch.
pub fn from_micros(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// A duration in microseconds, saturating at `i64::MAX`.
pub fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_down() {
        for us in [0, 1, -1, 1_767_225_600_123_456, -1_500_000] {
            assert_eq!(micros(&from_micros(us)), us);
        }
        let just_before_epoch = Timestamp {
            seconds: -1,
            nanos: 999_999_999,
        };
        assert_eq!(micros(&just_before_epoch), -1);
    }

    #[test]
    fn extremes_saturate() {
        let far = Timestamp {
            seconds: i64::MAX,
            nanos: 999_999_999,
        };
        assert_eq!(micros(&far), i64::MAX);
        let early = Timestamp {
            seconds: i64::MIN,
            nanos: 0,
        };
        assert_eq!(micros(&early), i64::MIN);
        assert_eq!(duration_micros(Duration::MAX), i64::MAX);
    }
}
