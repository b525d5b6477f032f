//! Waymark's condition language: [CEL](https://cel.dev) expressions that segments and
//! journey splits are defined by. Conditions are data, never code: an expression can only
//! read the variables it is given and call CEL's standard functions, so a condition cannot
//! reach the host the way Apache Unomi's scripted conditions did (CVE-2020-13942).
//!
//! [`Condition::compile`] parses once and checks what the interpreter does not:
//!
//! - the source is 1 to [`MAX_SOURCE_BYTES`] bytes and nests at most [`MAX_DEPTH`] levels;
//! - every top-level variable is one the caller allows, and every function is one of CEL's
//!   standard functions ([`FUNCTIONS`]): a typo fails when the condition is saved, not on
//!   every profile later;
//! - the macros `all`, `exists`, `exists_one`, `map` and `filter` do not nest (neither in
//!   another's body nor in its range): the interpreter has no cost limit, and nesting is
//!   what turns a 4 KiB condition into billions of steps or an exponentially large value;
//! - no message construction (`T{...}`) and no optional syntax (`a.?b`).
//!
//! [`Condition::evaluate`] then runs it against [`Variables`] many times. Its result:
//!
//! - a missing map key anywhere (`traits.plan` on a profile without a plan, an absent
//!   `consent["email/marketing"]`) makes the whole condition false: a profile is never put
//!   in a segment on data it does not have. CEL's `&&` and `||` still decide when the
//!   other side does (`has(traits.plan) && traits.plan == "pro"`, `traits.vip || x`), and
//!   `has(traits.plan)` tests presence; note that `traits.plan != "pro"` is also false
//!   without a plan: write `!has(traits.plan) || traits.plan != "pro"` to include them;
//! - any other runtime failure (comparing a string with a number, a field of a string,
//!   division by zero, a variable that was not set) and a result that is not a bool are
//!   [`ConditionError::Evaluation`] errors, for the caller to log: they name the types of
//!   the values involved, never the values, which are a customer's personal data.

mod check;
mod types;
mod value;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock};

use cel::common::ast::SourceInfo;
use cel::extractors::This;
use cel::{Context, Env, ExecutionError, IdedExpr};

pub use check::{FUNCTIONS, MAX_PATTERN_BYTES};
pub use types::Type;
pub use value::{Value, Variables};

/// The longest condition accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 4096;
/// How deeply a condition may nest: brackets, calls, operators and field selections.
pub const MAX_DEPTH: usize = 32;

/// The stack the parser runs on. Its ANTLR runtime recurses on nesting before any limit
/// applies: a 4 KiB source of brackets needs up to 8 MiB in debug builds, more than a
/// Tokio worker (2 MiB) has. Only touched pages are committed.
const PARSER_STACK_BYTES: usize = 32 << 20;

/// The one environment: CEL's standard library without optional values.
static ENV: LazyLock<Arc<Env>> =
    LazyLock::new(|| Arc::new(Env::stdlib().with_optional_support(false)));

/// Why a condition was rejected or could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionError {
    /// The source is empty or blank.
    #[error("the condition is empty")]
    Empty,
    /// The source is longer than [`MAX_SOURCE_BYTES`].
    #[error("the condition is {0} bytes long; at most {MAX_SOURCE_BYTES} are allowed")]
    TooLong(usize),
    /// The source does not parse or breaks a rule; the message says where.
    #[error("{0}")]
    Invalid(String),
    /// Evaluation failed for these variables.
    #[error("{0}")]
    Evaluation(String),
}

/// A compiled condition: cheap to clone and to share between threads, evaluated many times.
///
/// It holds the checked syntax tree rather than a `cel::Program`: the tree is plain data
/// (`Send + Sync`), and the interpreter's per-evaluation state, a `cel::Context` borrowing
/// the variables, is created for each evaluation, which costs no allocation.
#[derive(Clone)]
pub struct Condition {
    inner: Arc<Compiled>,
}

struct Compiled {
    source: String,
    expr: IdedExpr,
    /// The allowed top-level variables the condition reads, sorted.
    uses: Vec<String>,
    /// The `matches` patterns, compiled once.
    patterns: Arc<std::collections::BTreeMap<String, regex::Regex>>,
}

