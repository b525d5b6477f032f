//! How a customer feels, from CX signals: survey scores (CSAT, NPS) and the sentiment of
//! free text, each mapped to [-1, 1] and blended into a score that decays towards neutral.
//!
//! - CSAT 1-5 maps linearly: `(csat - 3) / 2`, so 1 → -1, 3 → 0, 5 → 1.
//! - NPS 0-10 maps piecewise linearly through the anchors in [`NPS_ANCHORS`], so that
//!   detractors (0-6) are negative, passives (7-8) neutral to satisfied and promoters (9-10)
//!   delighted: 0 → -1, 6 → -0.3, 7 → 0.05, 8 → 0.35, 9 → 0.75, 10 → 1.
//! - Text is scored by [`sentiment`], a VADER-style lexicon scorer; text without a single
//!   sentiment word ("where is my parcel?") is no signal at all.
//!
//! A fresh signal `s` is blended with the previous score decayed to the signal's time:
//! `w * s + (1 - w) * previous`, with `w = 0.5 + 0.5 * |s|`. The stronger the signal, the
//! more it dominates: a furious complaint (-0.8, w = 0.9) an hour after a 5-star CSAT still
//! leaves the customer upset (-0.62), while a lukewarm remark only nudges the score.
//!
//! Events arrive out of order. A signal older than the state's `updated_at` never
//! overwrites it: it is folded in as though it had come first, i.e. the current score takes
//! the weight a fresh signal of its strength would get and the late signal, decayed to
//! `updated_at`, the rest; `updated_at` and `last_signal` stay. With two signals this gives
//! the same score whatever their order of arrival.

use std::time::Duration;

use prost_types::value::Kind;
use waymark_kit::time::micros;
use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::profile::v1::{Emotion, EmotionLabel, EmotionSignal};

use crate::model::number;

/// Tunables of the emotion model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmotionRules {
    /// After this long without a signal a score has halved.
    pub half_life: Duration,
}

