//! Types, checked when a condition is saved: a condition that can never yield a boolean,
//! or that compares, combines or reads values of types that never fit, is refused with
//! its line and column, instead of leaving its segment empty forever and warning on every
//! evaluation. Variables declared [`Type::Dyn`] (profile traits, whose shape each
//! customer decides) and everything read through them pass: only what is certain fails.

use std::collections::BTreeMap;

use cel::common::ast::LiteralValue;
use cel::common::ast::{EntryExpr, Expr, IdedExpr, operators};

use crate::ConditionError;

/// What a condition's value is known to be when it is saved.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    /// Unknown until evaluation (traits, and what is read from them).
    Dyn,
    Null,
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Timestamp,
    Duration,
    /// A list of elements of one type.
    List(Box<Type>),
    /// A map from strings to values of one type.
    Map(Box<Type>),
    /// A map whose keys are known, each with its type (e.g. `emotion`).
    Object(BTreeMap<&'static str, Type>),
    /// A type, as `type(x)` yields.
    TypeValue,
}

impl Type {
    /// A map with these fields.
    pub fn object<const N: usize>(fields: [(&'static str, Type); N]) -> Type {
        Type::Object(fields.into_iter().collect())
    }

    fn name(&self) -> String {
        match self {
            Type::Dyn => "dyn".into(),
            Type::Null => "null".into(),
            Type::Bool => "bool".into(),
            Type::Int => "int".into(),
            Type::Uint => "uint".into(),
            Type::Double => "double".into(),
            Type::String => "string".into(),
            Type::Bytes => "bytes".into(),
            Type::Timestamp => "timestamp".into(),
            Type::Duration => "duration".into(),
            Type::List(t) => format!("list of {}", t.name()),
            Type::Map(t) => format!("map of {}", t.name()),
            Type::Object(_) => "map".into(),
            Type::TypeValue => "type".into(),
        }
    }

    fn is_numeric(&self) -> bool {
        matches!(self, Type::Int | Type::Uint | Type::Double)
    }

    fn is_map(&self) -> bool {
        matches!(self, Type::Map(_) | Type::Object(_))
    }

    /// Whether a value of this type may be one of `kinds` at evaluation.
    fn may_be(&self, kinds: &[Type]) -> bool {
        *self == Type::Dyn
            || kinds
                .iter()
                .any(|k| std::mem::discriminant(k) == std::mem::discriminant(self))
    }

    /// What two branches (of `?:`, of a list) have in common.
    fn join(self, other: Type) -> Type {
        if self == other { self } else { Type::Dyn }
    }
}

/// Checks `expr` against the declared `variables`; `at` gives the "line L, column C: "
/// prefix of an expression.
pub(crate) fn check(
    expr: &IdedExpr,
    variables: &[(&str, Type)],
    at: &dyn Fn(u64) -> String,
) -> Result<(), ConditionError> {
    let mut typer = Typer {
        variables,
        at,
        scope: Vec::new(),
    };
    let result = typer.infer(expr)?;
    if result.may_be(&[Type::Bool]) {
        Ok(())
    } else {
        Err(typer.invalid(
            expr,
            format!("the condition yields a {}, never a boolean", result.name()),
        ))
    }
}

struct Typer<'a> {
    variables: &'a [(&'a str, Type)],
    at: &'a dyn Fn(u64) -> String,
    /// Variables bound by the enclosing macros, innermost last.
    scope: Vec<(String, Type)>,
}

