//! The rules the interpreter does not enforce, checked on the parsed tree.

use std::collections::{BTreeMap, BTreeSet};

use cel::Env;
use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators};

use crate::{ConditionError, MAX_DEPTH};

/// The functions a condition may call: CEL's standard library (conversions, strings, sizes,
/// timestamps and durations). `matches` is ours rather than the interpreter's (which
/// compiles its pattern on every call): its pattern must be a string literal, compiled once
/// with the `regex` crate, which matches in time linear in the input.
pub const FUNCTIONS: &[&str] = &[
    "bool",
    "bytes",
    "contains",
    "double",
    "duration",
    "dyn",
    "endsWith",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    "int",
    "matches",
    "size",
    "startsWith",
    "string",
    "timestamp",
    "type",
    "uint",
];

/// What operators and expanded macros call.
const OPERATORS: &[&str] = &[
    operators::CONDITIONAL,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::SUBSTRACT,
    operators::ADD,
    operators::MULTIPLY,
    operators::DIVIDE,
    operators::MODULO,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::NEGATE,
    operators::INDEX,
    operators::IN,
    operators::NOT_STRICTLY_FALSE,
];

/// The longest `matches` pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 512;
/// The most memory a compiled `matches` pattern may take.
const MAX_COMPILED_PATTERN_BYTES: usize = 1 << 20;

/// What a checked condition reads and the patterns it matches.
pub(crate) struct Checked {
    /// The allowed top-level variables it reads, sorted.
    pub uses: Vec<String>,
    /// Its `matches` patterns, compiled.
    pub patterns: BTreeMap<String, regex::Regex>,
}

/// Checks `expr`. `at` gives the "line L, column C: " prefix of an expression's errors.
pub(crate) fn check(
    expr: &IdedExpr,
    variables: &[&str],
    env: &Env,
    at: impl Fn(u64) -> String,
) -> Result<Checked, ConditionError> {
    let mut checker = Checker {
        variables,
        env,
        at,
        scope: Vec::new(),
        uses: BTreeSet::new(),
        patterns: BTreeMap::new(),
    };
    checker.walk(expr, 0, false)?;
    Ok(Checked {
        uses: checker.uses.into_iter().map(str::to_owned).collect(),
        patterns: checker.patterns,
    })
}

struct Checker<'a, F> {
    variables: &'a [&'a str],
    env: &'a Env,
    at: F,
    /// Variables bound by the enclosing macro.
    scope: Vec<&'a str>,
    uses: BTreeSet<&'a str>,
    patterns: BTreeMap<String, regex::Regex>,
}

impl<'a, F: Fn(u64) -> String> Checker<'a, F> {
    fn invalid(&self, e: &IdedExpr, problem: String) -> ConditionError {
        ConditionError::Invalid(format!("{}{problem}", (self.at)(e.id)))
    }

    fn walk(
        &mut self,
        e: &'a IdedExpr,
        depth: usize,
        in_macro: bool,
    ) -> Result<(), ConditionError> {
        if depth > MAX_DEPTH {
            return Err(self.invalid(e, format!("nested more than {MAX_DEPTH} levels deep")));
        }
        let depth = depth + 1;
        match &e.expr {
            Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => self.ident(e, name),
            Expr::Select(select) => self.walk(&select.operand, depth, in_macro),
            Expr::Call(call) => {
                let name = call.func_name.as_str();
                if !FUNCTIONS.contains(&name) && !OPERATORS.contains(&name) {
                    return Err(self.invalid(e, format!("unknown function `{name}`")));
                }
                if name == "matches" {
                    self.pattern(e, call)?;
                }
                if let Some(target) = &call.target {
                    self.walk(target, depth, in_macro)?;
                }
                call.args
                    .iter()
                    .try_for_each(|arg| self.walk(arg, depth, in_macro))
            }
            Expr::List(list) => list
                .elements
                .iter()
                .try_for_each(|element| self.walk(element, depth, in_macro)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(entry) => {
                    self.walk(&entry.key, depth, in_macro)?;
                    self.walk(&entry.value, depth, in_macro)
                }
                EntryExpr::StructField(_) => {
                    Err(self.invalid(e, "message fields are not supported".into()))
                }
            }),
            Expr::Comprehension(c) => {
                if in_macro {
                    return Err(self.invalid(
                        e,
                        "all, exists, exists_one, map and filter cannot be nested".into(),
                    ));
                }
                self.walk(&c.iter_range, depth, true)?;
                self.walk(&c.accu_init, depth, true)?;
                let outer = self.scope.len();
                self.scope.push(&c.iter_var);
                self.scope.extend(c.iter_var2.as_deref());
                self.scope.push(&c.accu_var);
                for part in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.walk(part, depth, true)?;
                }
                self.scope.truncate(outer);
                Ok(())
            }
            Expr::Struct(s) => Err(self.invalid(
                e,
                format!(
                    "constructing messages (`{}{{...}}`) is not supported",
                    s.type_name
                ),
            )),
            Expr::Unspecified => Err(self.invalid(e, "unsupported expression".into())),
        }
    }

    /// A `matches` call's pattern: a string literal, compiled now within the limits.
    fn pattern(&mut self, e: &IdedExpr, call: &CallExpr) -> Result<(), ConditionError> {
        let arity = call.args.len() + usize::from(call.target.is_some());
        let pattern = match (arity, call.args.last().map(|a| &a.expr)) {
            (2, Some(Expr::Literal(LiteralValue::String(pattern)))) => pattern.inner().to_owned(),
            _ => {
                return Err(self.invalid(
                    e,
                    "matches() takes its pattern as a string literal, e.g. s.matches('^[a-z]+$')"
                        .into(),
                ));
            }
        };
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(self.invalid(
                e,
                format!(
                    "the pattern is {} bytes; at most {MAX_PATTERN_BYTES} are allowed",
                    pattern.len()
                ),
            ));
        }
        let compiled = regex::RegexBuilder::new(&pattern)
            .size_limit(MAX_COMPILED_PATTERN_BYTES)
            .build()
            .map_err(|error| self.invalid(e, format!("invalid pattern: {error}")))?;
        self.patterns.insert(pattern, compiled);
        Ok(())
    }

    fn ident(&mut self, e: &IdedExpr, name: &'a str) -> Result<(), ConditionError> {
        if self.scope.contains(&name) || self.env.types().find_type(name).is_some() {
            return Ok(());
        }
        if !self.variables.contains(&name) {
            return Err(self.invalid(
                e,
                format!(
                    "unknown variable `{name}`; conditions can read {}",
                    self.variables.join(", ")
                ),
            ));
        }
        self.uses.insert(name);
        Ok(())
    }
}