impl Default for EmotionRules {
    fn default() -> Self {
        Self {
            half_life: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl EmotionRules {
    /// The factor a score keeps after `elapsed_us`.
    fn decay(&self, elapsed_us: i64) -> f64 {
        if elapsed_us <= 0 {
            return 1.0;
        }
        // A zero half-life gives infinity here, and 0.5^inf = 0: no memory at all.
        0.5_f64.powf(elapsed_us as f64 / self.half_life.as_micros() as f64)
    }
}

/// What a signal did to the label; only reported when the label changed.
#[derive(Debug, Clone, PartialEq)]
pub struct EmotionChange {
    /// The label just before the signal (decayed to its time); unspecified without one.
    pub previous: EmotionLabel,
    /// The label after it.
    pub label: EmotionLabel,
    /// The score after it, at the state's `updated_at`.
    pub score: f64,
    /// The signal that caused it (not necessarily `last_signal`: it may have been late);
    /// none when time alone moved the label.
    pub signal: Option<EmotionSignal>,
}

/// The label of a score (thresholds as in the proto).
pub fn label(score: f64) -> EmotionLabel {
    match score {
        s if s < -0.6 => EmotionLabel::Upset,
        s if s < -0.2 => EmotionLabel::Unhappy,
        s if s <= 0.2 => EmotionLabel::Neutral,
        s if s <= 0.6 => EmotionLabel::Satisfied,
        _ => EmotionLabel::Delighted,
    }
}

/// The lower-case name of a label ("upset", …, "unspecified"), as segments and events see it.
pub fn label_name(label: EmotionLabel) -> &'static str {
    match label {
        EmotionLabel::Unspecified => "unspecified",
        EmotionLabel::Upset => "upset",
        EmotionLabel::Unhappy => "unhappy",
        EmotionLabel::Neutral => "neutral",
        EmotionLabel::Satisfied => "satisfied",
        EmotionLabel::Delighted => "delighted",
    }
}

/// The score decayed to `now_us` and its label; (0, unspecified) before any signal.
pub fn current(emotion: &Emotion, now_us: i64, rules: &EmotionRules) -> (f64, EmotionLabel) {
    if emotion.label() == EmotionLabel::Unspecified {
        return (0.0, EmotionLabel::Unspecified);
    }
    let at = emotion.updated_at.as_ref().map_or(0, micros);
    let score = emotion.score * rules.decay(now_us - at);
    (score, label(score))
}

/// When decay next moves the label of `emotion` one step towards neutral: the moment the
/// decayed score reaches the next threshold (0.6 from upset or delighted, 0.2 from unhappy
/// or satisfied). None for a neutral label or none at all.
pub fn next_change_at(emotion: &Emotion, rules: &EmotionRules) -> Option<i64> {
    let threshold = match emotion.label() {
        EmotionLabel::Upset | EmotionLabel::Delighted => 0.6,
        EmotionLabel::Unhappy | EmotionLabel::Satisfied => 0.2,
        EmotionLabel::Neutral | EmotionLabel::Unspecified => return None,
    };
    let anchored = emotion.updated_at.as_ref().map_or(0, micros);
    let magnitude = emotion.score.abs();
    if magnitude <= threshold {
        return Some(anchored);
    }
    let half_lives = (magnitude / threshold).log2();
    // Rounded up: at that microsecond the decayed score is at the threshold, not above it.
    let after_us = (half_lives * rules.half_life.as_micros() as f64).ceil() as i64;
    Some(anchored.saturating_add(after_us))
}

/// Brings the label to where decay has taken the score by `now_us`; the change, if the
/// label moved. The score and `updated_at` stay the anchor decay is measured from, so late
/// signals still blend as though they had come in order.
pub fn settle(emotion: &mut Emotion, now_us: i64, rules: &EmotionRules) -> Option<EmotionChange> {
    if emotion.label() == EmotionLabel::Unspecified {
        return None;
    }
    let (score, now) = current(emotion, now_us, rules);
    let previous = emotion.label();
    if now == previous {
        return None;
    }
    emotion.set_label(now);
    Some(EmotionChange {
        previous,
        label: now,
        score,
        signal: None,
    })
}

/// CSAT 1-5 in [-1, 1]; None out of range.
pub fn csat_score(csat: f64) -> Option<f64> {
    (1.0..=5.0).contains(&csat).then(|| (csat - 3.0) / 2.0)
}

/// (NPS, score) anchors between which NPS maps linearly.
pub const NPS_ANCHORS: [(f64, f64); 6] = [
    (0.0, -1.0),
    (6.0, -0.3),
    (7.0, 0.05),
    (8.0, 0.35),
    (9.0, 0.75),
    (10.0, 1.0),
];

/// NPS 0-10 in [-1, 1] through [`NPS_ANCHORS`]; None out of range.
pub fn nps_score(nps: f64) -> Option<f64> {
    NPS_ANCHORS.windows(2).find_map(|pair| {
        let [(x0, y0), (x1, y1)] = [pair[0], pair[1]];
        (x0..=x1)
            .contains(&nps)
            .then(|| y0 + (nps - x0) / (x1 - x0) * (y1 - y0))
    })
}

/// Events whose free text carries a sentiment signal.
pub const TEXT_EVENTS: [&str; 6] = [
    "Complaint Filed",
    "Feedback Submitted",
    "Chat Message Sent",
    "Review Submitted",
    "Support Ticket Created",
    "Call Transcribed",
];

/// The properties that may hold that text, in order of preference.
pub const TEXT_KEYS: [&str; 5] = ["text", "comment", "message", "body", "feedback"];

#[derive(Clone, Copy)]
enum SignalKind {
    Csat,
    Nps,
    Sentiment,
}

impl SignalKind {
    fn name(self) -> &'static str {
        match self {
            SignalKind::Csat => "csat",
            SignalKind::Nps => "nps",
            SignalKind::Sentiment => "sentiment",
        }
    }
}

/// The CX signal a track event carries, if any. A survey property that is missing, not a
/// number or out of range is skipped for the next candidate (`Survey Submitted` tries
/// `csat`, then `nps`, then `score` as CSAT; `NPS Submitted` takes `nps` or else `score`).
pub fn signal(event: &Event) -> Option<EmotionSignal> {
    use SignalKind::{Csat, Nps, Sentiment};
    if event.r#type() != EventType::Track {
        return None;
    }
    let name = event.event.as_str();
    let candidates: Vec<(&str, SignalKind)> = match name {
        "CSAT Submitted" => vec![("csat", Csat), ("score", Csat)],
        "NPS Submitted" => vec![("nps", Nps), ("score", Nps)],
        "Survey Submitted" => vec![("csat", Csat), ("nps", Nps), ("score", Csat)],
        _ if TEXT_EVENTS.contains(&name) => TEXT_KEYS.iter().map(|k| (*k, Sentiment)).collect(),
        _ => return None,
    };
    let props = event.properties.as_ref();
    let (kind, score) = candidates.into_iter().find_map(|(key, kind)| {
        let score = match kind {
            Csat => number(props, key).and_then(csat_score),
            Nps => number(props, key).and_then(nps_score),
            Sentiment => match props?.fields.get(key)?.kind.as_ref()? {
                Kind::StringValue(text) => sentiment(text),
                _ => None,
            },
        };
        Some((kind, score?))
    })?;
    Some(EmotionSignal {
        event_id: event.event_id.clone(),
        event_name: name.to_owned(),
        kind: kind.name().to_owned(),
        score,
        timestamp: event.timestamp.or(event.received_at),
    })
}

