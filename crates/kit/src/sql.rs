//! The one way services write SQL for both backends.
//!
//! - Statements are written once with `?` placeholders; [`query`], [`query_one`],
//!   [`query_as`], [`query_one_as`] and [`execute`] number them `$1, $2, ...` on
//!   PostgreSQL ([`placeholders`]).
//! - Rows are read into types that derive [`sea_orm::FromQueryResult`], by column name
//!   ([`query_as`]), so a reordered `SELECT` cannot mix up fields. Name computed columns
//!   with `AS`.
//! - Bulk inserts are given column by column ([`Insert`], [`Column`]): PostgreSQL binds
//!   each column as one array (`INSERT ... SELECT ... FROM UNNEST($1::text[], ...)`), one
//!   short statement however many rows, where a `VALUES` list costs a parse and plan per
//!   size; SQLite gets multi-row `VALUES` lists of at most [`MAX_PARAMS`] parameters.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, QueryResult, Statement, Value};

/// Bound parameters per statement stay well under both backends' limits (SQLite's is
/// 32766, PostgreSQL's 65535).
pub const MAX_PARAMS: usize = 30_000;

/// Rewrites `?` placeholders to `$1, $2, ...` for PostgreSQL. Statements never contain a
/// literal question mark.
pub fn placeholders(backend: DbBackend, text: &str) -> String {
    if backend != DbBackend::Postgres {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut n = 0;
    for ch in text.chars() {
        if ch == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(ch);
        }
    }
    out
}

/// `?, ?, ...`: `n` placeholders for an `IN (...)` list.
pub fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A statement written with `?` placeholders, for `backend`.
pub fn statement(
    backend: DbBackend,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Statement {
    Statement::from_sql_and_values(backend, placeholders(backend, text), values)
}

/// Runs a query written with `?` placeholders.
pub async fn query<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<QueryResult>, DbErr> {
    conn.query_all_raw(statement(conn.get_database_backend(), text, values))
        .await
}

/// The first row of a query written with `?` placeholders.
pub async fn query_one<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Option<QueryResult>, DbErr> {
    conn.query_one_raw(statement(conn.get_database_backend(), text, values))
        .await
}

/// The rows of a query written with `?` placeholders, each read by column name into `T`.
pub async fn query_as<T: FromQueryResult, C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Vec<T>, DbErr> {
    query(conn, text, values)
        .await?
        .iter()
        .map(|row| T::from_query_result(row, ""))
        .collect()
}

/// The first row of a query written with `?` placeholders, read by column name into `T`.
pub async fn query_one_as<T: FromQueryResult, C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<Option<T>, DbErr> {
    query_one(conn, text, values)
        .await?
        .map(|row| T::from_query_result(&row, ""))
        .transpose()
}

/// Runs a statement written with `?` placeholders; returns the rows it affected.
pub async fn execute<C: ConnectionTrait>(
    conn: &C,
    text: &str,
    values: impl IntoIterator<Item = Value>,
) -> Result<u64, DbErr> {
    let result = conn
        .execute_raw(statement(conn.get_database_backend(), text, values))
        .await?;
    Ok(result.rows_affected())
}

/// One column of a bulk insert: a value per row.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Text(Vec<String>),
    /// Text that may be NULL. On PostgreSQL the array carries the empty string for NULL
    /// (arrays of nullable text do not bind) and the insert turns it back with
    /// `NULLIF(.., '')`: the empty string is stored as NULL there, so use this only for
    /// columns where it is never a real value.
    NullableText(Vec<Option<String>>),
    Int2(Vec<i16>),
    Int4(Vec<i32>),
    Int8(Vec<i64>),
    /// BIGINT that may be NULL. As for text, PostgreSQL's array carries `i64::MIN` for
    /// NULL and the insert turns it back with `NULLIF`: `i64::MIN` is stored as NULL there,
    /// so use this only for columns (such as times) where it is never a real value.
    NullableInt8(Vec<Option<i64>>),
    Bytea(Vec<Vec<u8>>),
}

