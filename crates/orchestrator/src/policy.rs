//! The contact policy shared by every journey: whether a message goes now, later, or not
//! at all, and why.

use chrono_tz::Tz;
use waymark_proto::orchestration::v1 as pb;

use crate::model::Contact;
use crate::schedule::{self, QuietHours};

/// A cap's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A rolling window, in microseconds.
    Rolling(i64),
    /// The recipient's calendar day.
    CalendarDay,
}

/// One cap, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    /// A channel name, or `*` for all.
    pub channel: String,
    pub max: u32,
    pub period: Period,
}

/// The policy, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub caps: Vec<Cap>,
    pub quiet_hours: Option<QuietHours>,
    pub reserve_for_priority: u32,
    pub reserve_slots: u32,
    pub consent_purpose: String,
    pub default_time_zone: Tz,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            caps: Vec::new(),
            quiet_hours: None,
            reserve_for_priority: 0,
            reserve_slots: 0,
            consent_purpose: "marketing".into(),
            default_time_zone: Tz::UTC,
        }
    }
}

/// The most caps a policy holds.
const MAX_CAPS: usize = 32;

impl Policy {
    /// Checks and compiles `p`; the error names the field.
    pub fn compile(p: &pb::ContactPolicy) -> Result<Policy, (String, String)> {
        if p.caps.len() > MAX_CAPS {
            return Err(("caps".into(), format!("must hold at most {MAX_CAPS} caps")));
        }
        let mut caps = Vec::new();
        for (i, c) in p.caps.iter().enumerate() {
            let field = |f: &str| format!("caps[{i}].{f}");
            if c.channel.is_empty() || c.channel.len() > 64 {
                return Err((field("channel"), "must be a channel name or `*`".into()));
            }
            if c.max_messages == 0 {
                return Err((field("max_messages"), "must be at least 1".into()));
            }
            let period = if c.per_calendar_day {
                Period::CalendarDay
            } else if c.window.is_empty() {
                return Err((
                    field("window"),
                    "is required unless per_calendar_day is set".into(),
                ));
            } else {
                let d = schedule::parse_duration(&c.window).map_err(|e| (field("window"), e))?;
                Period::Rolling(waymark_kit::time::duration_micros(d))
            };
            caps.push(Cap {
                channel: c.channel.clone(),
                max: c.max_messages,
                period,
            });
        }
        let quiet_hours = match &p.quiet_hours {
            None => None,
            Some(q) => {
                QuietHours::parse(&q.start, &q.end).map_err(|e| ("quiet_hours".to_owned(), e))?
            }
        };
        if p.reserve_for_priority > 100 {
            return Err(("reserve_for_priority".into(), "must be 0 to 100".into()));
        }
        let default_time_zone = if p.default_time_zone.is_empty() {
            Tz::UTC
        } else {
            schedule::parse_time_zone(&p.default_time_zone)
                .map_err(|e| ("default_time_zone".to_owned(), e))?
        };
        if p.consent_purpose.len() > 64 {
            return Err(("consent_purpose".into(), "must be at most 64 bytes".into()));
        }
        Ok(Policy {
            caps,
            quiet_hours,
            reserve_for_priority: p.reserve_for_priority,
            reserve_slots: p.reserve_slots,
            consent_purpose: if p.consent_purpose.is_empty() {
                "marketing".into()
            } else {
                p.consent_purpose.clone()
            },
            default_time_zone,
        })
    }

    /// How far back contacts matter: the longest rolling window, or two days for a
    /// calendar day in any time zone.
    pub fn lookback_us(&self) -> i64 {
        self.caps
            .iter()
            .map(|c| match c.period {
                Period::Rolling(us) => us,
                Period::CalendarDay => 2 * 86_400_000_000,
            })
            .max()
            .unwrap_or(0)
    }
}

/// What the policy decides for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// Not before this instant (quiet hours).
    Defer(i64),
    /// Not at all, and why.
    Suppress(String),
}

