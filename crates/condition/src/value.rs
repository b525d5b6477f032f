//! The data conditions read.

use std::collections::{BTreeMap, HashMap};

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

/// A JSON-like value, plus timestamps.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `bool`.
    Bool(bool),
    /// `int`. CEL compares ints and doubles with each other (`1 == 1.0`, `x > 100`) but
    /// does no mixed arithmetic.
    Int(i64),
    /// `double`.
    Double(f64),
    /// `string`.
    String(String),
    /// `timestamp`, in microseconds since the Unix epoch; null outside what CEL can
    /// represent.
    Timestamp(i64),
    /// `list`.
    List(Vec<Value>),
    /// `map` with string keys.
    Map(BTreeMap<String, Value>),
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<f64> for Value {
    fn from(n: f64) -> Self {
        Value::Double(n)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl Value {
    /// The interpreter's own representation, built once per [`Variables::set`] so that
    /// evaluations only borrow it.
    fn into_val(self) -> Box<dyn Val> {
        match self {
            Value::Null => Box::new(CelNull),
            Value::Bool(b) => Box::new(CelBool::from(b)),
            Value::Int(n) => Box::new(CelInt::from(n)),
            Value::Double(n) => Box::new(CelDouble::from(n)),
            Value::String(s) => Box::new(CelString::from(s)),
            Value::Timestamp(us) => match chrono::DateTime::from_timestamp_micros(us) {
                Some(t) => Box::new(CelTimestamp::from(t.fixed_offset())),
                None => Box::new(CelNull),
            },
            Value::List(items) => Box::new(CelList::from(
                items.into_iter().map(Value::into_val).collect::<Vec<_>>(),
            )),
            Value::Map(entries) => Box::new(CelMap::from(
                entries
                    .into_iter()
                    .map(|(k, v)| (CelMapKey::from(k), v.into_val()))
                    .collect::<HashMap<_, _>>(),
            )),
        }
    }
}

/// The top-level variables of one evaluation, e.g. one profile's. Build it once and
/// evaluate every condition against it.
#[derive(Debug, Default)]
pub struct Variables {
    values: HashMap<String, Box<dyn Val>>,
}

impl Variables {
    /// No variables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) the variable `name`.
    pub fn set(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        self.values.insert(name.to_owned(), value.into().into_val());
        self
    }

    pub(crate) fn resolver(&self) -> Resolver<'_> {
        Resolver(self)
    }
}

/// Lends the variables to the interpreter without copying them. A private type, so that
/// `cel`'s trait stays out of this crate's API.
pub(crate) struct Resolver<'a>(&'a Variables);

impl VariableResolver for Resolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        self.0
            .values
            .get(variable)
            .map(|v| CowVal::Borrowed(v.as_ref()))
    }
}
