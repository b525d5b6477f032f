//! Conversions between JSON and `google.protobuf.Struct`/`Value`, which carry free-form
//! properties, traits and context in events.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// A JSON object as a `Struct`.
pub fn struct_from_json(map: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, value_from_json(v)))
            .collect(),
    }
}

/// A JSON value as a protobuf `Value`.
pub fn value_from_json(value: serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(value_from_json).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(struct_from_json(map)),
    };
    Value { kind: Some(kind) }
}

/// A `Struct` as a JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// A protobuf `Value` as JSON; whole numbers come back as integers.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
    }
}

/// The string at `path` (e.g. `["library", "name"]`) inside a struct, if there is one.
pub fn string_at<'a>(s: &'a Struct, path: &[&str]) -> Option<&'a str> {
    let (last, parents) = path.split_last()?;
    let mut current = s;
    for key in parents {
        match current.fields.get(*key)?.kind.as_ref()? {
            Kind::StructValue(inner) => current = inner,
            _ => return None,
        }
    }
    match current.fields.get(*last)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({
            "plan": "pro", "seats": 3, "price": 9.5, "tags": ["a", true, null],
            "address": {"city": "Berlin"}
        });
        let serde_json::Value::Object(map) = json.clone() else {
            unreachable!()
        };
        let s = struct_from_json(map);
        assert_eq!(serde_json::Value::Object(struct_to_json(&s)), json);
        assert_eq!(string_at(&s, &["address", "city"]), Some("Berlin"));
        assert_eq!(string_at(&s, &["plan", "x"]), None);
    }
}