/// The facts a decision reads about the recipient.
pub struct Recipient<'a> {
    pub time_zone: Tz,
    /// Marketing messages already sent, newest last.
    pub contacts: &'a [Contact],
    pub open_case: bool,
    /// `consent["<channel>/<purpose>"]`, when recorded.
    pub consent: &'a dyn Fn(&str) -> Option<bool>,
}

/// A message on `channel` from a journey of `priority`, at `now_us`.
pub struct Message<'a> {
    pub channel: &'a str,
    pub transactional: bool,
    pub skip_in_quiet_hours: bool,
    pub priority: u32,
}

/// Decides `message` for `recipient` under `policy` at `now_us`.
pub fn decide(
    policy: &Policy,
    message: &Message<'_>,
    recipient: &Recipient<'_>,
    now_us: i64,
) -> Decision {
    if message.transactional {
        // A recorded refusal of transactional messages on this channel still holds.
        return match (recipient.consent)(&format!("{}/transactional", message.channel)) {
            Some(false) => Decision::Suppress("no consent for transactional messages".into()),
            _ => Decision::Send,
        };
    }
    if recipient.open_case {
        return Decision::Suppress("an escalation is open".into());
    }
    let purpose = format!("{}/{}", message.channel, policy.consent_purpose);
    if (recipient.consent)(&purpose) == Some(false) {
        return Decision::Suppress(format!("no consent for {purpose}"));
    }
    if let Some(q) = &policy.quiet_hours
        && let Some(release) = q.release(now_us, recipient.time_zone)
    {
        return if message.skip_in_quiet_hours {
            Decision::Suppress("quiet hours".into())
        } else {
            Decision::Defer(release)
        };
    }
    for cap in &policy.caps {
        if cap.channel != "*" && cap.channel != message.channel {
            continue;
        }
        let since = match cap.period {
            Period::Rolling(us) => now_us.saturating_sub(us),
            Period::CalendarDay => schedule::local_day(now_us, recipient.time_zone).0,
        };
        let sent = recipient
            .contacts
            .iter()
            .filter(|c| match cap.period {
                Period::Rolling(_) => c.at > since,
                Period::CalendarDay => c.at >= since,
            })
            .filter(|c| cap.channel == "*" || c.channel == cap.channel)
            .count();
        let sent = u32::try_from(sent).unwrap_or(u32::MAX);
        let what = match cap.period {
            Period::Rolling(_) => "window",
            Period::CalendarDay => "calendar day",
        };
        if sent >= cap.max {
            return Decision::Suppress(format!(
                "contact cap: {} of {} `{}` messages per {what}",
                sent, cap.max, cap.channel
            ));
        }
        let reserved = policy.reserve_for_priority > 0
            && message.priority < policy.reserve_for_priority
            && sent.saturating_add(policy.reserve_slots) >= cap.max;
        if reserved {
            return Decision::Suppress(format!(
                "contact cap: the last {} of {} `{}` messages per {what} are kept for journeys of priority {} and above",
                policy.reserve_slots, cap.max, cap.channel, policy.reserve_for_priority
            ));
        }
    }
    Decision::Send
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saturday 28 March 2026, 12:00 in Europe/Berlin (11:00 UTC), the day before the
    /// clocks go forward.
    const SATURDAY_NOON_BERLIN: i64 = 1_774_695_600_000_000;
    const HOUR: i64 = 3_600_000_000;

    fn policy(json: serde_json::Value) -> Policy {
        let p: pb::ContactPolicy = waymark_proto::proto_json::from_json(&json).unwrap();
        Policy::compile(&p).unwrap()
    }

    fn decide_at(
        p: &Policy,
        channel: &str,
        priority: u32,
        contacts: &[Contact],
        open_case: bool,
        consent: Option<bool>,
        now: i64,
    ) -> Decision {
        let consent = move |_: &str| consent;
        decide(
            p,
            &Message {
                channel,
                transactional: false,
                skip_in_quiet_hours: false,
                priority,
            },
            &Recipient {
                time_zone: chrono_tz::Europe::Berlin,
                contacts,
                open_case,
                consent: &consent,
            },
            now,
        )
    }

    fn sent(channel: &str, at: i64) -> Contact {
        Contact {
            channel: channel.into(),
            at,
        }
    }

    #[test]
    fn caps_count_rolling_windows_and_local_calendar_days() {
        let p = policy(serde_json::json!({"caps": [
            {"channel": "email", "maxMessages": 2, "window": "7d"},
            {"channel": "*", "maxMessages": 3, "perCalendarDay": true}
        ]}));
        let now = SATURDAY_NOON_BERLIN;
        let two_emails = [
            sent("email", now - 6 * 24 * HOUR),
            sent("email", now - HOUR),
        ];
        assert!(
            matches!(decide_at(&p, "email", 0, &two_emails, false, None, now), Decision::Suppress(r) if r.contains("7d") || r.contains("window"))
        );
        let old = [
            sent("email", now - 8 * 24 * HOUR),
            sent("email", now - HOUR),
        ];
        assert_eq!(
            decide_at(&p, "email", 0, &old, false, None, now),
            Decision::Send
        );
        // Three today in Berlin fill the day; one a moment before local midnight (23:00
        // UTC on Friday) does not count.
        let today = [
            sent("sms", now - 11 * HOUR + 1),
            sent("push", now - HOUR),
            sent("sms", now - 1),
        ];
        assert!(matches!(
            decide_at(&p, "sms", 0, &today, false, None, now),
            Decision::Suppress(_)
        ));
        let yesterday = [
            sent("sms", now - 12 * HOUR - 1),
            sent("push", now - HOUR),
            sent("sms", now - 1),
        ];
        assert_eq!(
            decide_at(&p, "sms", 0, &yesterday, false, None, now),
            Decision::Send
        );
    }

    #[test]
    fn the_last_slots_are_kept_for_higher_priorities() {
        let p = policy(serde_json::json!({
            "caps": [{"channel": "email", "maxMessages": 3, "window": "1d"}],
            "reserveForPriority": 50, "reserveSlots": 1
        }));
        let two = [
            sent("email", SATURDAY_NOON_BERLIN - HOUR),
            sent("email", SATURDAY_NOON_BERLIN - 2 * HOUR),
        ];
        assert!(
            matches!(decide_at(&p, "email", 10, &two, false, None, SATURDAY_NOON_BERLIN), Decision::Suppress(r) if r.contains("priority 50"))
        );
        assert_eq!(
            decide_at(&p, "email", 60, &two, false, None, SATURDAY_NOON_BERLIN),
            Decision::Send
        );
    }

    #[test]
    fn open_cases_and_refused_consent_stop_marketing_but_not_transactional_messages() {
        let p = Policy::default();
        let now = SATURDAY_NOON_BERLIN;
        assert!(
            matches!(decide_at(&p, "email", 0, &[], true, None, now), Decision::Suppress(r) if r.contains("escalation"))
        );
        assert!(
            matches!(decide_at(&p, "email", 0, &[], false, Some(false), now), Decision::Suppress(r) if r.contains("email/marketing"))
        );
        let consent = |_: &str| None;
        let transactional = decide(
            &p,
            &Message {
                channel: "email",
                transactional: true,
                skip_in_quiet_hours: false,
                priority: 0,
            },
            &Recipient {
                time_zone: chrono_tz::UTC,
                contacts: &[],
                open_case: true,
                consent: &consent,
            },
            now,
        );
        assert_eq!(transactional, Decision::Send);
    }

    #[test]
    fn quiet_hours_defer_to_their_local_end_across_a_clock_change() {
        let p = policy(serde_json::json!({"quietHours": {"start": "21:00", "end": "08:00"}}));
        // 23:00 Berlin on Saturday (22:00 UTC); quiet hours end at 08:00 Sunday, which is
        // 06:00 UTC after the clocks went forward at 02:00: eight hours later, not nine.
        let late = SATURDAY_NOON_BERLIN + 11 * HOUR;
        assert_eq!(
            decide_at(&p, "email", 0, &[], false, None, late),
            Decision::Defer(late + 8 * HOUR)
        );
        assert_eq!(
            decide_at(&p, "email", 0, &[], false, None, SATURDAY_NOON_BERLIN),
            Decision::Send
        );
    }
}
