use std::collections::BTreeMap;

use super::*;

const VARS: &[&str] = &[
    "traits",
    "computed",
    "emotion",
    "consent",
    "identities",
    "now",
];
const DAY_US: i64 = 86_400_000_000;
const NOW_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn vars() -> Variables {
    let mut vars = Variables::new();
    vars.set(
        "traits",
        map([
            ("plan", "pro".into()),
            ("age", 41.0.into()),
            ("vip", true.into()),
            ("tags", Value::List(vec!["beta".into(), "b2b".into()])),
        ]),
    )
    .set(
        "computed",
        map([
            ("last_seen", Value::Timestamp(NOW_US - 40 * DAY_US)),
            ("lifetime_value", 250.5.into()),
            ("total_events", 12i64.into()),
            ("event_counts", map([("Order Completed", 3i64.into())])),
        ]),
    )
    .set("consent", map([("email/marketing", true.into())]))
    .set("now", Value::Timestamp(NOW_US));
    vars
}

fn eval(source: &str) -> Result<bool, ConditionError> {
    Condition::compile(source, VARS)?.evaluate(&vars())
}

fn invalid(source: &str) -> String {
    match Condition::compile(source, VARS) {
        Err(ConditionError::Invalid(message)) => message,
        other => panic!("{source:?} compiled to {other:?}"),
    }
}

