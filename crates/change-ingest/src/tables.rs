//! Enable, disable and list tables; load what the gateway needs to know about them.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;

use crate::{Column, IngestError, TableInfo};

/// One eligible user table and whether realtime is enabled on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableListing {
    /// Schema name (unquoted).
    pub schema: String,
    /// Table name (unquoted).
    pub table: String,
    /// Whether the capture triggers are installed.
    pub enabled: bool,
}

/// Quotes an identifier for SQL, like libpq's `PQescapeIdentifier`
/// (and `postgres_protocol::escape::escape_identifier`).
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Splits `schema.table`, `table` (schema `public`), or either part double-quoted
/// (`"My Schema"."My Table"`, `""` escapes a quote) into unquoted names.
/// Unquoted parts are folded to lower case, as Postgres does.
pub fn parse_table_name(name: &str) -> Result<(String, String), IngestError> {
    let invalid = |reason| IngestError::InvalidTableName {
        name: name.to_owned(),
        reason,
    };
    let mut parts: Vec<String> = Vec::new();
    let mut chars = name.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(invalid("unterminated quoted identifier")),
                }
            }
            if part.is_empty() {
                return Err(invalid("empty quoted identifier"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' || c.is_whitespace() {
                    return Err(invalid(
                        "unexpected character; quote identifiers with \"...\"",
                    ));
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
            if part.is_empty() {
                return Err(invalid("empty identifier"));
            }
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return Err(invalid("expected '.' or the end after a quoted identifier")),
        }
    }
    match parts.len() {
        1 => Ok(("public".to_owned(), parts.remove(0))),
        2 => {
            let table = parts.remove(1);
            Ok((parts.remove(0), table))
        }
        _ => Err(invalid("expected schema.table")),
    }
}

/// Resolves a table name to its oid, or `UnknownTable`.
async fn resolve(client: &Client, name: &str) -> Result<(u32, String, String), IngestError> {
    let (schema, table) = parse_table_name(name)?;
    let row = client
        .query_opt(
            "select c.oid from pg_catalog.pg_class c
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2",
            &[&schema, &table],
        )
        .await?;
    match row {
        Some(row) => Ok((row.get(0), schema, table)),
        None => Err(IngestError::UnknownTable(format!("{schema}.{table}"))),
    }
}

/// Enables realtime on a table (`public.orders`, `orders` for `public`, or quoted
/// identifiers such as `"My Table"`): installs the capture triggers through
/// `realtime_gateway.enable()` and returns the table's description.
/// Enabling an enabled table re-creates its triggers and is not an error.
pub async fn enable_table(client: &Client, name: &str) -> Result<TableInfo, IngestError> {
    let (oid, schema, table) = resolve(client, name).await?;
    if let Err(e) = client
        .execute(
            "select realtime_gateway.enable($1::oid::regclass, 'manual')",
            &[&oid],
        )
        .await
    {
        if e.code() == Some(&tokio_postgres::error::SqlState::WRONG_OBJECT_TYPE) {
            let reason = e
                .as_db_error()
                .map(|d| d.message().rsplit(": ").next().unwrap_or("").to_owned())
                .unwrap_or_default();
            return Err(IngestError::NotEligible {
                table: format!("{schema}.{table}"),
                reason,
            });
        }
        return Err(e.into());
    }
    let mut infos = load_table_infos(client, &[oid]).await?;
    infos
        .remove(&oid)
        .ok_or_else(|| IngestError::UnknownTable(format!("{schema}.{table}")))
}

/// Disables realtime on a table; returns `false` if it was not enabled.
pub async fn disable_table(client: &Client, name: &str) -> Result<bool, IngestError> {
    let (oid, _, _) = resolve(client, name).await?;
    let row = client
        .query_one(
            "select realtime_gateway.disable($1::oid::regclass)",
            &[&oid],
        )
        .await?;
    Ok(row.get(0))
}

/// Lists every eligible user table (ordinary and partitioned tables outside the
/// system schemas, `realtime_gateway` and Supabase's `realtime`, whose
/// `messages` carries broadcasts, not Postgres Changes; partitions are listed
/// under their root only), sorted by schema and name, with its enabled flag.
pub async fn list_tables(client: &Client) -> Result<Vec<TableListing>, IngestError> {
    let rows = client
        .query(
            "select n.nspname::text, c.relname::text,
                    exists (select 1 from realtime_gateway.enabled_tables e where e.table_oid = c.oid)
             from pg_catalog.pg_class c
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where c.relkind in ('r', 'p') and not c.relispartition and c.relpersistence <> 't'
               and n.nspname not in ('information_schema', 'realtime_gateway', 'realtime')
               and n.nspname not like 'pg\\_%'
             order by 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| TableListing {
            schema: r.get(0),
            table: r.get(1),
            enabled: r.get(2),
        })
        .collect())
}

/// Oids of the enabled tables that still exist.
pub(crate) async fn enabled_oids(client: &Client) -> Result<Vec<u32>, IngestError> {
    let rows = client
        .query(
            "select e.table_oid from realtime_gateway.enabled_tables e
             where exists (select 1 from pg_catalog.pg_class c where c.oid = e.table_oid)",
            &[],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Describes the given tables (enabled or not); oids that no longer exist are absent.
pub(crate) async fn load_table_infos(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, TableInfo>, IngestError> {
    let rows = client
        .query(
            "select c.oid, n.nspname::text, c.relname::text, c.relrowsecurity,
                coalesce((select array_agg(a.attname::text order by a.attnum)
                          from pg_catalog.pg_attribute a
                          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '{}'),
                coalesce((select array_agg(t.typname::text order by a.attnum)
                          from pg_catalog.pg_attribute a join pg_catalog.pg_type t on t.oid = a.atttypid
                          where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '{}'),
                coalesce((select array_agg(a.attname::text
                                           order by pg_catalog.array_position(i.indkey::int2[], a.attnum))
                          from pg_catalog.pg_index i
                          join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                          where i.indrelid = c.oid and i.indisprimary), '{}')
             from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where c.oid = any($1)",
            &[&oids],
        )
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let oid: u32 = row.get(0);
        let names: Vec<String> = row.get(4);
        let types: Vec<String> = row.get(5);
        out.insert(
            oid,
            TableInfo {
                oid,
                schema: row.get(1),
                table: row.get(2),
                rls_enabled: row.get(3),
                columns: names
                    .into_iter()
                    .zip(types)
                    .map(|(name, type_name)| Column { name, type_name })
                    .collect(),
                primary_key: row.get(6),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let p = |s| parse_table_name(s).unwrap();
        assert_eq!(p("orders"), ("public".into(), "orders".into()));
        assert_eq!(p("Public.Orders"), ("public".into(), "orders".into()));
        assert_eq!(p("\"My Table\""), ("public".into(), "My Table".into()));
        assert_eq!(p("\"a.b\".\"c\"\"d\""), ("a.b".into(), "c\"d".into()));
        assert_eq!(p("s.\"T\""), ("s".into(), "T".into()));
        for bad in ["", "a.b.c", "\"x", "a..b", "a b", "\"\"", "\"a\"b"] {
            assert!(parse_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
