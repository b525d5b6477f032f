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

/// The longest duration accepted: ten years is beyond any journey wait, so more is a typo.
const LONGEST_DAYS: u64 = 3650;

const DURATION_FORMS: &str = "accepted forms: a whole number and a unit (s, m, h, d or w), \
     as in \"90s\", \"15m\", \"2h\", \"2d\", \"1w\", or several of them, largest unit first, \
     as in \"1h30m\" or \"1d12h\"";

/// "90s", "15m", "2h", "2d", "1w", combined "1h30m" / "1d12h"; units s, m, h, d, w, each at
/// most once and largest first; no spaces except surrounding whitespace, which is trimmed.
/// Refuses an empty or zero duration, unknown units, and anything longer than 3650 days
/// (which covers numbers too large to compute). The error says what is wrong and shows the
/// accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("the duration is empty; {DURATION_FORMS}"));
    }
    let too_long = || format!("{text:?} is longer than {LONGEST_DAYS} days; {DURATION_FORMS}");
    let mut total: u64 = 0;
    // Seconds per unit of the previous part; each part must use a smaller unit.
    let mut previous_unit = u64::MAX;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let mut chars = after.chars();
        let Some(unit) = chars.next() else {
            return Err(format!(
                "{text:?} ends in the number {number} without a unit; {DURATION_FORMS}"
            ));
        };
        if !unit.is_ascii_alphabetic() {
            return Err(format!(
                "{text:?} contains \"{unit}\", which is neither a digit nor a unit; {DURATION_FORMS}"
            ));
        }
        if number.is_empty() {
            return Err(format!(
                "{text:?} has the unit \"{unit}\" without a number before it; {DURATION_FORMS}"
            ));
        }
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => {
                return Err(format!(
                    "{text:?} has the unknown unit \"{unit}\"; {DURATION_FORMS}"
                ));
            }
        };
        if seconds >= previous_unit {
            return Err(format!(
                "{text:?} repeats a unit or puts a smaller unit before a larger one; {DURATION_FORMS}"
            ));
        }
        previous_unit = seconds;
        // `number` is all ASCII digits, so the parse fails only when it overflows.
        let count: u64 = number.parse().map_err(|_| too_long())?;
        total = count
            .checked_mul(seconds)
            .and_then(|part| total.checked_add(part))
            .filter(|&sum| sum <= LONGEST_DAYS * 86_400)
            .ok_or_else(too_long)?;
        rest = chars.as_str();
    }
    if total == 0 {
        return Err(format!(
            "{text:?} is zero; a duration must be positive; {DURATION_FORMS}"
        ));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_each_unit_and_combined() {
        let secs = |text| parse_duration(text).map(|d| d.as_secs());
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("15m"), Ok(900));
        assert_eq!(secs("2h"), Ok(7200));
        assert_eq!(secs("2d"), Ok(172_800));
        assert_eq!(secs("1w"), Ok(604_800));
        assert_eq!(secs("1h30m"), Ok(5400));
        assert_eq!(secs("1d12h"), Ok(129_600));
        assert_eq!(secs("1w2d3h4m5s"), Ok(604_800 + 172_800 + 10_800 + 240 + 5));
        assert_eq!(secs("1h0m"), Ok(3600));
        assert_eq!(secs("  015m\n"), Ok(900));
        assert_eq!(secs("3650d"), Ok(3650 * 86_400));
        assert_eq!(secs("521w"), Ok(521 * 604_800));
    }

    #[test]
    fn bad_durations_say_what_is_wrong_and_show_the_forms() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("0s", "zero"),
            ("0h0m", "zero"),
            ("1x", "unknown unit \"x\""),
            ("1H", "unknown unit \"H\""),
            ("h", "without a number"),
            ("90", "without a unit"),
            ("1h30", "without a unit"),
            ("1h 30m", "neither a digit nor a unit"),
            ("1.5h", "neither a digit nor a unit"),
            ("-5m", "neither a digit nor a unit"),
            ("30m1h", "smaller unit before a larger"),
            ("1h1h", "repeats a unit"),
            ("3651d", "longer than 3650 days"),
            ("522w", "longer than 3650 days"),
            ("3649d48h", "longer than 3650 days"),
            ("99999999999999999999s", "longer than 3650 days"),
            ("9999999999999999w", "longer than 3650 days"),
        ];
        for (text, problem) in cases {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(problem), "{text:?}: {error}");
            assert!(error.contains("\"1h30m\""), "{text:?}: {error}");
        }
    }

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
