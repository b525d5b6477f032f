//! The kit's SQL toolkit against the real backends: a bulk insert writes every row as
//! given (NULLs included), in order, across as many statements as SQLite needs, and
//! returns the rows it took.

use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, TransactionTrait};
use waymark_kit::db::Migration;
use waymark_kit::sql::{self, Column, Insert};

use crate::support::*;

const TABLE: Migration = Migration {
    version: 1,
    name: "a table of every column type",
    postgres: "CREATE TABLE kit_rows (
            id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, note TEXT,
            small SMALLINT NOT NULL, medium INTEGER NOT NULL, big BIGINT NOT NULL,
            maybe BIGINT, data BYTEA NOT NULL, batch BIGINT NOT NULL, label TEXT)",
    sqlite: "CREATE TABLE kit_rows (
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, note TEXT,
            small SMALLINT NOT NULL, medium INTEGER NOT NULL, big BIGINT NOT NULL,
            maybe BIGINT, data BLOB NOT NULL, batch BIGINT NOT NULL, label TEXT)",
};

const HEAD: &str =
    "INSERT INTO kit_rows (name, note, small, medium, big, maybe, data, batch, label)";

#[derive(Debug, PartialEq, FromQueryResult)]
struct Row {
    name: String,
    note: Option<String>,
    small: i16,
    medium: i32,
    big: i64,
    maybe: Option<i64>,
    data: Vec<u8>,
    batch: i64,
    label: Option<String>,
}

#[derive(FromQueryResult)]
struct Taken {
    id: i64,
    name: String,
}

/// `n` rows named from `first`: every other one has NULL `note` and `maybe`.
fn rows(first: usize, n: usize) -> Vec<Row> {
    (first..first + n)
        .map(|i| Row {
            name: format!("r{i:05}"),
            note: (i % 2 == 0).then(|| format!("note {i}")),
            small: (i % 300) as i16,
            medium: i as i32 * 3,
            big: i as i64 * 1_000_000_007,
            maybe: (i % 2 == 1).then_some(-(i as i64)),
            data: vec![(i % 256) as u8; i % 5],
            batch: 7,
            label: None,
        })
        .collect()
}

fn insert(rows: &[Row]) -> Insert {
    let text = |f: fn(&Row) -> &String| Column::Text(rows.iter().map(f).cloned().collect());
    Insert::new(
        HEAD,
        vec![
            text(|r| &r.name),
            Column::NullableText(rows.iter().map(|r| r.note.clone()).collect()),
            Column::Int2(rows.iter().map(|r| r.small).collect()),
            Column::Int4(rows.iter().map(|r| r.medium).collect()),
            Column::Int8(rows.iter().map(|r| r.big).collect()),
            Column::NullableInt8(rows.iter().map(|r| r.maybe).collect()),
            Column::Bytea(rows.iter().map(|r| r.data.clone()).collect()),
        ],
    )
    .constant(7i64)
    .constant(None::<String>)
    .in_order()
}

async fn bulk_inserts_round_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let conn = waymark_kit::db::connect(&db.url, "sqlkit", 1)
        .await
        .unwrap();
    waymark_kit::db::migrate(&conn, "sqlkit", &[TABLE])
        .await
        .unwrap();

    // More rows than one SQLite statement takes (9 parameters a row).
    let first = rows(0, 7_001);
    let txn = conn.begin().await.unwrap();
    let taken: Vec<Taken> = insert(&first)
        .suffix("ON CONFLICT (name) DO NOTHING RETURNING id, name")
        .returning(&txn)
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let mut taken: Vec<(i64, String)> = taken.into_iter().map(|t| (t.id, t.name)).collect();
    taken.sort();
    let names: Vec<&str> = taken.iter().map(|(_, name)| name.as_str()).collect();
    let given: Vec<&str> = first.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names, given,
        "every row is returned, and ids follow the rows' order"
    );

    let stored: Vec<Row> = sql::query_as(
        &conn,
        "SELECT label, batch, data, maybe, big, medium, small, note, name FROM kit_rows ORDER BY id",
        [],
    )
    .await
    .unwrap();
    assert_eq!(stored, first, "read by name, whatever the SELECT's order");

    // Rows already there are left alone and not returned; the others are written.
    let again = rows(6_999, 4);
    let written = insert(&again)
        .suffix("ON CONFLICT (name) DO NOTHING")
        .execute(&conn)
        .await
        .unwrap();
    assert_eq!(written, 2);
    let count = sql::query_one(
        &conn,
        "SELECT COUNT(*) AS n FROM kit_rows WHERE batch = ?",
        [7i64.into()],
    )
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "n")
    .unwrap();
    assert_eq!(count, 7_003);

    let written = sql::insert_rows(
        &conn,
        HEAD,
        "",
        vec![vec![
            "by row".into(),
            None::<String>.into(),
            1i16.into(),
            2i32.into(),
            3i64.into(),
            None::<i64>.into(),
            vec![1u8].into(),
            8i64.into(),
            "l".into(),
        ]],
    )
    .await
    .unwrap();
    assert_eq!(written, 1);
    let deleted = sql::execute(&conn, "DELETE FROM kit_rows WHERE batch = ?", [8i64.into()])
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    if backend == Backend::Postgres {
        // Composed into a larger statement, numbered after the parameters before it.
        let (part, mut values) = insert(&rows(10_000, 3)).postgres(2).unwrap();
        values.insert(0, 7i64.into());
        let text = format!(
            "WITH added AS ({part} RETURNING batch) SELECT COUNT(*) AS n FROM added WHERE batch = $1"
        );
        let n = conn
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                text,
                values,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(n, 3);
    }
}
waymark_testkit::on_both_backends!(bulk_inserts_round_trip);