impl Condition {
    /// Parses and checks `source`, which may read the top-level `variables` only, each of
    /// any type.
    pub fn compile(source: &str, variables: &[&str]) -> Result<Condition, ConditionError> {
        let untyped: Vec<(&str, Type)> = variables.iter().map(|v| (*v, Type::Dyn)).collect();
        Self::compile_typed(source, &untyped)
    }

    /// Parses and checks `source`, which may read the top-level `variables` only, of the
    /// types given: what can never yield a boolean, or mixes types that never fit, is
    /// refused with its line and column.
    pub fn compile_typed(
        source: &str,
        variables: &[(&str, Type)],
    ) -> Result<Condition, ConditionError> {
        if source.trim().is_empty() {
            return Err(ConditionError::Empty);
        }
        if source.len() > MAX_SOURCE_BYTES {
            return Err(ConditionError::TooLong(source.len()));
        }
        // A thread of our own for its stack, which also keeps a panic in the parser from
        // reaching the caller.
        let (expr, checked) = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("condition-parser".into())
                .stack_size(PARSER_STACK_BYTES)
                .spawn_scoped(scope, || parse_and_check(source, variables))
                .map_err(|e| ConditionError::Invalid(format!("could not start the parser: {e}")))?
                .join()
                .map_err(|_| ConditionError::Invalid("the parser failed on this input".into()))?
        })?;
        Ok(Condition {
            inner: Arc::new(Compiled {
                source: source.to_owned(),
                expr,
                uses: checked.uses,
                patterns: Arc::new(checked.patterns),
            }),
        })
    }

    /// The source it was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Whether it reads the top-level `variable`, e.g. `now`, which makes it time-based.
    pub fn uses(&self, variable: &str) -> bool {
        self.inner
            .uses
            .binary_search_by(|v| v.as_str().cmp(variable))
            .is_ok()
    }

    /// Evaluates it; see the crate documentation for missing keys and errors.
    pub fn evaluate(&self, vars: &Variables) -> Result<bool, ConditionError> {
        let resolver = vars.resolver();
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.set_variable_resolver(&resolver);
        if !self.inner.patterns.is_empty() {
            let patterns = Arc::clone(&self.inner.patterns);
            // `matches` is not in the environment, so this never conflicts.
            let _ = context.add_function(
                "matches",
                move |This(text): This<Arc<String>>, pattern: Arc<String>| -> bool {
                    // Every pattern was compiled when the condition was; the checker
                    // refuses any other.
                    patterns
                        .get(pattern.as_str())
                        .is_some_and(|regex| regex.is_match(&text))
                },
            );
        }
        // The interpreter is a large third-party crate: a panic in it on some input must
        // not take the event down with it.
        let result = catch_unwind(AssertUnwindSafe(|| {
            cel::Value::resolve(&self.inner.expr, &context)
        }))
        .map_err(|_| ConditionError::Evaluation("the interpreter failed on this input".into()))?;
        match result {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(ConditionError::Evaluation(format!(
                "the condition yielded {}, not a bool",
                other.type_of()
            ))),
            Err(ExecutionError::NoSuchKey(_)) => Ok(false),
            Err(e) => Err(ConditionError::Evaluation(describe(&e))),
        }
    }
}