impl Column {
    /// Rows in the column.
    pub fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::NullableText(v) => v.len(),
            Column::Int2(v) => v.len(),
            Column::Int4(v) => v.len(),
            Column::Int8(v) => v.len(),
            Column::NullableInt8(v) => v.len(),
            Column::Bytea(v) => v.len(),
        }
    }

    /// True when the column has no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column's values, one per row, in order (SQLite binds them one by one).
    fn into_values(self) -> std::vec::IntoIter<Value> {
        fn each<T: Into<Value>>(v: Vec<T>) -> std::vec::IntoIter<Value> {
            v.into_iter()
                .map(Into::into)
                .collect::<Vec<_>>()
                .into_iter()
        }
        match self {
            Column::Text(v) => each(v),
            Column::NullableText(v) => each(v),
            Column::Int2(v) => each(v),
            Column::Int4(v) => each(v),
            Column::Int8(v) => each(v),
            Column::NullableInt8(v) => each(v),
            Column::Bytea(v) => each(v),
        }
    }

    /// The PostgreSQL array parameter, its type, and how to select one element `name` of
    /// it.
    fn into_array(self, name: &str) -> (Value, &'static str, String) {
        match self {
            Column::Text(v) => (v.into(), "text[]", name.to_owned()),
            Column::NullableText(v) => (
                v.into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<String>>()
                    .into(),
                "text[]",
                format!("NULLIF({name}, '')"),
            ),
            Column::Int2(v) => (v.into(), "int2[]", name.to_owned()),
            Column::Int4(v) => (v.into(), "int4[]", name.to_owned()),
            Column::Int8(v) => (v.into(), "int8[]", name.to_owned()),
            Column::NullableInt8(v) => (
                v.into_iter()
                    .map(|x| x.unwrap_or(i64::MIN))
                    .collect::<Vec<i64>>()
                    .into(),
                "int8[]",
                format!("NULLIF({name}, {})", i64::MIN),
            ),
            Column::Bytea(v) => (v.into(), "bytea[]", name.to_owned()),
        }
    }
}

/// A bulk insert, `{head} <rows> {suffix}`, with the rows given column by column.
///
/// `head` is `INSERT INTO table (a, b, ...)` naming the columns in order: first those
/// given as [`Column`]s, then those given by [`Insert::constant`]. `suffix` is what follows
/// the rows (`ON CONFLICT ...`, `RETURNING ...`).
#[derive(Debug, Clone)]
pub struct Insert {
    head: String,
    columns: Vec<Column>,
    constants: Vec<Value>,
    in_order: bool,
    suffix: String,
}

impl Insert {
    /// An insert of the rows that `columns` hold (each the same length).
    pub fn new(head: &str, columns: Vec<Column>) -> Self {
        Self {
            head: head.to_owned(),
            columns,
            constants: Vec::new(),
            in_order: false,
            suffix: String::new(),
        }
    }

    /// Adds a column whose value is the same for every row: PostgreSQL binds it once,
    /// SQLite once per row. Constants follow the columns, in the head's order.
    pub fn constant(mut self, value: impl Into<Value>) -> Self {
        self.constants.push(value.into());
        self
    }

    /// Inserts the rows in the order given, so that generated ids follow it (`WITH
    /// ORDINALITY ... ORDER BY` on PostgreSQL; SQLite inserts a `VALUES` list in order).
    pub fn in_order(mut self) -> Self {
        self.in_order = true;
        self
    }

    /// What follows the rows: `ON CONFLICT ...`, `RETURNING ...`.
    pub fn suffix(mut self, suffix: &str) -> Self {
        self.suffix = suffix.to_owned();
        self
    }

