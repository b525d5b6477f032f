//! Durations, local times of day, time zones and quiet hours: the time math behind waits,
//! send times, quiet hours and per-day contact caps. Instants are microseconds since the
//! epoch (`waymark_kit::time`); wall-clock rules are read in the contact's IANA time zone,
//! so a daily time stays at the same local hour across daylight-saving changes.
//!
//! Two rules settle the wall times a change makes odd: a time skipped by a spring-forward
//! gap means the first instant after the gap, and a time that occurs twice in a fall-back
//! means its earlier occurrence, so every calendar day has exactly one instant per time.

pub use waymark_kit::time::parse_duration;

use chrono::{
    DateTime, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;

/// "HH:MM" on a 24-hour clock (also "H:MM"), surrounding whitespace trimmed; the error names
/// the problem.
pub fn parse_time_of_day(text: &str) -> Result<NaiveTime, String> {
    let text = text.trim();
    let shape = || {
        format!(
            "{text:?} is not a time of day; expected HH:MM on a 24-hour clock, as in \"08:00\" or \"21:30\""
        )
    };
    let (hour, minute) = text.split_once(':').ok_or_else(shape)?;
    let digits = |part: &str, widths: std::ops::RangeInclusive<usize>| {
        widths.contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hour, 1..=2) || !digits(minute, 2..=2) {
        return Err(shape());
    }
    let (hour, minute): (u32, u32) = (
        hour.parse().map_err(|_| shape())?,
        minute.parse().map_err(|_| shape())?,
    );
    if hour > 23 {
        return Err(format!(
            "{text:?} has the hour {hour}, out of range: hours run from 00 to 23"
        ));
    }
    if minute > 59 {
        return Err(format!(
            "{text:?} has the minute {minute}, out of range: minutes run from 00 to 59"
        ));
    }
    NaiveTime::from_hms_opt(hour, minute, 0).ok_or_else(shape)
}

/// An IANA zone name ("Europe/Berlin", "UTC"), surrounding whitespace trimmed; the error
/// says it is not an IANA time zone.
pub fn parse_time_zone(text: &str) -> Result<Tz, String> {
    text.trim().parse().map_err(|_| {
        format!("{text:?} is not an IANA time zone; expected a name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\"")
    })
}

/// The first instant strictly after `after_us` at which the wall clock in `tz` shows `time`,
/// each calendar day counting once: a time skipped by a spring-forward gap resolves to the
/// first instant after the gap (02:30 on the spring day in Europe/Berlin is 03:00 local),
/// and a time that occurs twice in a fall-back resolves to the earlier occurrence, so the
/// later one is never returned. Saturates at `i64::MAX` beyond chrono's range.
pub fn next_local_time(after_us: i64, time: NaiveTime, tz: Tz) -> i64 {
    following_days(local(after_us, tz).date_naive())
        .filter_map(|date| shown(date.and_time(time), tz))
        .map(|shown| shown.earliest)
        .find(|&at| at > after_us)
        .unwrap_or(i64::MAX)
}

/// A trait value holding a date: an RFC 3339 timestamp, or "YYYY-MM-DD" meaning local
/// midnight in `tz` (a midnight skipped by a spring-forward gap is the first instant after
/// it). None when the text is not a date.
pub fn parse_trait_date(text: &str, tz: Tz) -> Option<i64> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.timestamp_micros());
    }
    // Only the exact form: chrono's `%Y-%m-%d` would also take "2026-3-5" or a signed year.
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return None;
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    shown(date.and_time(NaiveTime::MIN), tz).map(|shown| shown.earliest)
}

/// Start of the calendar day containing `at_us` in `tz` (for per-day contact caps), and the
/// start of the next day: 23 or 25 hours later across a daylight-saving change. A day whose
/// midnight falls in a gap starts at the first instant after the gap. A bound beyond
/// chrono's range saturates at `i64::MIN` or `i64::MAX`.
pub fn local_day(at_us: i64, tz: Tz) -> (i64, i64) {
    let date = local(at_us, tz).date_naive();
    let midnight = |date: NaiveDate| shown(date.and_time(NaiveTime::MIN), tz);
    let start = midnight(date).map_or(i64::MIN, |shown| shown.earliest);
    let next = date
        .succ_opt()
        .and_then(midnight)
        .map_or(i64::MAX, |shown| shown.earliest);
    (start, next)
}