#[test]
fn typical_conditions_evaluate() {
    for (source, expected) in [
        (
            r#"traits.plan == "pro" && computed.lifetime_value > 100"#,
            true,
        ),
        (r#"traits.plan in ["pro", "enterprise"]"#, true),
        ("traits.age >= 18 && traits.vip", true),
        (r#""b2b" in traits.tags"#, true),
        (r#"traits.tags.exists(t, t.startsWith("be"))"#, true),
        (r#"computed.event_counts["Order Completed"] > 2"#, true),
        (r#"consent["email/marketing"]"#, true),
        (r#"now - computed.last_seen > duration("720h")"#, true),
        (r#"computed.last_seen > now - duration("720h")"#, false),
        ("type(traits.plan) == string", true),
        ("size(traits.tags) == 2", true),
    ] {
        assert_eq!(eval(source), Ok(expected), "{source}");
    }
}

#[test]
fn a_missing_key_makes_the_condition_false() {
    for (source, expected) in [
        (r#"traits.city == "Oslo""#, false),
        (r#"traits.city != "Oslo""#, false),
        (r#"consent["sms/marketing"]"#, false),
        ("has(traits.city)", false),
        ("has(traits.plan)", true),
        (r#"has(traits.city) && traits.city == "Oslo""#, false),
        (r#"!has(traits.city) || traits.city != "Oslo""#, true),
        ("traits.city == 1 || traits.vip", true),
        ("traits.city == 1 && !traits.vip", false),
    ] {
        assert_eq!(eval(source), Ok(expected), "{source}");
    }
}

#[test]
fn runtime_failures_name_types_never_values() {
    let mut vars = Variables::new();
    vars.set(
        "traits",
        map([
            ("email", "ada.secret@example.com".into()),
            ("age", 41.0.into()),
            ("tags", Value::List(vec!["secret-tag".into()])),
        ]),
    );
    for source in [
        "traits.email > 1",
        "traits.email + 1 == 2",
        "traits.age + traits.email == 1",
        "traits.email.startsWith(traits.age)",
        "traits.tags[traits.email] == 1",
        "traits.email == traits.age || traits.email < traits.age",
        "int(traits.email) == 1",
    ] {
        let result = Condition::compile(source, VARS).unwrap().evaluate(&vars);
        let Err(ConditionError::Evaluation(message)) = result else {
            panic!("{source}: {result:?}");
        };
        for secret in ["ada.secret", "secret-tag", "41"] {
            assert!(!message.contains(secret), "{source}: {message}");
        }
    }
}

#[test]
fn runtime_failures_are_errors() {
    for source in [
        "traits.plan > 1",
        "traits.plan.x.y.z == 1",
        "computed.total_events / 0 == 1",
        "computed.total_events + 0.5 > 1",
        "emotion.score > 0",
        "traits.plan",
        "computed.lifetime_value",
        r#"timestamp("yesterday") < now"#,
        "9223372036854775807 + computed.total_events > 0",
    ] {
        let result = eval(source);
        assert!(
            matches!(result, Err(ConditionError::Evaluation(_))),
            "{source}: {result:?}"
        );
    }
    assert_eq!(
        eval("traits.plan"),
        Err(ConditionError::Evaluation(
            "the condition yielded string, not a bool".into()
        ))
    );
}

#[test]
fn compile_rejects_what_it_cannot_run_safely() {
    assert_eq!(
        Condition::compile(" \n", VARS).unwrap_err(),
        ConditionError::Empty
    );
    let long = format!("traits.plan == \"{}\"", "x".repeat(MAX_SOURCE_BYTES));
    assert!(matches!(
        Condition::compile(&long, VARS),
        Err(ConditionError::TooLong(n)) if n == long.len()
    ));
    assert_eq!(
        invalid(r#"traits.plan == "pro" && trait.ltv > 1"#),
        "line 1, column 25: unknown variable `trait`; conditions can read traits, computed, \
         emotion, consent, identities, now"
    );
    assert_eq!(
        invalid("traits.plan == \"pro\" &&\n  exec(\"rm\")"),
        "line 2, column 7: unknown function `exec`"
    );
    assert_eq!(
        invalid("traits.plan.lowerAscii() == \"pro\""),
        "line 1, column 23: unknown function `lowerAscii`"
    );
    assert!(invalid("traits.plan ==").starts_with("line 1, column 15: Syntax error"));
    assert!(invalid("traits.?plan").starts_with("line 1, column 7: unsupported syntax"));
    assert!(invalid("google.protobuf.Duration{seconds: 1} == x").contains("not supported"));
    assert!(
        invalid("traits.tags.exists(t, traits.tags.exists(u, t == u))")
            .ends_with("cannot be nested")
    );
    assert!(invalid("traits.tags.map(t, [t, t]).exists(u, true)").ends_with("cannot be nested"));
    // Column positions count characters, not bytes.
    assert!(invalid(r#""éé" == bar"#).starts_with("line 1, column 9: unknown variable `bar`"));
}

#[test]
fn nesting_is_limited() {
    let parens = format!(
        "{}true{}",
        "(".repeat(MAX_DEPTH + 1),
        ")".repeat(MAX_DEPTH + 1)
    );
    assert!(
        invalid(&parens).ends_with(&format!("nested more than {MAX_DEPTH} levels deep")),
        "{}",
        invalid(&parens)
    );
    let sum = format!("1{} > 0", " + 1".repeat(MAX_DEPTH + 1));
    assert!(invalid(&sum).ends_with("levels deep"));
    let fields = format!("traits{} == 1", ".a".repeat(MAX_DEPTH + 1));
    assert!(invalid(&fields).ends_with("levels deep"));
    // The deepest accepted condition evaluates on this test thread's 2 MiB stack.
    let deepest = format!(
        "{}true{}",
        "!(!".repeat(MAX_DEPTH / 2 - 1),
        ")".repeat(MAX_DEPTH / 2 - 1)
    );
    assert_eq!(eval(&deepest), Ok(true));
    let deepest = format!("1{} > 0", " + 1".repeat(MAX_DEPTH - 2));
    assert_eq!(eval(&deepest), Ok(true));
}

#[test]
fn uses_reports_the_variables_read() {
    let c = Condition::compile(
        r#"traits.tags.exists(now, now == "x") && computed.total_events > 1"#,
        VARS,
    )
    .unwrap();
    assert!(c.uses("traits") && c.uses("computed"));
    assert!(!c.uses("now"), "a macro variable shadows the top-level one");
    let c = Condition::compile(r#"now - computed.last_seen > duration("1h")"#, VARS).unwrap();
    assert!(c.uses("now"));
    assert_eq!(c.source(), r#"now - computed.last_seen > duration("1h")"#);
}

#[test]
fn compile_once_evaluate_from_many_threads() {
    fn shareable<T: Send + Sync + Clone>() {}
    shareable::<Condition>();
    fn sendable<T: Send + Sync>() {}
    sendable::<Variables>();
    let c = Condition::compile("computed.total_events > 10", VARS).unwrap();
    std::thread::scope(|s| {
        for n in [5i64, 11, 20] {
            let c = c.clone();
            s.spawn(move || {
                let mut v = Variables::new();
                v.set("computed", map([("total_events", n.into())]));
                assert_eq!(c.evaluate(&v), Ok(n > 10));
            });
        }
    });
}

#[test]
fn every_allowed_function_exists() {
    let samples: BTreeMap<&str, &str> = [
        ("bool", r#"bool("true")"#),
        ("bytes", r#"size(bytes("ab")) == 2"#),
        ("contains", r#"traits.plan.contains("r")"#),
        ("double", "double(1) == 1.0"),
        ("duration", r#"duration("1h") > duration("1m")"#),
        ("dyn", "dyn(1) == 1"),
        ("endsWith", r#"traits.plan.endsWith("o")"#),
        ("getDate", "now.getDate() == 1"),
        ("getDayOfMonth", "now.getDayOfMonth() == 0"),
        ("getDayOfWeek", "now.getDayOfWeek() == 4"),
        ("getDayOfYear", "now.getDayOfYear() == 0"),
        ("getFullYear", "now.getFullYear() == 2026"),
        ("getHours", r#"now.getHours("Europe/Berlin") == 1"#),
        ("getMilliseconds", "now.getMilliseconds() == 0"),
        ("getMinutes", r#"duration("90m").getMinutes() == 90"#),
        ("getMonth", "now.getMonth() == 0"),
        ("getSeconds", "now.getSeconds() == 0"),
        ("int", "int(now) == 1767225600"),
        ("matches", r#"traits.plan.matches("^p")"#),
        ("size", "size(traits.tags) == 2"),
        ("startsWith", r#"traits.plan.startsWith("p")"#),
        ("string", r#"string(1) == "1""#),
        ("timestamp", r#"timestamp("2026-01-01T00:00:00Z") == now"#),
        ("type", "type(1) == int"),
        ("uint", "uint(1) == 1u"),
    ]
    .into();
    assert_eq!(samples.keys().copied().collect::<Vec<_>>(), FUNCTIONS);
    for (function, source) in samples {
        assert_eq!(eval(source), Ok(true), "{function}: {source}");
    }
}

#[test]
fn timestamps_outside_cel_range_are_null() {
    let mut v = Variables::new();
    v.set("now", Value::Timestamp(i64::MAX));
    let c = Condition::compile("now == null", VARS).unwrap();
    assert_eq!(c.evaluate(&v), Ok(true));
}

/// Malformed and hostile sources fail with an error, never a panic or a stack overflow.
#[test]
fn adversarial_sources_are_errors() {
    let near_limit = |unit: &str, tail: &str| {
        let mut s = unit.repeat((MAX_SOURCE_BYTES - tail.len()) / unit.len());
        s.push_str(tail);
        s
    };
    let sources = [
        near_limit("(", "true"),
        near_limit("(", ""),
        near_limit("[", "]"),
        near_limit("{1:", "1"),
        near_limit("!(", "true"),
        near_limit("-(", "1"),
        near_limit("size(", "1"),
        near_limit("1 + ", "1"),
        near_limit("traits.a", ""),
        near_limit("[0]", ""),
        near_limit(".size()", ""),
        near_limit("true ? 1 : ", "1"),
        near_limit("\"", ""),
        near_limit("\\", ""),
        near_limit("\u{0}", ""),
        "99999999999999999999999999 > 1".into(),
        "1e99999 > 1".into(),
        "-9223372036854775809 < 0".into(),
        "18446744073709551616u > 1u".into(),
        r#""\u00zz" == "a""#.into(),
        r#""unterminated"#.into(),
        "'''".into(),
        "foo(1)".into(),
        "traits.plan.foo()".into(),
        "__proto__ == 1".into(),
        ".traits.plan == 1".into(),
        "@in(1, [1])".into(),
        "traits.plan.x.y.z".into(),
        r#"{"a": 1, "a": 2}.a == 1"#.into(),
        r#"int("99999999999999999999") > 0"#.into(),
        r#"duration("99999999999999999999h") > duration("1s")"#.into(),
        "timestamp(253402300800) > now".into(),
        r#"now + duration("87000000h") > now"#.into(),
        r#"now.getHours("Mars/Olympus") == 1"#.into(),
        "[1, 2, 3][10] == 1".into(),
        r#"["a"].map(s, s + s).map(s, s + s).size() > 0"#.into(),
        r#"[1].all(x, [1].all(y, [1].all(z, true)))"#.into(),
        "1 + 1".into(),
        "null".into(),
        "computed".into(),
    ];
    for source in &sources {
        let result = Condition::compile(source, VARS).and_then(|c| c.evaluate(&vars()));
        assert!(result.is_err(), "{:.80}: {result:?}", source);
    }
}

/// The profile's variables with their declared types, as segments declare them.
fn typed() -> Vec<(&'static str, Type)> {
    vec![
        ("traits", Type::Map(Box::new(Type::Dyn))),
        (
            "computed",
            Type::object([
                ("lifetime_value", Type::Double),
                ("total_events", Type::Int),
                ("last_seen", Type::Timestamp),
                ("event_counts", Type::Map(Box::new(Type::Int))),
            ]),
        ),
        (
            "emotion",
            Type::object([("label", Type::String), ("score", Type::Double)]),
        ),
        ("consent", Type::Map(Box::new(Type::Bool))),
        (
            "identities",
            Type::Map(Box::new(Type::List(Box::new(Type::String)))),
        ),
        ("now", Type::Timestamp),
    ]
}

fn refused(source: &str) -> String {
    match Condition::compile_typed(source, &typed()) {
        Err(ConditionError::Invalid(message)) => message,
        other => panic!("{source:?} compiled to {other:?}"),
    }
}

#[test]
fn what_can_never_be_a_boolean_is_refused_where_it_is() {
    assert_eq!(
        refused("computed.lifetime_value"),
        "line 1, column 9: the condition yields a double, never a boolean"
    );
    assert_eq!(
        refused("emotion.label == 3"),
        "line 1, column 15: compares a string with a int: they are never equal"
    );
    assert!(
        refused(r#""a" * 1000000 == """#).contains("cannot multiply a string and a int"),
        "{}",
        refused(r#""a" * 1000000 == """#)
    );
    assert!(refused("computed.total_events + 1.5 > 3").contains("mixed arithmetic"));
    assert!(refused("emotion.mood == 'calm'").contains("no field `mood`"));
    assert!(refused("now > 5").contains("cannot order a timestamp and a int"));
    assert!(refused("consent['email/marketing'] && 'x'").contains("take booleans"));
    assert!(refused("size(3) > 1").contains("size() measures"));
    assert!(refused("emotion.label.size").contains("has no fields"));
    let on_line_two = refused("computed.total_events\n  .startsWith('1')");
    assert!(on_line_two.starts_with("line 2, "), "{on_line_two}");
}

#[test]
fn what_may_fit_at_evaluation_passes() {
    for source in [
        "traits.plan == 3",
        "traits.age + 1 > 40.0",
        "computed.total_events > 10 && computed.lifetime_value >= 100",
        "computed.total_events == 12.0",
        "now - computed.last_seen > duration('720h')",
        "'b2b' in traits.tags",
        "identities.email.exists(e, e.endsWith('@example.com'))",
        "computed.event_counts['Order Completed'] >= 3",
        "emotion.label == 'upset' ? true : consent['email/marketing']",
        "size(traits) > 0",
        "has(emotion.label)",
        "dyn(computed.lifetime_value) == 'x' || true",
    ] {
        Condition::compile_typed(source, &typed())
            .unwrap_or_else(|e| panic!("{source:?} was refused: {e}"));
    }
}

#[test]
fn matches_uses_a_linear_time_pattern_compiled_once() {
    let plan = Condition::compile("traits.plan.matches('^p(ro|lus)$')", VARS).unwrap();
    assert!(plan.evaluate(&vars()).unwrap());
    let global = Condition::compile("matches(traits.plan, '^basic')", VARS).unwrap();
    assert!(!global.evaluate(&vars()).unwrap());
    // A pattern that backtracking engines take exponential time on.
    let mut hostile = Variables::new();
    hostile.set("traits", map([("s", "a".repeat(5000).into())]));
    let evil = Condition::compile("traits.s.matches('^(a+)+$')", VARS).unwrap();
    assert!(evil.evaluate(&hostile).unwrap());

    assert!(invalid("traits.plan.matches(traits.pattern)").contains("string literal"));
    assert!(invalid("traits.plan.matches('(unclosed')").contains("invalid pattern"));
    let long = format!(
        "traits.plan.matches('{}')",
        "a".repeat(MAX_PATTERN_BYTES + 1)
    );
    assert!(invalid(&long).contains("at most 512"));
    assert!(invalid("traits.plan.matches('a{1000}{1000}')").contains("invalid pattern"));
}

#[test]
fn runs_of_unary_operators_count_toward_the_nesting_limit() {
    let nots = format!("{}traits.vip", "!".repeat(4000));
    assert_eq!(
        invalid(&nots),
        format!("line 1, column 1: nested more than {MAX_DEPTH} levels deep")
    );
    let minuses = format!("computed.total_events > {}1", "- ".repeat(MAX_DEPTH + 1));
    assert!(invalid(&minuses).contains("nested more than"));
    // Within the limit, in strings, and `!=` are fine.
    Condition::compile("!!traits.vip", VARS).unwrap();
    Condition::compile(&format!("traits.plan != '{}'", "!".repeat(100)), VARS).unwrap();
    Condition::compile("traits.age - -1 != 3.0", VARS).unwrap();
}