/// What went wrong, by the types of the values involved and never the values: the
/// variables are a customer's personal data, and the message ends up in logs.
fn describe(error: &ExecutionError) -> String {
    use ExecutionError as E;
    let kinds = |values: &[&cel::Value]| {
        values
            .iter()
            .map(|v| v.type_of().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    match error {
        E::InvalidArgumentCount { expected, actual } => {
            format!("a function expected {expected} arguments, got {actual}")
        }
        E::UnsupportedTargetType { target } => {
            format!("a function does not apply to {}", kinds(&[target]))
        }
        E::NotSupportedAsMethod { method, target } => {
            format!("{method} is not a method of {}", kinds(&[target]))
        }
        E::UnsupportedKeyType(key) => format!("{} cannot be a map key", kinds(&[key])),
        E::UnexpectedType { got, want } => format!("got a {got} where a {want} was expected"),
        // Function and argument types only.
        E::NoSuchOverload(overload) => overload.to_string(),
        E::UndeclaredReference(name) => format!("{name} is not set"),
        E::MissingArgumentOrTarget => "a function is missing its argument or target".into(),
        E::ValuesNotComparable(a, b) => format!("{} cannot be compared", kinds(&[a, b])),
        E::UnsupportedBinaryOperator(op, a, b) => {
            format!("{op} does not apply to {}", kinds(&[a, b]))
        }
        E::UnsupportedIndex(index, target) => {
            format!("{} cannot index {}", kinds(&[index]), kinds(&[target]))
        }
        E::FunctionError { function, .. } => format!("{function} failed on its arguments"),
        E::DivisionByZero(_) => "division by zero".into(),
        E::RemainderByZero(_) => "remainder by zero".into(),
        E::Overflow(op, a, b) => format!("{op} of {} overflows", kinds(&[a, b])),
        E::IndexOutOfBounds(_) => "an index is out of bounds".into(),
        E::DuplicateKey(key) => format!("a map repeats a {} key", kinds(&[key])),
        E::NoSuchKey(_) => "a key is missing".into(),
        _ => "the interpreter failed on this input".into(),
    }
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition")
            .field(&self.inner.source)
            .finish()
    }
}

fn parse_and_check(
    source: &str,
    variables: &[(&str, Type)],
) -> Result<(IdedExpr, check::Checked), ConditionError> {
    // The parser folds a run of `!` or `-` into at most one operator before any depth
    // limit sees it; count the run in the source instead.
    if let Some((line, column)) = unary_run_past_limit(source) {
        return Err(ConditionError::Invalid(format!(
            "line {line}, column {column}: nested more than {MAX_DEPTH} levels deep"
        )));
    }
    // MAX_DEPTH always fits: the parser takes a u16.
    let parser = ENV.parser().max_recursion_depth(MAX_DEPTH as u16);
    let (expr, info) = parser.parse_with_source_info(source).map_err(|errors| {
        // Later errors are mostly the parser's recovery from the first.
        let Some(first) = errors.errors.first() else {
            return ConditionError::Invalid("the condition does not parse".into());
        };
        let problem = if first.msg.contains("Recursion limit") {
            format!("nested more than {MAX_DEPTH} levels deep")
        } else {
            first.msg.clone()
        };
        let (line, column) = first.pos;
        ConditionError::Invalid(format!("line {line}, column {column}: {problem}"))
    })?;
    let names: Vec<&str> = variables.iter().map(|(name, _)| *name).collect();
    let checked = check::check(&expr, &names, &ENV, |id| position(&info, id))?;
    types::check(&expr, variables, &|id| position(&info, id))?;
    Ok((expr, checked))
}

/// Where a run of more than [`MAX_DEPTH`] unary operators (`!` and `-`, spaces between
/// allowed) starts outside string literals, as line and column from 1.
fn unary_run_past_limit(source: &str) -> Option<(usize, usize)> {
    let (mut line, mut column) = (1, 0);
    let mut run = 0;
    let mut run_start = (1, 1);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for ch in source.chars() {
        if ch == '\n' {
            (line, column) = (line + 1, 0);
        } else {
            column += 1;
        }
        if let Some(q) = quote {
            match ch {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if ch == q => quote = None,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' | '\'' => {
                quote = Some(ch);
                run = 0;
            }
            '!' | '-' => {
                if run == 0 {
                    run_start = (line, column);
                }
                run += 1;
                if run > MAX_DEPTH {
                    return Some(run_start);
                }
            }
            // `!=` is an operator of its own.
            '=' => run = 0,
            c if c.is_whitespace() => {}
            _ => run = 0,
        }
    }
    None
}

/// "line L, column C: " (both from 1, the column in characters) where the expression `id`
/// starts, or nothing if that is not known.
fn position(info: &SourceInfo, id: u64) -> String {
    let Some(before) = info
        .offset_for(id)
        .and_then(|(start, _)| info.source.get(..start as usize))
    else {
        return String::new();
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: ")
}

#[cfg(test)]
mod tests;