    /// Rows to insert; an error when the columns differ in length.
    pub fn rows(&self) -> Result<usize, DbErr> {
        let rows = self.columns.first().map_or(0, Column::len);
        if self.columns.iter().any(|c| c.len() != rows) {
            return Err(DbErr::Custom(format!(
                "bulk insert `{}`: its columns differ in length",
                self.head
            )));
        }
        Ok(rows)
    }

    /// Runs the insert; returns the rows written. Nothing runs when there is no row.
    pub async fn execute<C: ConnectionTrait>(self, conn: &C) -> Result<u64, DbErr> {
        let mut written = 0;
        for statement in self.statements(conn.get_database_backend())? {
            written += conn.execute_raw(statement).await?.rows_affected();
        }
        Ok(written)
    }

    /// Runs the insert, whose suffix ends in `RETURNING ...`; returns those rows, read by
    /// column name into `T`, in no promised order.
    pub async fn returning<T: FromQueryResult, C: ConnectionTrait>(
        self,
        conn: &C,
    ) -> Result<Vec<T>, DbErr> {
        let mut out = Vec::new();
        for statement in self.statements(conn.get_database_backend())? {
            for row in conn.query_all_raw(statement).await? {
                out.push(T::from_query_result(&row, "")?);
            }
        }
        Ok(out)
    }

    /// The PostgreSQL statement with its parameters numbered from `$first`, so it can be
    /// one part of a larger statement (a data-modifying `WITH`).
    pub fn postgres(self, first: usize) -> Result<(String, Vec<Value>), DbErr> {
        self.rows()?;
        let width = self.columns.len();
        let mut values = Vec::with_capacity(width + self.constants.len());
        let (mut arrays, mut names, mut selected) = (Vec::new(), Vec::new(), Vec::new());
        for (i, column) in self.columns.into_iter().enumerate() {
            let name = format!("c{i}");
            let (value, array_type, select) = column.into_array(&name);
            values.push(value);
            arrays.push(format!("${}::{array_type}", first + i));
            names.push(name);
            selected.push(select);
        }
        for (i, value) in self.constants.into_iter().enumerate() {
            selected.push(format!("${}{}", first + width + i, cast(&value)));
            values.push(value);
        }
        let (ordinality, order) = if self.in_order {
            names.push("n".to_owned());
            (" WITH ORDINALITY", " ORDER BY n")
        } else {
            ("", "")
        };
        let text = format!(
            "{} SELECT {} FROM UNNEST({}){ordinality} AS u({}){order}{}",
            self.head,
            selected.join(", "),
            arrays.join(", "),
            names.join(", "),
            spaced(&self.suffix),
        );
        Ok((text, values))
    }

    /// The statements that run the insert on `backend`: none without rows, one on
    /// PostgreSQL, as many `VALUES` lists as [`MAX_PARAMS`] needs on SQLite.
    fn statements(self, backend: DbBackend) -> Result<Vec<Statement>, DbErr> {
        let rows = self.rows()?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if backend == DbBackend::Postgres {
            let (text, values) = self.postgres(1)?;
            return Ok(vec![Statement::from_sql_and_values(backend, text, values)]);
        }
        let width = self.columns.len() + self.constants.len();
        let mut columns: Vec<_> = self.columns.into_iter().map(Column::into_values).collect();
        let mut statements = Vec::new();
        let mut left = rows;
        while left > 0 {
            let chunk = left.min(rows_per_statement(width));
            let mut values = Vec::with_capacity(chunk * width);
            for _ in 0..chunk {
                // Every column holds `rows` values (checked above).
                values.extend(columns.iter_mut().filter_map(Iterator::next));
                values.extend(self.constants.iter().cloned());
            }
            let text = values_text(&self.head, &self.suffix, width, chunk);
            statements.push(statement(backend, &text, values));
            left -= chunk;
        }
        Ok(statements)
    }
}

/// [`Insert`] of `columns` with `suffix`, run; returns the rows written.
pub async fn insert_columns<C: ConnectionTrait>(
    conn: &C,
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
) -> Result<u64, DbErr> {
    Insert::new(head, columns)
        .suffix(suffix)
        .execute(conn)
        .await
}