/// How much a signal of this score weighs against what came before it.
fn weight(score: f64) -> f64 {
    0.5 + 0.5 * score.abs().min(1.0)
}

/// Blends `signal` into the state (see the module comment). Returns the label change, if
/// the label changed.
pub fn observe(
    emotion: &mut Option<Emotion>,
    signal: EmotionSignal,
    rules: &EmotionRules,
) -> Option<EmotionChange> {
    let at = signal.timestamp.as_ref().map_or(0, micros);
    let state = emotion.get_or_insert_with(Emotion::default);
    let updated = state.updated_at.as_ref().map_or(0, micros);
    let fresh = at >= updated;
    let previous = if state.label() == EmotionLabel::Unspecified {
        state.score = signal.score;
        EmotionLabel::Unspecified
    } else {
        let previous = current(state, at.max(updated), rules).1;
        state.score = if fresh {
            let w = weight(signal.score);
            w * signal.score + (1.0 - w) * state.score * rules.decay(at - updated)
        } else {
            let w = weight(state.score);
            w * state.score + (1.0 - w) * signal.score * rules.decay(updated - at)
        };
        previous
    };
    state.set_label(label(state.score));
    let change = (previous != state.label()).then(|| EmotionChange {
        previous,
        label: state.label(),
        score: state.score,
        signal: Some(signal.clone()),
    });
    if fresh || previous == EmotionLabel::Unspecified {
        state.updated_at = signal.timestamp;
        state.last_signal = Some(signal);
    }
    change
}

/// Profile merges: the state with the later `updated_at` wins whole.
pub fn merge(survivor: &mut Option<Emotion>, other: &Emotion) {
    if other.label() == EmotionLabel::Unspecified {
        return;
    }
    let time = |e: &Emotion| e.updated_at.as_ref().map_or(0, micros);
    if survivor
        .as_ref()
        .is_none_or(|ours| ours.label() == EmotionLabel::Unspecified || time(ours) < time(other))
    {
        *survivor = Some(other.clone());
    }
}

// ---- Sentiment ----------------------------------------------------------------------
//
// A compact take on VADER (Hutto & Gilbert, 2014), tuned for what customers write to
// support: word valences on VADER's -4..4 scale (values from its lexicon where it has the
// word, CX words like "refund" stay neutral and "waiting" or "rude" are added), negators
// flipping and damping the next three words of their clause (× -0.74), boosters and
// dampeners (±0.293, fading with distance), CAPS emphasis (+0.733 when the rest of the text
// is not shouted), "but" shifting weight to what follows it (×0.5 before, ×1.5 after),
// up to four "!" adding 0.292 each, and the sum normalised by `x / sqrt(x² + 15)`.
// No crate: `vader_sentiment` 0.1.1 on crates.io is an unmaintained Rust 2015 port
// (lazy_static, maplit, regex) that parses VADER's 7,500-word lexicon at start-up, far
// more than support text needs.

