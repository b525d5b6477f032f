//! The rules the interpreter does not enforce, checked on the parsed tree.

use std::collections::BTreeSet;

use cel::Env;
use cel::common::ast::{EntryExpr, Expr, IdedExpr, operators};

use crate::{ConditionError, MAX_DEPTH};

/// The functions a condition may call: CEL's standard library (conversions, strings, sizes,
/// timestamps and durations). `matches` is left out with the `regex` feature: it compiles
/// its pattern on every call.
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

/// Checks `expr` and returns the allowed top-level variables it reads, sorted. `at` gives
/// the "line L, column C: " prefix of an expression's errors.
pub(crate) fn check(
    expr: &IdedExpr,
    variables: &[&str],
    env: &Env,
    at: impl Fn(u64) -> String,
) -> Result<Vec<String>, ConditionError> {
    let mut checker = Checker {
        variables,
        env,
        at,
        scope: Vec::new(),
        uses: BTreeSet::new(),
    };
    checker.walk(expr, 0, false)?;
    Ok(checker.uses.into_iter().map(str::to_owned).collect())
}

struct Checker<'a, F> {
    variables: &'a [&'a str],
    env: &'a Env,
    at: F,
    /// Variables bound by the enclosing macro.
    scope: Vec<&'a str>,
    uses: BTreeSet<&'a str>,
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