impl Typer<'_> {
    fn invalid(&self, e: &IdedExpr, problem: String) -> ConditionError {
        ConditionError::Invalid(format!("{}{problem}", (self.at)(e.id)))
    }

    fn infer(&mut self, e: &IdedExpr) -> Result<Type, ConditionError> {
        match &e.expr {
            Expr::Literal(value) => Ok(match value {
                LiteralValue::Null => Type::Null,
                LiteralValue::Boolean(_) => Type::Bool,
                LiteralValue::Int(_) => Type::Int,
                LiteralValue::UInt(_) => Type::Uint,
                LiteralValue::Double(_) => Type::Double,
                LiteralValue::String(_) => Type::String,
                LiteralValue::Bytes(_) => Type::Bytes,
            }),
            Expr::Ident(name) => Ok(self.ident(name)),
            Expr::Select(select) => {
                let operand = self.infer(&select.operand)?;
                if select.test {
                    return Ok(Type::Bool);
                }
                self.field(e, operand, &select.field)
            }
            Expr::Call(call) => {
                let target = match &call.target {
                    Some(t) => Some(self.infer(t)?),
                    None => None,
                };
                let args = call
                    .args
                    .iter()
                    .map(|a| self.infer(a))
                    .collect::<Result<Vec<_>, _>>()?;
                self.call(e, &call.func_name, target, args)
            }
            Expr::List(list) => {
                let mut element: Option<Type> = None;
                for item in &list.elements {
                    let t = self.infer(item)?;
                    element = Some(match element {
                        None => t,
                        Some(previous) => previous.join(t),
                    });
                }
                Ok(Type::List(Box::new(element.unwrap_or(Type::Dyn))))
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.infer(&entry.key)?;
                        self.infer(&entry.value)?;
                    }
                }
                Ok(Type::Map(Box::new(Type::Dyn)))
            }
            Expr::Comprehension(c) => {
                let range = self.infer(&c.iter_range)?;
                let element = match range {
                    Type::List(t) => *t,
                    // Macros over a map range over its keys.
                    Type::Map(_) | Type::Object(_) => Type::String,
                    _ => Type::Dyn,
                };
                let accumulator = self.infer(&c.accu_init)?;
                let outer = self.scope.len();
                self.scope.push((c.iter_var.clone(), element));
                if let Some(second) = &c.iter_var2 {
                    self.scope.push((second.clone(), Type::Dyn));
                }
                self.scope.push((c.accu_var.clone(), accumulator));
                self.infer(&c.loop_cond)?;
                self.infer(&c.loop_step)?;
                let result = self.infer(&c.result);
                self.scope.truncate(outer);
                result
            }
            Expr::Struct(_) | Expr::Unspecified => Ok(Type::Dyn),
        }
    }

    fn ident(&self, name: &str) -> Type {
        if let Some((_, t)) = self.scope.iter().rev().find(|(n, _)| n == name) {
            return t.clone();
        }
        match self.variables.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => t.clone(),
            // Type names (`int`, `string`) are values of type `type`.
            None => Type::TypeValue,
        }
    }

    fn field(&self, e: &IdedExpr, operand: Type, field: &str) -> Result<Type, ConditionError> {
        match operand {
            Type::Dyn => Ok(Type::Dyn),
            Type::Map(value) => Ok(*value),
            Type::Object(fields) => match fields.get(field) {
                Some(t) => Ok(t.clone()),
                None => Err(self.invalid(
                    e,
                    format!(
                        "no field `{field}` here; there are {}",
                        fields.keys().copied().collect::<Vec<_>>().join(", ")
                    ),
                )),
            },
            other => Err(self.invalid(e, format!("a {} has no fields (`.{field}`)", other.name()))),
        }
    }

    fn call(
        &self,
        e: &IdedExpr,
        name: &str,
        target: Option<Type>,
        args: Vec<Type>,
    ) -> Result<Type, ConditionError> {
        use Type::*;
        // Functions may be called as members (`s.size()`) or globally (`size(s)`).
        let mut all: Vec<Type> = target.into_iter().collect();
        all.extend(args);
        let arg = |i: usize| all.get(i).cloned().unwrap_or(Dyn);
        let expect = |i: usize, kinds: &[Type], what: &str| -> Result<(), ConditionError> {
            let t = arg(i);
            if t.may_be(kinds) {
                Ok(())
            } else {
                Err(self.invalid(e, format!("{what}, not a {}", t.name())))
            }
        };
        match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR => {
                expect(0, &[Bool], "`&&` and `||` take booleans")?;
                expect(1, &[Bool], "`&&` and `||` take booleans")?;
                Ok(Bool)
            }
            operators::LOGICAL_NOT => {
                expect(0, &[Bool], "`!` takes a boolean")?;
                Ok(Bool)
            }
            operators::NOT_STRICTLY_FALSE => Ok(Bool),
            operators::CONDITIONAL => {
                expect(0, &[Bool], "the condition of `? :` is a boolean")?;
                Ok(arg(1).join(arg(2)))
            }
            operators::EQUALS | operators::NOT_EQUALS => {
                let (a, b) = (arg(0), arg(1));
                if !comparable(&a, &b) {
                    return Err(self.invalid(
                        e,
                        format!(
                            "compares a {} with a {}: they are never equal",
                            a.name(),
                            b.name()
                        ),
                    ));
                }
                Ok(Bool)
            }
            operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                let (a, b) = (arg(0), arg(1));
                let ordered = a == Dyn
                    || b == Dyn
                    || (a.is_numeric() && b.is_numeric())
                    || (a == b && matches!(a, String | Timestamp | Duration | Bool | Bytes));
                if !ordered {
                    return Err(
                        self.invalid(e, format!("cannot order a {} and a {}", a.name(), b.name()))
                    );
                }
                Ok(Bool)
            }
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO => self.arithmetic(e, name, arg(0), arg(1)),
            operators::NEGATE => {
                expect(0, &[Int, Double], "`-` negates a number")?;
                Ok(arg(0))
            }
            operators::INDEX => match (arg(0), arg(1)) {
                (Dyn, _) => Ok(Dyn),
                (List(t), i) if i.may_be(&[Int, Uint]) => Ok(*t),
                (Map(t), k) if k.may_be(&[String]) => Ok(*t),
                (Object(_), k) if k.may_be(&[String]) => Ok(Dyn),
                (container, key) => Err(self.invalid(
                    e,
                    format!("cannot index a {} with a {}", container.name(), key.name()),
                )),
            },
            operators::IN => {
                let container = arg(1);
                if container.may_be(&[List(Box::new(Dyn)), Map(Box::new(Dyn))])
                    || container.is_map()
                {
                    Ok(Bool)
                } else {
                    Err(self.invalid(
                        e,
                        format!(
                            "`in` looks into a list or a map, not a {}",
                            container.name()
                        ),
                    ))
                }
            }
            "size" => {
                let t = arg(0);
                if t.may_be(&[String, Bytes, List(Box::new(Dyn)), Map(Box::new(Dyn))]) || t.is_map()
                {
                    Ok(Int)
                } else {
                    Err(self.invalid(
                        e,
                        format!(
                            "size() measures a string, bytes, a list or a map, not a {}",
                            t.name()
                        ),
                    ))
                }
            }
            "contains" | "startsWith" | "endsWith" | "matches" => {
                expect(0, &[String], &format!("{name}() works on a string"))?;
                expect(1, &[String], &format!("{name}() takes a string"))?;
                Ok(Bool)
            }
            "int" => Ok(Int),
            "uint" => Ok(Uint),
            "double" => Ok(Double),
            "string" => Ok(String),
            "bytes" => Ok(Bytes),
            "bool" => Ok(Bool),
            "dyn" => Ok(Dyn),
            "type" => Ok(TypeValue),
            "timestamp" => Ok(Timestamp),
            "duration" => Ok(Duration),
            _ if name.starts_with("get") => {
                expect(
                    0,
                    &[Timestamp, Duration],
                    &format!("{name}() reads a timestamp"),
                )?;
                Ok(Int)
            }
            _ => Ok(Dyn),
        }
    }

    fn arithmetic(&self, e: &IdedExpr, op: &str, a: Type, b: Type) -> Result<Type, ConditionError> {
        use Type::*;
        if a == Dyn || b == Dyn {
            return Ok(Dyn);
        }
        let result = match (op, &a, &b) {
            (_, x, y)
                if x == y
                    && matches!(x, Int | Uint | Double)
                    && (op != operators::MODULO || *x != Double) =>
            {
                Some(a.clone())
            }
            (operators::ADD, String, String) | (operators::ADD, Bytes, Bytes) => Some(a.clone()),
            (operators::ADD, List(_), List(_)) => Some(a.clone().join(b.clone())),
            (operators::ADD, Timestamp, Duration) | (operators::ADD, Duration, Timestamp) => {
                Some(Timestamp)
            }
            (operators::ADD | operators::SUBSTRACT, Duration, Duration) => Some(Duration),
            (operators::SUBSTRACT, Timestamp, Timestamp) => Some(Duration),
            (operators::SUBSTRACT, Timestamp, Duration) => Some(Timestamp),
            _ => None,
        };
        let verb = match op {
            operators::ADD => "add",
            operators::SUBSTRACT => "subtract",
            operators::MULTIPLY => "multiply",
            operators::DIVIDE => "divide",
            _ => "take the remainder of",
        };
        result.ok_or_else(|| {
            let hint = if a.is_numeric() && b.is_numeric() {
                " (CEL does no mixed arithmetic: convert one with int() or double())"
            } else {
                ""
            };
            self.invalid(
                e,
                format!("cannot {verb} a {} and a {}{hint}", a.name(), b.name()),
            )
        })
    }
}

/// Whether values of these types can ever be equal.
fn comparable(a: &Type, b: &Type) -> bool {
    use Type::*;
    match (a, b) {
        (Dyn, _) | (_, Dyn) => true,
        _ if a.is_numeric() && b.is_numeric() => true,
        _ if a.is_map() && b.is_map() => true,
        (List(_), List(_)) => true,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}