const NEGATION: f64 = -0.74;
const BOOST: f64 = 0.293;
const CAPS_BOOST: f64 = 0.733;
const EXCLAMATION: f64 = 0.292;
const NORMALISATION: f64 = 15.0;

/// Valence of a lower-case word on VADER's -4..4 scale.
fn valence(word: &str) -> Option<f64> {
    let v = match word {
        // Praise and satisfaction.
        "amazing" => 2.8,
        "appreciate" | "appreciated" => 2.0,
        "awesome" => 3.1,
        "best" => 3.2,
        "brilliant" => 2.8,
        "delighted" => 2.9,
        "easy" => 1.9,
        "excellent" => 2.7,
        "fantastic" => 2.6,
        "fast" | "quick" | "quickly" => 1.0,
        "fine" => 0.8,
        "friendly" => 2.2,
        "glad" => 2.0,
        "good" => 1.9,
        "great" => 3.1,
        "happy" => 2.7,
        "helpful" => 1.8,
        "impressed" => 2.2,
        "love" | "loved" => 3.0,
        "nice" => 1.8,
        "ok" | "okay" => 0.9,
        "outstanding" => 3.0,
        "perfect" | "perfectly" => 2.7,
        "pleased" => 2.0,
        "polite" => 1.6,
        "recommend" | "recommended" => 1.5,
        "resolved" | "solved" => 1.3,
        "satisfied" => 1.8,
        "smooth" => 1.5,
        "superb" => 3.1,
        "thank" => 1.5,
        "thanks" => 1.9,
        "wonderful" => 2.7,
        // Complaints and dissatisfaction.
        "angry" => -2.3,
        "annoyed" => -1.6,
        "annoying" => -1.7,
        "awful" => -2.0,
        "bad" => -2.5,
        "broken" => -2.0,
        "damaged" => -1.8,
        "delayed" | "late" => -1.2,
        "disappointed" | "disappointing" => -2.2,
        "dislike" => -1.6,
        "disgusting" => -2.4,
        "error" => -1.4,
        "fail" | "failed" | "failure" => -2.0,
        "fraud" | "scam" => -2.8,
        "frustrated" | "frustrating" => -2.2,
        "furious" => -3.1,
        "hate" | "hated" => -2.7,
        "horrible" => -2.5,
        "ignored" => -1.5,
        "incompetent" => -2.5,
        "issue" => -1.0,
        "lied" | "lies" => -1.6,
        "lost" => -1.2,
        "overcharged" => -2.0,
        "pathetic" => -2.5,
        "poor" => -2.1,
        "problem" => -1.7,
        "ridiculous" => -2.0,
        "rude" => -2.4,
        "sad" => -2.1,
        "slow" => -1.0,
        "terrible" => -2.5,
        "unacceptable" => -2.6,
        "unhappy" => -1.8,
        "unhelpful" => -1.9,
        "upset" => -1.6,
        "useless" => -2.5,
        "waiting" => -0.9,
        "waste" | "wasted" => -1.8,
        "worse" => -2.1,
        "worst" => -3.1,
        "wrong" => -2.1,
        _ => return None,
    };
    Some(v)
}

/// Words that strengthen (+) or weaken (-) the sentiment word after them.
fn booster(word: &str) -> Option<f64> {
    match word {
        "absolutely" | "completely" | "extremely" | "highly" | "incredibly" | "really" | "so"
        | "super" | "totally" | "truly" | "utterly" | "very" => Some(BOOST),
        "barely" | "hardly" | "kinda" | "marginally" | "slightly" | "somewhat" | "sorta" => {
            Some(-BOOST)
        }
        _ => None,
    }
}

