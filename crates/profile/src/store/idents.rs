//! Identifiers, `(type, value)` pairs, as statement parameters.

use sea_orm::Value;

use crate::identity::Ident;

/// `(?, ?), (?, ?), ...` for `idents`, and their values in order.
pub(crate) fn ident_pairs(idents: &[Ident]) -> (String, Vec<Value>) {
    let placeholders = vec!["(?, ?)"; idents.len()].join(", ");
    let values = idents
        .iter()
        .flat_map(|(t, v)| [t.as_str().into(), v.as_str().into()])
        .collect();
    (placeholders, values)
}

/// `idents` as two PostgreSQL array parameters (types, values), for joining with
/// `UNNEST(?::text[], ?::text[]) AS k(t, v)`.
pub(crate) fn ident_arrays(idents: &[Ident]) -> [Value; 2] {
    let (types, values): (Vec<String>, Vec<String>) = idents.iter().cloned().unzip();
    [types.into(), values.into()]
}