/// Quiet hours: [start, end) in local time; start > end spans midnight (21:00 to 08:00);
/// start == end means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl QuietHours {
    /// Both empty (or only whitespace): no quiet hours, as is the same time twice. One
    /// empty, or either not a time of day, is an error naming `start` or `end`.
    pub fn parse(start: &str, end: &str) -> Result<Option<QuietHours>, String> {
        match (start.trim().is_empty(), end.trim().is_empty()) {
            (true, true) => return Ok(None),
            (false, true) => {
                return Err("end is empty while start is set; give both or neither".into());
            }
            (true, false) => {
                return Err("start is empty while end is set; give both or neither".into());
            }
            (false, false) => {}
        }
        let start = parse_time_of_day(start).map_err(|problem| format!("start: {problem}"))?;
        let end = parse_time_of_day(end).map_err(|problem| format!("end: {problem}"))?;
        Ok((start != end).then_some(QuietHours { start, end }))
    }

    /// None when `at_us` is outside quiet hours in `tz`; otherwise the first instant at or
    /// after `at_us` when they end, with the DST rules of `next_local_time` with one
    /// exception: in the hour a fall-back repeats, an `at_us` past the first occurrence of
    /// the end is released at the second, because the wall clock is quiet again until then
    /// and waiting for the next day's end would hold messages a whole extra day.
    pub fn release(&self, at_us: i64, tz: Tz) -> Option<i64> {
        let at = local(at_us, tz);
        if !self.contains(at.time()) {
            return None;
        }
        let released = following_days(at.date_naive())
            .filter_map(|date| shown(date.and_time(self.end), tz))
            .flat_map(|shown| [shown.earliest, shown.latest])
            .find(|&end| end >= at_us)
            .unwrap_or(i64::MAX);
        Some(released)
    }

    fn contains(&self, time: NaiveTime) -> bool {
        if self.start <= self.end {
            self.start <= time && time < self.end
        } else {
            time >= self.start || time < self.end
        }
    }
}

/// The instants at which the wall clock shows one local date and time: the same instant
/// twice when it occurs once, or when a gap skips it (then the first instant after the
/// gap); the two occurrences when a fall-back repeats it.
struct Shown {
    earliest: i64,
    latest: i64,
}

fn shown(wall: NaiveDateTime, tz: Tz) -> Option<Shown> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(at) => Some(Shown {
            earliest: at.timestamp_micros(),
            latest: at.timestamp_micros(),
        }),
        LocalResult::Ambiguous(one, other) => {
            let (one, other) = (one.timestamp_micros(), other.timestamp_micros());
            Some(Shown {
                earliest: one.min(other),
                latest: one.max(other),
            })
        }
        LocalResult::None => after_gap(wall, tz).map(|at| Shown {
            earliest: at,
            latest: at,
        }),
    }
}

/// The first instant after the gap that skips `wall`: the instant at which the wall clock
/// jumps from before `wall` to after it. chrono-tz does not expose its transitions, so this
/// bisects, to the microsecond, a window wider than any UTC offset around `wall` read as
/// UTC; a gap's neighbourhood holds no other transition.
fn after_gap(wall: NaiveDateTime, tz: Tz) -> Option<i64> {
    const REACH: i64 = 17 * 3600 * 1_000_000;
    let past = |us: i64| {
        DateTime::from_timestamp_micros(us).map(|at| at.with_timezone(&tz).naive_local() > wall)
    };
    let centre = wall.and_utc().timestamp_micros();
    let (mut before, mut after) = (centre - REACH, centre + REACH);
    if past(before)? || !past(after)? {
        return None;
    }
    while after - before > 1 {
        let middle = before + (after - before) / 2;
        if past(middle)? {
            after = middle;
        } else {
            before = middle;
        }
    }
    Some(after)
}

/// The instant in `tz`, clamped a week inside chrono's range (about 262,000 years either
/// way) so the arithmetic around it (offsets, the next days) stays representable; only a
/// saturated input lies that far out.
fn local(us: i64, tz: Tz) -> DateTime<Tz> {
    let earliest = DateTime::<Utc>::MIN_UTC + TimeDelta::weeks(1);
    let latest = DateTime::<Utc>::MAX_UTC - TimeDelta::weeks(1);
    let utc = match DateTime::from_timestamp_micros(us) {
        Some(at) => at.clamp(earliest, latest),
        None if us < 0 => earliest,
        None => latest,
    };
    utc.with_timezone(&tz)
}