fn is_negator(word: &str) -> bool {
    matches!(
        word,
        "not"
            | "no"
            | "never"
            | "nobody"
            | "nothing"
            | "none"
            | "neither"
            | "nor"
            | "nowhere"
            | "without"
            | "cannot"
            | "aint"
            | "arent"
            | "cant"
            | "couldnt"
            | "didnt"
            | "doesnt"
            | "dont"
            | "hadnt"
            | "hasnt"
            | "havent"
            | "isnt"
            | "shouldnt"
            | "wasnt"
            | "werent"
            | "wont"
            | "wouldnt"
    ) || word.ends_with("n't")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token {
    Word {
        valence: f64,
        shouted: bool,
    },
    Booster(f64),
    Negator,
    But,
    /// End of a clause: `,` `.` `;` `:` `!` `?` or a line break.
    Break,
    Other,
}

fn tokens(text: &str) -> Vec<Token> {
    let shouting_everywhere = !text.chars().any(char::is_lowercase);
    let mut raw: Vec<Option<&str>> = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() || c == '\'' || c == '’' {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            raw.push(Some(&text[s..i]));
        }
        if matches!(c, ',' | '.' | ';' | ':' | '!' | '?' | '\n') {
            raw.push(None);
        }
    }
    if let Some(s) = start {
        raw.push(Some(&text[s..]));
    }
    let words: Vec<Option<String>> = raw
        .iter()
        .map(|w| w.map(|w| w.replace('’', "'").trim_matches('\'').to_lowercase()))
        .collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let Some(word) = &words[i] else {
            out.push(Token::Break);
            i += 1;
            continue;
        };
        let next = words.get(i + 1).and_then(Option::as_deref);
        let bigram = match (word.as_str(), next) {
            ("kind" | "sort", Some("of")) | ("a", Some("bit" | "little")) => {
                Some(Token::Booster(-BOOST))
            }
            ("no", Some("one")) => Some(Token::Negator),
            _ => None,
        };
        if let Some(token) = bigram {
            out.push(token);
            i += 2;
            continue;
        }
        let original = raw[i].unwrap_or_default();
        let shouted = !shouting_everywhere
            && original.chars().filter(|c| c.is_alphabetic()).count() > 1
            && !original.chars().any(char::is_lowercase);
        // A plural or third person ("problems", "loves") scores as its stem.
        let stem = word.strip_suffix('s').filter(|s| s.len() > 2);
        out.push(match valence(word).or_else(|| stem.and_then(valence)) {
            Some(valence) => Token::Word { valence, shouted },
            None if word == "but" => Token::But,
            None if is_negator(word) => Token::Negator,
            None => booster(word).map_or(Token::Other, Token::Booster),
        });
        i += 1;
    }
    out
}

