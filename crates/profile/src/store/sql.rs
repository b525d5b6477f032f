//! Statements written once for both backends: `?` placeholders, bulk inserts by column
//! (PostgreSQL arrays, SQLite multi-row `VALUES`) or by row, in chunks under the
//! parameter limit.

use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, QueryResult, Statement, Value,
};
use waymark_kit::db::sql;

use crate::identity::Ident;

/// Bound parameters per statement stay well under both backends' limits.
pub(crate) const MAX_PARAMS: usize = 30_000;

/// Runs `INSERT ... VALUES (...), (...) <suffix>` for `rows` in chunks; returns the rows
/// written.
pub(crate) async fn insert_rows(
    txn: &DatabaseTransaction,
    head: &str,
    suffix: &str,
    rows: Vec<Vec<Value>>,
) -> Result<u64, DbErr> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    let backend = txn.get_database_backend();
    let placeholders = format!("({})", vec!["?"; width].join(", "));
    let mut written = 0;
    for chunk in rows.chunks((MAX_PARAMS / width).max(1)) {
        let text = format!(
            "{head} VALUES {} {suffix}",
            vec![placeholders.as_str(); chunk.len()].join(", ")
        );
        let values: Vec<Value> = chunk.iter().flatten().cloned().collect();
        written += txn
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql(backend, &text),
                values,
            ))
            .await?
            .rows_affected();
    }
    Ok(written)
}

/// Runs a query written with `?` placeholders on either backend.
pub(crate) async fn query<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    conn.query_all_raw(Statement::from_sql_and_values(
        backend,
        sql(backend, text),
        values,
    ))
    .await
}

/// The first row of a query written with `?` placeholders.
pub(crate) async fn query_one<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Option<QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    conn.query_one_raw(Statement::from_sql_and_values(
        backend,
        sql(backend, text),
        values,
    ))
    .await
}

/// Runs a statement written with `?` placeholders; returns the rows it affected.
pub(crate) async fn execute<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, text),
            values,
        ))
        .await?;
    Ok(result.rows_affected())
}

/// `(?, ?), (?, ?), ...` for `idents`, and their values in order.
pub(crate) fn ident_pairs(idents: &[Ident]) -> (String, Vec<Value>) {
    let placeholders = vec!["(?, ?)"; idents.len()].join(", ");
    let values = idents
        .iter()
        .flat_map(|(t, v)| [t.as_str().into(), v.as_str().into()])
        .collect();
    (placeholders, values)
}

/// One column of a bulk insert.
pub(crate) enum Column {
    Text(Vec<String>),
    /// Text that may be NULL.
    NullableText(Vec<Option<String>>),
    Int8(Vec<i64>),
    /// BIGINT that may be NULL.
    NullableInt8(Vec<Option<i64>>),
    Int2(Vec<i16>),
    Bytea(Vec<Vec<u8>>),
}

impl Column {
    pub(crate) fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::NullableText(v) => v.len(),
            Column::Int8(v) => v.len(),
            Column::NullableInt8(v) => v.len(),
            Column::Int2(v) => v.len(),
            Column::Bytea(v) => v.len(),
        }
    }

    fn value_at(&self, row: usize) -> Value {
        match self {
            Column::Text(v) => v[row].as_str().into(),
            Column::NullableText(v) => v[row].clone().into(),
            Column::Int8(v) => v[row].into(),
            Column::NullableInt8(v) => v[row].into(),
            Column::Int2(v) => v[row].into(),
            Column::Bytea(v) => v[row].clone().into(),
        }
    }

    /// The PostgreSQL array parameter and how to select one element of it.
    fn into_array(self, name: &str) -> (Value, &'static str, String) {
        match self {
            Column::Text(v) => (v.into(), "text[]", name.to_owned()),
            // PostgreSQL arrays of nullable text do not bind here; the empty string, never
            // a real id, stands for NULL.
            Column::NullableText(v) => (
                v.into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<String>>()
                    .into(),
                "text[]",
                format!("NULLIF({name}, '')"),
            ),
            Column::Int8(v) => (v.into(), "int8[]", name.to_owned()),
            // As for text: i64::MIN, never a time here, stands for NULL.
            Column::NullableInt8(v) => (
                v.into_iter()
                    .map(|x| x.unwrap_or(i64::MIN))
                    .collect::<Vec<i64>>()
                    .into(),
                "int8[]",
                format!("NULLIF({name}, {})", i64::MIN),
            ),
            Column::Int2(v) => (v.into(), "int2[]", name.to_owned()),
            Column::Bytea(v) => (v.into(), "bytea[]", name.to_owned()),
        }
    }
}

/// `{head} <rows> {suffix}` with the rows given column by column. PostgreSQL gets each
/// column as one array parameter (`SELECT ... FROM UNNEST(...)`): one short statement
/// however many rows, where a `VALUES` list costs a parse and plan per size. SQLite gets
/// multi-row `VALUES`. Returns the rows written.
pub(crate) async fn insert_columns(
    txn: &DatabaseTransaction,
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
) -> Result<u64, DbErr> {
    let rows = columns.first().map_or(0, Column::len);
    if rows == 0 {
        return Ok(0);
    }
    let backend = txn.get_database_backend();
    if backend != DbBackend::Postgres {
        let rows = (0..rows)
            .map(|row| columns.iter().map(|c| c.value_at(row)).collect())
            .collect();
        return insert_rows(txn, head, suffix, rows).await;
    }
    let (text, values) = unnest_insert(head, suffix, columns, 1);
    Ok(txn
        .execute_raw(Statement::from_sql_and_values(backend, text, values))
        .await?
        .rows_affected())
}

/// The PostgreSQL statement of [`insert_columns`], its parameters numbered from `$first`,
/// so it can also be one part of a larger statement.
pub(crate) fn unnest_insert(
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
    first: usize,
) -> (String, Vec<Value>) {
    let (mut values, mut arrays, mut selected) = (Vec::new(), Vec::new(), Vec::new());
    for (i, column) in columns.into_iter().enumerate() {
        let name = format!("c{i}");
        let (value, array_type, select) = column.into_array(&name);
        values.push(value);
        arrays.push(format!("${}::{array_type}", first + i));
        selected.push(select);
    }
    let names: Vec<String> = (0..arrays.len()).map(|i| format!("c{i}")).collect();
    let text = format!(
        "{head} SELECT {} FROM UNNEST({}) AS u({}) {suffix}",
        selected.join(", "),
        arrays.join(", "),
        names.join(", ")
    );
    (text, values)
}

pub(crate) fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `idents` as two PostgreSQL array parameters (types, values), for joining with
/// `UNNEST(?::text[], ?::text[]) AS k(t, v)`.
pub(crate) fn ident_arrays(idents: &[Ident]) -> [Value; 2] {
    let (types, values): (Vec<String>, Vec<String>) = idents.iter().cloned().unzip();
    [types.into(), values.into()]
}