/// `date` and the two days after it: the next occurrence of a daily time is on one of them.
fn following_days(date: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    (0..3).filter_map(move |n| date.checked_add_days(Days::new(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600 * 1_000_000;

    /// An instant given in UTC, as the expected values are worked out by hand.
    fn utc(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> i64 {
        Utc.with_ymd_and_hms(year, month, day, hour, minute, 0)
            .unwrap()
            .timestamp_micros()
    }

    fn hm(hour: u32, minute: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(hour, minute, 0).unwrap()
    }

    const BERLIN: Tz = chrono_tz::Europe::Berlin;
    const NEW_YORK: Tz = chrono_tz::America::New_York;
    const SANTIAGO: Tz = chrono_tz::America::Santiago;

    #[test]
    fn times_of_day() {
        assert_eq!(parse_time_of_day("08:00"), Ok(hm(8, 0)));
        assert_eq!(parse_time_of_day("8:05"), Ok(hm(8, 5)));
        assert_eq!(parse_time_of_day("00:00"), Ok(hm(0, 0)));
        assert_eq!(parse_time_of_day(" 23:59 "), Ok(hm(23, 59)));
        for (text, problem) in [
            ("24:00", "hour 24"),
            ("12:60", "minute 60"),
            ("", "not a time of day"),
            ("8", "not a time of day"),
            ("8:5", "not a time of day"),
            ("008:00", "not a time of day"),
            ("08:00:00", "not a time of day"),
            ("+8:00", "not a time of day"),
            ("8 pm", "not a time of day"),
        ] {
            let error = parse_time_of_day(text).unwrap_err();
            assert!(error.contains(problem), "{text:?}: {error}");
        }
    }

    #[test]
    fn time_zones() {
        assert_eq!(parse_time_zone("Europe/Berlin"), Ok(BERLIN));
        assert_eq!(parse_time_zone("UTC"), Ok(chrono_tz::UTC));
        assert_eq!(parse_time_zone(" America/New_York "), Ok(NEW_YORK));
        for text in ["", "Mars/Olympus", "europe/berlin", "+02:00"] {
            let error = parse_time_zone(text).unwrap_err();
            assert!(error.contains("not an IANA time zone"), "{text:?}: {error}");
        }
    }

    #[test]
    fn next_local_time_later_today_or_tomorrow() {
        // Berlin is UTC+1 in January.
        let eight = hm(8, 0);
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 6, 0), eight, BERLIN),
            utc(2026, 1, 15, 7, 0)
        );
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 8, 0), eight, BERLIN),
            utc(2026, 1, 16, 7, 0)
        );
        // Strictly after: the instant itself is not next.
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 7, 0), eight, BERLIN),
            utc(2026, 1, 16, 7, 0)
        );
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 7, 0) - 1, eight, BERLIN),
            utc(2026, 1, 15, 7, 0)
        );
        // Late evening UTC is already the next local day in Berlin.
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 23, 30), hm(0, 15), BERLIN),
            utc(2026, 1, 16, 23, 15)
        );
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 22, 30), hm(0, 15), chrono_tz::UTC),
            utc(2026, 1, 16, 0, 15)
        );
    }

    #[test]
    fn next_local_time_on_berlin_spring_forward() {
        // 2026-03-29: at 01:00 UTC the clock jumps from 02:00 CET (UTC+1) to 03:00 CEST
        // (UTC+2); 02:30 does not exist and means 03:00 CEST, the instant of the jump.
        let before = utc(2026, 3, 28, 12, 0);
        assert_eq!(
            next_local_time(before, hm(2, 30), BERLIN),
            utc(2026, 3, 29, 1, 0)
        );
        assert_eq!(
            next_local_time(before, hm(2, 0), BERLIN),
            utc(2026, 3, 29, 1, 0)
        );
        assert_eq!(
            next_local_time(before, hm(1, 59), BERLIN),
            utc(2026, 3, 29, 0, 59)
        );
        assert_eq!(
            next_local_time(before, hm(8, 0), BERLIN),
            utc(2026, 3, 29, 6, 0)
        );
        // The next day 02:30 exists again, in CEST.
        assert_eq!(
            next_local_time(utc(2026, 3, 29, 1, 0), hm(2, 30), BERLIN),
            utc(2026, 3, 30, 0, 30)
        );
    }

    #[test]
    fn next_local_time_on_berlin_fall_back() {
        // 2026-10-25: at 01:00 UTC the clock goes back from 03:00 CEST (UTC+2) to 02:00 CET
        // (UTC+1); 02:30 is 00:30 UTC and again 01:30 UTC, and the earlier one counts.
        let first = utc(2026, 10, 25, 0, 30);
        assert_eq!(
            next_local_time(utc(2026, 10, 24, 12, 0), hm(2, 30), BERLIN),
            first
        );
        // After the first occurrence the day is done: the next is 02:30 CET on the 26th,
        // not the repeat at 01:30 UTC.
        assert_eq!(
            next_local_time(first, hm(2, 30), BERLIN),
            utc(2026, 10, 26, 1, 30)
        );
        assert_eq!(
            next_local_time(utc(2026, 10, 24, 12, 0), hm(8, 0), BERLIN),
            utc(2026, 10, 25, 7, 0)
        );
    }

    #[test]
    fn next_local_time_in_new_york() {
        // EST is UTC-5, EDT UTC-4. 2026-03-08 jumps from 02:00 EST to 03:00 EDT at 07:00
        // UTC; 2026-11-01 goes back from 02:00 EDT to 01:00 EST at 06:00 UTC.
        assert_eq!(
            next_local_time(utc(2026, 1, 15, 12, 0), hm(9, 0), NEW_YORK),
            utc(2026, 1, 15, 14, 0)
        );
        assert_eq!(
            next_local_time(utc(2026, 7, 15, 14, 0), hm(9, 0), NEW_YORK),
            utc(2026, 7, 16, 13, 0)
        );
        assert_eq!(
            next_local_time(utc(2026, 3, 7, 12, 0), hm(2, 30), NEW_YORK),
            utc(2026, 3, 8, 7, 0)
        );
        assert_eq!(
            next_local_time(utc(2026, 10, 31, 12, 0), hm(1, 30), NEW_YORK),
            utc(2026, 11, 1, 5, 30)
        );
        assert_eq!(
            next_local_time(utc(2026, 11, 1, 5, 30), hm(1, 30), NEW_YORK),
            utc(2026, 11, 2, 6, 30)
        );
    }

    #[test]
    fn next_local_time_saturates_at_the_ends() {
        assert_eq!(next_local_time(i64::MAX, hm(8, 0), BERLIN), i64::MAX);
        assert!(next_local_time(i64::MIN, hm(8, 0), BERLIN) > i64::MIN);
    }

    #[test]
    fn quiet_hours_parse() {
        assert_eq!(QuietHours::parse("", ""), Ok(None));
        assert_eq!(QuietHours::parse(" ", ""), Ok(None));
        assert_eq!(QuietHours::parse("08:00", "8:00"), Ok(None));
        assert_eq!(
            QuietHours::parse("21:00", "08:00"),
            Ok(Some(QuietHours {
                start: hm(21, 0),
                end: hm(8, 0)
            }))
        );
        for (start, end, problem) in [
            ("21:00", "", "end is empty"),
            ("", "08:00", "start is empty"),
            ("25:00", "08:00", "start: "),
            ("21:00", "8am", "end: "),
        ] {
            let error = QuietHours::parse(start, end).unwrap_err();
            assert!(error.starts_with(problem), "{start:?} {end:?}: {error}");
        }
    }

    fn overnight() -> QuietHours {
        QuietHours {
            start: hm(21, 0),
            end: hm(8, 0),
        }
    }

    #[test]
    fn quiet_hours_spanning_midnight() {
        // Berlin in January is UTC+1: quiet from 20:00 UTC to 07:00 UTC.
        let quiet = overnight();
        assert_eq!(quiet.release(utc(2026, 1, 15, 11, 0), BERLIN), None);
        assert_eq!(quiet.release(utc(2026, 1, 15, 7, 0), BERLIN), None);
        assert_eq!(quiet.release(utc(2026, 1, 15, 20, 0) - 1, BERLIN), None);
        let release = utc(2026, 1, 16, 7, 0);
        assert_eq!(
            quiet.release(utc(2026, 1, 15, 20, 0), BERLIN),
            Some(release)
        );
        assert_eq!(
            quiet.release(utc(2026, 1, 15, 23, 30), BERLIN),
            Some(release)
        );
        assert_eq!(
            quiet.release(utc(2026, 1, 16, 6, 30), BERLIN),
            Some(release)
        );
        assert_eq!(quiet.release(release - 1, BERLIN), Some(release));
        assert_eq!(quiet.release(release, BERLIN), None);
    }

    #[test]
    fn quiet_hours_within_a_day_and_none() {
        let lunch = QuietHours {
            start: hm(12, 0),
            end: hm(13, 30),
        };
        // Berlin is UTC+1 in January: quiet from 11:00 UTC to 12:30 UTC.
        assert_eq!(lunch.release(utc(2026, 1, 15, 11, 0) - 1, BERLIN), None);
        assert_eq!(
            lunch.release(utc(2026, 1, 15, 11, 0), BERLIN),
            Some(utc(2026, 1, 15, 12, 30))
        );
        assert_eq!(
            lunch.release(utc(2026, 1, 15, 11, 15), BERLIN),
            Some(utc(2026, 1, 15, 12, 30))
        );
        assert_eq!(lunch.release(utc(2026, 1, 15, 12, 30), BERLIN), None);
        let none = QuietHours {
            start: hm(8, 0),
            end: hm(8, 0),
        };
        assert_eq!(none.release(utc(2026, 1, 15, 7, 0), BERLIN), None);
    }

    #[test]
    fn quiet_hours_release_across_dst_changes() {
        let quiet = overnight();
        // A normal night: 21:00 CET to 08:00 CET is 11 hours.
        let opens = utc(2026, 3, 21, 20, 0);
        assert_eq!(quiet.release(opens, BERLIN), Some(opens + 11 * HOUR));
        // Spring forward: 21:00 CET (20:00 UTC) to 08:00 CEST (06:00 UTC), 10 hours.
        let opens = utc(2026, 3, 28, 20, 0);
        assert_eq!(quiet.release(opens, BERLIN), Some(utc(2026, 3, 29, 6, 0)));
        assert_eq!(utc(2026, 3, 29, 6, 0) - opens, 10 * HOUR);
        // Fall back: 21:00 CEST (19:00 UTC) to 08:00 CET (07:00 UTC), 12 hours.
        let opens = utc(2026, 10, 24, 19, 0);
        assert_eq!(quiet.release(opens, BERLIN), Some(utc(2026, 10, 25, 7, 0)));
        assert_eq!(utc(2026, 10, 25, 7, 0) - opens, 12 * HOUR);
        // New York, spring forward: 21:00 EST (02:00 UTC) to 08:00 EDT (12:00 UTC).
        assert_eq!(
            quiet.release(utc(2026, 3, 8, 2, 0), NEW_YORK),
            Some(utc(2026, 3, 8, 12, 0))
        );
    }

    #[test]
    fn quiet_hours_ending_in_a_gap_or_a_repeated_hour() {
        let early = QuietHours {
            start: hm(1, 0),
            end: hm(2, 30),
        };
        // 02:30 is skipped on 2026-03-29 in Berlin: released when the clock jumps to 03:00.
        assert_eq!(
            early.release(utc(2026, 3, 29, 0, 30), BERLIN),
            Some(utc(2026, 3, 29, 1, 0))
        );
        // 2026-10-25: 02:10 CEST (00:10 UTC) is released at 02:30 CEST (00:30 UTC); 02:10 CET
        // (01:10 UTC) is quiet again and released at 02:30 CET (01:30 UTC).
        assert_eq!(
            early.release(utc(2026, 10, 25, 0, 10), BERLIN),
            Some(utc(2026, 10, 25, 0, 30))
        );
        assert_eq!(early.release(utc(2026, 10, 25, 0, 40), BERLIN), None);
        assert_eq!(
            early.release(utc(2026, 10, 25, 1, 10), BERLIN),
            Some(utc(2026, 10, 25, 1, 30))
        );
    }

    #[test]
    fn local_days_and_their_lengths() {
        // A winter day in Berlin: midnight CET is 23:00 UTC the day before.
        assert_eq!(
            local_day(utc(2026, 1, 15, 12, 0), BERLIN),
            (utc(2026, 1, 14, 23, 0), utc(2026, 1, 15, 23, 0))
        );
        // Midnight itself belongs to the day it starts.
        assert_eq!(
            local_day(utc(2026, 1, 14, 23, 0), BERLIN),
            (utc(2026, 1, 14, 23, 0), utc(2026, 1, 15, 23, 0))
        );
        assert_eq!(
            local_day(utc(2026, 1, 14, 23, 0) - 1, BERLIN),
            (utc(2026, 1, 13, 23, 0), utc(2026, 1, 14, 23, 0))
        );
        // Spring forward: from midnight CET to midnight CEST, 23 hours.
        let (start, next) = local_day(utc(2026, 3, 29, 12, 0), BERLIN);
        assert_eq!(
            (start, next),
            (utc(2026, 3, 28, 23, 0), utc(2026, 3, 29, 22, 0))
        );
        assert_eq!(next - start, 23 * HOUR);
        // Fall back: from midnight CEST to midnight CET, 25 hours.
        let (start, next) = local_day(utc(2026, 10, 25, 12, 0), BERLIN);
        assert_eq!(
            (start, next),
            (utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 23, 0))
        );
        assert_eq!(next - start, 25 * HOUR);
        // New York: 2026-03-08 from 05:00 UTC (EST) to 04:00 UTC (EDT); 2026-11-01 from
        // 04:00 UTC (EDT) to 05:00 UTC (EST).
        assert_eq!(
            local_day(utc(2026, 3, 8, 12, 0), NEW_YORK),
            (utc(2026, 3, 8, 5, 0), utc(2026, 3, 9, 4, 0))
        );
        assert_eq!(
            local_day(utc(2026, 11, 1, 12, 0), NEW_YORK),
            (utc(2026, 11, 1, 4, 0), utc(2026, 11, 2, 5, 0))
        );
        assert_eq!(
            local_day(utc(2026, 11, 1, 12, 0), chrono_tz::UTC),
            (utc(2026, 11, 1, 0, 0), utc(2026, 11, 2, 0, 0))
        );
    }

    #[test]
    fn a_day_whose_midnight_is_skipped() {
        // Santiago jumps from 24:00 on 2026-09-05 (UTC-4, 04:00 UTC on the 6th) to 01:00 on
        // the 6th (UTC-3): the 6th starts at 04:00 UTC and ends at midnight UTC-3, 23 hours.
        assert_eq!(
            local_day(utc(2026, 9, 6, 12, 0), SANTIAGO),
            (utc(2026, 9, 6, 4, 0), utc(2026, 9, 7, 3, 0))
        );
        assert_eq!(
            local_day(utc(2026, 9, 5, 12, 0), SANTIAGO),
            (utc(2026, 9, 5, 4, 0), utc(2026, 9, 6, 4, 0))
        );
        assert_eq!(
            parse_trait_date("2026-09-06", SANTIAGO),
            Some(utc(2026, 9, 6, 4, 0))
        );
    }

    #[test]
    fn local_day_saturates_at_the_ends() {
        let (start, next) = local_day(i64::MAX, BERLIN);
        assert!(start < next);
        let (start, next) = local_day(i64::MIN, BERLIN);
        assert!(start < next);
    }

    #[test]
    fn trait_dates() {
        let at = utc(2026, 3, 29, 10, 15);
        assert_eq!(parse_trait_date("2026-03-29T10:15:00Z", BERLIN), Some(at));
        assert_eq!(
            parse_trait_date("2026-03-29T12:15:00+02:00", NEW_YORK),
            Some(at)
        );
        assert_eq!(
            parse_trait_date(" 2026-03-29T10:15:00.123456Z ", BERLIN),
            Some(at + 123_456)
        );
        // A bare date is local midnight: CET in Berlin, EDT in New York.
        assert_eq!(
            parse_trait_date("2026-03-29", BERLIN),
            Some(utc(2026, 3, 28, 23, 0))
        );
        assert_eq!(
            parse_trait_date("2026-07-04", NEW_YORK),
            Some(utc(2026, 7, 4, 4, 0))
        );
        for text in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2026-3-5",
            "20260329",
            "+2026-03-29",
            "2026-03-29T25:00:00Z",
            "2026-03-29T10:15:00",
            "2026-03-29 extra",
            "42",
        ] {
            assert_eq!(parse_trait_date(text, BERLIN), None, "{text:?}");
        }
    }
}