/// [`Insert::postgres`] of `columns` with `suffix`, its parameters numbered from `$first`.
pub fn unnest_insert(
    head: &str,
    suffix: &str,
    columns: Vec<Column>,
    first: usize,
) -> Result<(String, Vec<Value>), DbErr> {
    Insert::new(head, columns).suffix(suffix).postgres(first)
}

/// Runs `{head} VALUES (...), (...) {suffix}` for `rows` (each the same width) on either
/// backend, in as many statements as [`MAX_PARAMS`] needs; returns the rows written. For
/// rows whose values are not one of [`Column`]'s types; otherwise use [`Insert`].
pub async fn insert_rows<C: ConnectionTrait>(
    conn: &C,
    head: &str,
    suffix: &str,
    rows: Vec<Vec<Value>>,
) -> Result<u64, DbErr> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    if rows.iter().any(|row| row.len() != width) {
        return Err(DbErr::Custom(format!(
            "bulk insert `{head}`: its rows differ in width"
        )));
    }
    let backend = conn.get_database_backend();
    let mut written = 0;
    for chunk in rows.chunks(rows_per_statement(width)) {
        let text = values_text(head, suffix, width, chunk.len());
        let values = chunk.iter().flatten().cloned();
        written += conn
            .execute_raw(statement(backend, &text, values))
            .await?
            .rows_affected();
    }
    Ok(written)
}

fn rows_per_statement(width: usize) -> usize {
    (MAX_PARAMS / width.max(1)).max(1)
}

/// `{head} VALUES (?, ...), ... {suffix}` for `rows` rows of `width` values.
fn values_text(head: &str, suffix: &str, width: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    format!(
        "{head} VALUES {}{}",
        vec![row.as_str(); rows].join(", "),
        spaced(suffix)
    )
}

fn spaced(suffix: &str) -> String {
    if suffix.is_empty() {
        String::new()
    } else {
        format!(" {suffix}")
    }
}