/// The sentiment of a text in (-1, 1), or None when it has no sentiment word at all.
pub fn sentiment(text: &str) -> Option<f64> {
    let tokens = tokens(text);
    let but = tokens.iter().position(|t| *t == Token::But);
    let mut sum = 0.0;
    let mut found = false;
    for (i, token) in tokens.iter().enumerate() {
        let Token::Word { valence, shouted } = *token else {
            continue;
        };
        found = true;
        let sign = valence.signum();
        let mut v = valence;
        if shouted {
            v += CAPS_BOOST * sign;
        }
        let mut negated = false;
        for (distance, previous) in tokens[..i].iter().rev().take(3).enumerate() {
            match previous {
                Token::Break => break,
                Token::Booster(b) => v += b * sign * (1.0 - 0.05 * distance as f64),
                Token::Negator => negated = true,
                _ => {}
            }
        }
        if negated {
            v *= NEGATION;
        }
        if let Some(b) = but {
            v *= if i < b { 0.5 } else { 1.5 };
        }
        sum += v;
    }
    if !found {
        return None;
    }
    let exclamations = text.matches('!').count().min(4) as f64;
    if sum != 0.0 {
        sum += exclamations * EXCLAMATION * sum.signum();
    }
    Some(sum / (sum * sum + NORMALISATION).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Timestamp};
    use waymark_proto::json::struct_from_json;

    const DAY_US: i64 = 86_400_000_000;

    fn at(us: i64) -> Option<Timestamp> {
        Some(waymark_kit::time::from_micros(us))
    }

    fn props(json: serde_json::Value) -> Option<Struct> {
        let serde_json::Value::Object(m) = json else {
            unreachable!()
        };
        Some(struct_from_json(m))
    }

    fn track(name: &str, properties: serde_json::Value, us: i64) -> Event {
        let mut e = Event {
            event_id: format!("e-{name}-{us}"),
            event: name.into(),
            properties: props(properties),
            timestamp: at(us),
            ..Event::default()
        };
        e.set_type(EventType::Track);
        e
    }

    fn score(text: &str) -> f64 {
        sentiment(text).unwrap_or_else(|| panic!("no sentiment in {text:?}"))
    }

    #[test]
    fn complaints_score_negative_and_praise_positive() {
        for text in [
            "I've been waiting two weeks and nobody answers, this is terrible",
            "The delivery was late again and the agent was rude. Unacceptable!",
            "Worst service ever, I want my money back",
            "I am so frustrated, the app keeps crashing and support is useless",
        ] {
            let s = score(text);
            assert!(
                matches!(label(s), EmotionLabel::Upset | EmotionLabel::Unhappy),
                "{text:?} scored {s}"
            );
        }
        for text in [
            "Thank you so much, the agent was amazing",
            "Great service, fast delivery, would recommend!",
            "Love it. The support team resolved my problem in minutes",
        ] {
            let s = score(text);
            assert!(
                matches!(label(s), EmotionLabel::Delighted | EmotionLabel::Satisfied),
                "{text:?} scored {s}"
            );
        }
    }

    #[test]
    fn negation_flips_and_damps() {
        assert!(score("not bad at all") > 0.0);
        assert!(score("The product isn't good") < 0.0);
        assert!(score("I am not happy with the service") < 0.0);
        assert!(
            score("Your chat bot wasn’t helpful") < 0.0,
            "typographic apostrophe"
        );
        assert!(score("no problem, thanks") > 0.0);
        assert!(
            score("not good") > -score("good"),
            "a negated word is weaker than its opposite"
        );
        // A clause break ends the negation.
        assert!(score("No, it was great") > 0.0);
    }

    #[test]
    fn boosters_caps_exclamations_and_but_shift_weight() {
        assert!(score("very good") > score("good"));
        assert!(score("slightly disappointed") > score("disappointed"));
        assert!(score("kind of disappointed") > score("disappointed"));
        assert!(score("I am ANGRY") < score("I am angry"));
        assert_eq!(
            score("I AM ANGRY"),
            score("i am angry"),
            "all caps is no emphasis"
        );
        assert!(score("terrible!!!") < score("terrible"));
        assert!(score("great!!!!!!!!") <= score("great!!!!") + f64::EPSILON);
        assert!(score("The agent was nice but the product is broken") < 0.0);
        assert!(score("problems") < 0.0, "plurals score as their stem");
    }

    #[test]
    fn text_without_sentiment_words_is_no_signal_and_nothing_panics() {
        assert_eq!(sentiment("Where is my parcel? Order #4411"), None);
        assert_eq!(sentiment(""), None);
        assert_eq!(sentiment("!!! ’’’ ' , ."), None);
        for text in [
            "great great great great great great great great!!!!",
            "😡 worst",
        ] {
            let s = score(text);
            assert!((-1.0..=1.0).contains(&s), "{text:?} scored {s}");
        }
    }

    #[test]
    fn survey_scores_map_onto_the_scale() {
        assert_eq!(csat_score(1.0), Some(-1.0));
        assert_eq!(csat_score(3.0), Some(0.0));
        assert_eq!(csat_score(5.0), Some(1.0));
        assert_eq!(csat_score(0.0), None);
        assert_eq!(csat_score(f64::NAN), None);
        for detractor in 0..=6 {
            assert!(nps_score(f64::from(detractor)).unwrap() < 0.0);
        }
        assert_eq!(label(nps_score(7.0).unwrap()), EmotionLabel::Neutral);
        assert_eq!(label(nps_score(8.0).unwrap()), EmotionLabel::Satisfied);
        assert_eq!(label(nps_score(9.0).unwrap()), EmotionLabel::Delighted);
        assert_eq!(nps_score(0.0), Some(-1.0));
        assert_eq!(nps_score(10.0), Some(1.0));
        assert_eq!(nps_score(11.0), None);
        assert_eq!(nps_score(-1.0), None);
    }

    #[test]
    fn signals_come_from_the_documented_events_and_properties() {
        let csat = signal(&track(
            "CSAT Submitted",
            serde_json::json!({"score": "5"}),
            1,
        ))
        .unwrap();
        assert_eq!((csat.kind.as_str(), csat.score), ("csat", 1.0));
        let nps = signal(&track("Survey Submitted", serde_json::json!({"nps": 0}), 1)).unwrap();
        assert_eq!((nps.kind.as_str(), nps.score), ("nps", -1.0));
        // An invalid csat falls through to the nps of the same survey.
        let both = serde_json::json!({"csat": 42, "nps": 10});
        assert_eq!(
            signal(&track("Survey Submitted", both, 1)).unwrap().kind,
            "nps"
        );
        let text = serde_json::json!({"body": "this is terrible"});
        let s = signal(&track("Support Ticket Created", text, 7)).unwrap();
        assert_eq!(s.kind, "sentiment");
        assert!(s.score < 0.0);
        assert_eq!(s.timestamp, at(7));
        assert_eq!(s.event_id, "e-Support Ticket Created-7");
        for (name, p) in [
            ("CSAT Submitted", serde_json::json!({"csat": "great"})),
            ("CSAT Submitted", serde_json::json!({"csat": 6})),
            ("NPS Submitted", serde_json::json!({"nps": true})),
            (
                "Chat Message Sent",
                serde_json::json!({"text": "where is my order"}),
            ),
            ("Chat Message Sent", serde_json::json!({"text": 5})),
            ("Order Completed", serde_json::json!({"text": "terrible"})),
        ] {
            assert_eq!(signal(&track(name, p.clone(), 1)), None, "{name} {p}");
        }
    }

    fn sig(score: f64, us: i64) -> EmotionSignal {
        EmotionSignal {
            event_id: format!("e-{us}"),
            event_name: "Test".into(),
            kind: "csat".into(),
            score,
            timestamp: at(us),
        }
    }

    #[test]
    fn the_score_decays_with_the_half_life() {
        let rules = EmotionRules::default();
        let mut e = None;
        observe(&mut e, sig(0.8, 0), &rules);
        let e = e.unwrap();
        assert_eq!(current(&e, 0, &rules), (0.8, EmotionLabel::Delighted));
        let (s, l) = current(&e, 7 * DAY_US, &rules);
        assert!((s - 0.4).abs() < 1e-9);
        assert_eq!(l, EmotionLabel::Satisfied);
        assert_eq!(current(&e, 60 * DAY_US, &rules).1, EmotionLabel::Neutral);
        assert_eq!(current(&e, -DAY_US, &rules).0, 0.8, "no decay backwards");
        assert_eq!(
            current(&Emotion::default(), 0, &rules),
            (0.0, EmotionLabel::Unspecified)
        );
        let forgetful = EmotionRules {
            half_life: Duration::ZERO,
        };
        assert_eq!(current(&e, 1, &forgetful).0, 0.0);
        assert_eq!(current(&e, 0, &forgetful).0, 0.8);
    }

    #[test]
    fn a_strong_fresh_signal_dominates_and_changes_are_reported() {
        let rules = EmotionRules::default();
        let mut e = None;
        let first = observe(&mut e, sig(1.0, 0), &rules).unwrap();
        assert_eq!(
            (first.previous, first.label),
            (EmotionLabel::Unspecified, EmotionLabel::Delighted)
        );
        assert_eq!(
            observe(&mut e, sig(0.9, 1), &rules),
            None,
            "no label change"
        );
        let furious = sig(-0.8, 3_600_000_000);
        let change = observe(&mut e, furious.clone(), &rules).unwrap();
        assert_eq!(
            (change.previous, change.label),
            (EmotionLabel::Delighted, EmotionLabel::Upset)
        );
        let e = e.unwrap();
        assert_eq!(e.label(), EmotionLabel::Upset);
        assert_eq!(e.last_signal, Some(furious));
        assert_eq!(e.updated_at, at(3_600_000_000));
        assert_eq!(change.score, e.score);
    }

    #[test]
    fn decay_moves_the_label_step_by_step_at_the_predicted_times() {
        let rules = EmotionRules::default();
        let mut e = None;
        observe(&mut e, sig(-1.0, 0), &rules);
        let mut e = e.unwrap();
        let anchor = (e.score, e.updated_at);
        // -1 reaches -0.6 after log2(1/0.6) half-lives, about 0.737 of a week.
        let first = next_change_at(&e, &rules).unwrap();
        let week = 7 * DAY_US;
        assert!(((first as f64 / week as f64) - (1.0f64 / 0.6).log2()).abs() < 1e-9);
        assert_eq!(settle(&mut e, first - 1, &rules), None, "not yet");
        let change = settle(&mut e, first, &rules).unwrap();
        assert_eq!(
            (change.previous, change.label, change.signal),
            (EmotionLabel::Upset, EmotionLabel::Unhappy, None)
        );
        assert!((change.score + 0.6).abs() < 1e-9);
        assert_eq!((e.score, e.updated_at), anchor, "the anchor stays");
        assert_eq!(settle(&mut e, first, &rules), None, "reported once");
        // Then -0.2, after log2(5) half-lives, and nothing further.
        let second = next_change_at(&e, &rules).unwrap();
        assert!(((second as f64 / week as f64) - 5f64.log2()).abs() < 1e-9);
        let change = settle(&mut e, second, &rules).unwrap();
        assert_eq!(change.label, EmotionLabel::Neutral);
        assert_eq!(next_change_at(&e, &rules), None);
        assert_eq!(next_change_at(&Emotion::default(), &rules), None);
        // A label already past its threshold is due at once.
        let mut stale = Emotion {
            score: 0.5,
            updated_at: at(9),
            ..Emotion::default()
        };
        stale.set_label(EmotionLabel::Delighted);
        assert_eq!(next_change_at(&stale, &rules), Some(9));
    }

    #[test]
    fn the_previous_label_is_the_decayed_one() {
        let rules = EmotionRules::default();
        let mut e = None;
        observe(&mut e, sig(-1.0, 0), &rules);
        // Two months later the old anger has faded; a new complaint is a change again.
        let change = observe(&mut e, sig(-0.9, 60 * DAY_US), &rules).unwrap();
        assert_eq!(
            (change.previous, change.label),
            (EmotionLabel::Neutral, EmotionLabel::Upset)
        );
    }

    #[test]
    fn a_late_signal_never_overwrites_the_newer_state() {
        let rules = EmotionRules::default();
        let (praise, complaint) = (sig(1.0, 100), sig(-0.8, 200));
        let mut in_order = None;
        observe(&mut in_order, praise.clone(), &rules);
        observe(&mut in_order, complaint.clone(), &rules);
        let mut late = None;
        observe(&mut late, complaint.clone(), &rules);
        assert_eq!(observe(&mut late, praise, &rules), None);
        let (in_order, late) = (in_order.unwrap(), late.unwrap());
        assert!(
            (in_order.score - late.score).abs() < 1e-9,
            "order does not matter"
        );
        assert_eq!(late.label(), EmotionLabel::Upset);
        assert_eq!(late.updated_at, at(200));
        assert_eq!(late.last_signal, Some(complaint));
    }

    #[test]
    fn the_newer_state_wins_a_merge() {
        let rules = EmotionRules::default();
        let (mut old, mut new) = (None, None);
        observe(&mut old, sig(1.0, 100), &rules);
        observe(&mut new, sig(-1.0, 200), &rules);
        let (old, new) = (old.unwrap(), new.unwrap());
        let mut survivor = Some(old.clone());
        merge(&mut survivor, &new);
        assert_eq!(survivor.as_ref(), Some(&new));
        merge(&mut survivor, &old);
        assert_eq!(survivor.as_ref(), Some(&new));
        merge(&mut survivor, &Emotion::default());
        assert_eq!(survivor.as_ref(), Some(&new));
        let mut empty = None;
        merge(&mut empty, &old);
        assert_eq!(empty, Some(old));
    }
}