/// The cast that gives a constant's parameter its type in a `SELECT` list on PostgreSQL.
fn cast(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "::bool",
        Value::SmallInt(_) => "::int2",
        Value::Int(_) => "::int4",
        Value::BigInt(_) => "::int8",
        Value::String(_) => "::text",
        Value::Bytes(_) => "::bytea",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(statements: &[Statement]) -> Vec<&str> {
        statements.iter().map(|s| s.sql.as_str()).collect()
    }

    fn values(statement: &Statement) -> Vec<Value> {
        statement
            .values
            .as_ref()
            .map(|v| v.0.clone())
            .unwrap_or_default()
    }

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        assert_eq!(
            placeholders(DbBackend::Postgres, "a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(
            placeholders(DbBackend::Sqlite, "a = ? AND b = ?"),
            "a = ? AND b = ?"
        );
    }

    fn sample() -> Insert {
        Insert::new(
            "INSERT INTO t (a, b, c)",
            vec![
                Column::Text(vec!["x".into(), "y".into()]),
                Column::Int8(vec![1, 2]),
            ],
        )
        .constant(7i64)
        .suffix("ON CONFLICT (a) DO NOTHING RETURNING a")
    }

    #[test]
    fn postgres_binds_one_array_per_column_and_constants_once() {
        let statements = sample().statements(DbBackend::Postgres).unwrap();
        assert_eq!(
            texts(&statements),
            [
                "INSERT INTO t (a, b, c) SELECT c0, c1, $3::int8 FROM UNNEST($1::text[], $2::int8[]) AS u(c0, c1) ON CONFLICT (a) DO NOTHING RETURNING a"
            ]
        );
        assert_eq!(
            values(&statements[0]),
            [
                Value::from(vec!["x".to_owned(), "y".to_owned()]),
                Value::from(vec![1i64, 2]),
                Value::from(7i64),
            ]
        );
    }

    #[test]
    fn postgres_keeps_row_order_when_asked_and_numbers_from_first() {
        let (text, values) = Insert::new(
            "INSERT INTO outbox (consumer, pack_size, created_at)",
            vec![Column::Text(vec!["c".into()]), Column::Int4(vec![3])],
        )
        .constant(5i64)
        .in_order()
        .postgres(4)
        .unwrap();
        assert_eq!(
            text,
            "INSERT INTO outbox (consumer, pack_size, created_at) SELECT c0, c1, $6::int8 FROM UNNEST($4::text[], $5::int4[]) WITH ORDINALITY AS u(c0, c1, n) ORDER BY n"
        );
        assert_eq!(values.len(), 3);
    }

    #[test]
    fn sqlite_gets_values_lists_with_constants_repeated() {
        let statements = sample().statements(DbBackend::Sqlite).unwrap();
        assert_eq!(
            texts(&statements),
            [
                "INSERT INTO t (a, b, c) VALUES (?, ?, ?), (?, ?, ?) ON CONFLICT (a) DO NOTHING RETURNING a"
            ]
        );
        assert_eq!(
            values(&statements[0]),
            [
                Value::from("x"),
                Value::from(1i64),
                Value::from(7i64),
                Value::from("y"),
                Value::from(2i64),
                Value::from(7i64),
            ]
        );
    }

    #[test]
    fn sqlite_statements_stay_under_the_parameter_limit() {
        let rows = MAX_PARAMS / 3 * 2 + 1;
        let insert = Insert::new(
            "INSERT INTO t (a, b, c)",
            vec![
                Column::Int8((0..rows as i64).collect()),
                Column::Int2(vec![1; rows]),
                Column::Bytea(vec![vec![0]; rows]),
            ],
        );
        let statements = insert.statements(DbBackend::Sqlite).unwrap();
        let counts: Vec<usize> = statements.iter().map(|s| values(s).len()).collect();
        assert_eq!(counts, [MAX_PARAMS, MAX_PARAMS, 3]);
        let last = values(&statements[2]);
        assert_eq!(
            last[0],
            Value::from(rows as i64 - 1),
            "rows keep their order"
        );
    }

    #[test]
    fn nullable_columns_use_sentinels_on_postgres_and_nulls_on_sqlite() {
        let columns = || {
            vec![
                Column::NullableText(vec![Some("a".into()), None]),
                Column::NullableInt8(vec![None, Some(4)]),
            ]
        };
        let (text, values) = unnest_insert("INSERT INTO t (a, b)", "", columns(), 1).unwrap();
        assert_eq!(
            text,
            format!(
                "INSERT INTO t (a, b) SELECT NULLIF(c0, ''), NULLIF(c1, {}) FROM UNNEST($1::text[], $2::int8[]) AS u(c0, c1)",
                i64::MIN
            )
        );
        assert_eq!(
            values,
            [
                Value::from(vec!["a".to_owned(), String::new()]),
                Value::from(vec![i64::MIN, 4]),
            ]
        );
        let statements = Insert::new("INSERT INTO t (a, b)", columns())
            .statements(DbBackend::Sqlite)
            .unwrap();
        assert_eq!(
            super::tests::values(&statements[0]),
            [
                Value::from(Some("a".to_owned())),
                Value::from(None::<i64>),
                Value::from(None::<String>),
                Value::from(Some(4i64)),
            ]
        );
    }

    #[test]
    fn no_rows_is_no_statement_and_uneven_columns_are_refused() {
        let empty = Insert::new("INSERT INTO t (a)", vec![Column::Text(Vec::new())]);
        assert!(empty.statements(DbBackend::Postgres).unwrap().is_empty());
        let uneven = Insert::new(
            "INSERT INTO t (a, b)",
            vec![Column::Text(vec!["x".into()]), Column::Int8(Vec::new())],
        );
        assert!(uneven.clone().statements(DbBackend::Sqlite).is_err());
        assert!(uneven.postgres(1).is_err());
    }
}
