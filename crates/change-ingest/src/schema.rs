//! Versioned, idempotent migrations of the `realtime_gateway` schema.
//!
//! Pending migrations run inside one transaction that first takes a
//! transaction-scoped advisory lock, so several replicas starting at once apply
//! each version exactly once; a failed migration rolls back completely. The
//! transaction has a `lock_timeout`: a migration never queues writers behind a long
//! transaction for long (it fails and is retried by the caller's reconnect loop).
//! Each migration after V1 lives in its own file under `schema/`.

use tokio_postgres::Client;

use crate::IngestError;

/// Advisory-lock class shared by every lock this crate takes (`'RGTW'`).
/// The second key says what the lock guards (see the constants below).
pub(crate) const LOCK_CLASS: i32 = 0x5247_5457;
/// Second advisory-lock key: serializes migrations.
pub(crate) const LOCK_MIGRATE: i32 = 0;

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migrations, in order; version = index + 1. Never edit a released entry: append.
const MIGRATIONS: &[&str] = &[V1, V2, V3, V4];

/// Version 2: Supabase-compatible `auth.uid()/jwt()/role()/email()` where missing.
const V2: &str = include_str!("schema/v2_auth_functions.sql");

/// Version 3: Supabase's `realtime.messages`, `realtime.topic()`,
/// `realtime.send()`, `realtime.broadcast_changes()` (each only where missing).
const V3: &str = include_str!("schema/v3_realtime_messages.sql");

/// Version 4: time-ring partitioned change log, crash markers, capture hardening
/// (pinned output settings, oversized placeholders, TRUNCATE, partitions, replicated
/// writes, 2PC-safe wake-ups), lock-safe enable/disable/sync, retention by slot.
const V4: &str = include_str!("schema/v4_capture.sql");

/// Version 1: change log, enabled tables, capture triggers, enable/disable,
/// publication sync, retention.
///
/// Advisory lock keys used in SQL (class 0x52475457): 1 = wake-up throttle,
/// 2 = publication sync, 3 = enable/disable, 4 = prune.
const V1: &str = r#"
create table realtime_gateway.change_log (
    id          bigint generated always as identity (cache 32),
    txid        xid8 not null default pg_current_xact_id(),
    table_oid   oid not null,
    op          "char" not null,
    record      json,
    old_record  json,
    created_at  timestamptz not null default clock_timestamp()
);
comment on table realtime_gateway.change_log is
    'Row changes captured by realtime-gateway triggers; read by snapshot difference, pruned by age.';
create index change_log_txid_id on realtime_gateway.change_log (txid, id);

create table realtime_gateway.enabled_tables (
    table_oid   oid primary key,
    source      text not null default 'manual' check (source in ('manual', 'publication')),
    enabled_at  timestamptz not null default now()
);

create table realtime_gateway.state (
    singleton     boolean primary key default true check (singleton),
    pruned_below  xid8 not null default '0',
    pruned_at     timestamptz
);
comment on column realtime_gateway.state.pruned_below is
    'Every change_log row with txid below this may have been deleted by retention.';
insert into realtime_gateway.state default values;

create table realtime_gateway.prune_marks (
    taken_at       timestamptz not null default now(),
    snapshot_xmin  xid8 not null
);
create index prune_marks_taken_at on realtime_gateway.prune_marks (taken_at);

create view realtime_gateway.tables as
    select n.nspname::text as schema, c.relname::text as "table", e.source, e.enabled_at, e.table_oid
    from realtime_gateway.enabled_tables e
    join pg_catalog.pg_class c on c.oid = e.table_oid
    join pg_catalog.pg_namespace n on n.oid = c.relnamespace;

-- Capture. Statement-level, one INSERT ... SELECT per statement, whatever its row count.
-- The wake-up NOTIFY is sent only by the transaction holding the throttle lock, so
-- concurrent writers do not queue on the global NOTIFY lock at commit.
create function realtime_gateway.capture_insert() returns trigger
language plpgsql security definer set search_path = '' as $fn$
begin
    insert into realtime_gateway.change_log (table_oid, op, record)
    select tg_relid, 'I', pg_catalog.row_to_json(n.*) from new_rows n;
    if found and pg_catalog.pg_try_advisory_xact_lock(1380406359, 1) then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

-- old_rows and new_rows are filled in lockstep by the executor (one old and one new
-- tuple per updated row, in the same call), so the i-th rows of each belong together.
-- This pairs rows correctly even when the primary key itself changes or there is none.
create function realtime_gateway.capture_update() returns trigger
language plpgsql security definer set search_path = '' as $fn$
begin
    insert into realtime_gateway.change_log (table_oid, op, record, old_record)
    select tg_relid, 'U', n.j, o.j
    from (select pg_catalog.row_to_json(t.*) as j, pg_catalog.row_number() over () as rn from new_rows t) n
    join (select pg_catalog.row_to_json(t.*) as j, pg_catalog.row_number() over () as rn from old_rows t) o
      on o.rn = n.rn
    order by n.rn;
    if found and pg_catalog.pg_try_advisory_xact_lock(1380406359, 1) then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

create function realtime_gateway.capture_delete() returns trigger
language plpgsql security definer set search_path = '' as $fn$
begin
    insert into realtime_gateway.change_log (table_oid, op, old_record)
    select tg_relid, 'D', pg_catalog.row_to_json(o.*) from old_rows o;
    if found and pg_catalog.pg_try_advisory_xact_lock(1380406359, 1) then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

create function realtime_gateway.enable(tbl regclass, source text default 'manual') returns boolean
language plpgsql set search_path = '' as $fn$
declare
    kind "char";
    nsp text;
    rel text;
    persistence "char";
    fresh boolean;
begin
    perform pg_catalog.pg_advisory_xact_lock(1380406359, 3);
    select c.relkind, n.nspname, c.relname, c.relpersistence into kind, nsp, rel, persistence
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = tbl;
    if not found then
        raise exception 'relation with OID % does not exist', tbl::oid using errcode = 'undefined_table';
    end if;
    if kind not in ('r', 'p') then
        raise exception '"%.%" cannot be enabled for realtime: it is not a table', nsp, rel
            using errcode = 'wrong_object_type';
    end if;
    if nsp in ('information_schema', 'realtime_gateway') or nsp like 'pg\_%' or persistence = 't' then
        raise exception '"%.%" cannot be enabled for realtime: it is a system, internal or temporary table', nsp, rel
            using errcode = 'wrong_object_type';
    end if;
    if source not in ('manual', 'publication') then
        raise exception 'source must be manual or publication' using errcode = 'invalid_parameter_value';
    end if;
    -- (Re)create the triggers: enabling an enabled table repairs them.
    execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_insert on %I.%I', nsp, rel);
    execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_update on %I.%I', nsp, rel);
    execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_delete on %I.%I', nsp, rel);
    execute pg_catalog.format('create trigger realtime_gateway_capture_insert after insert on %I.%I '
        'referencing new table as new_rows for each statement '
        'execute function realtime_gateway.capture_insert()', nsp, rel);
    execute pg_catalog.format('create trigger realtime_gateway_capture_update after update on %I.%I '
        'referencing old table as old_rows new table as new_rows for each statement '
        'execute function realtime_gateway.capture_update()', nsp, rel);
    execute pg_catalog.format('create trigger realtime_gateway_capture_delete after delete on %I.%I '
        'referencing old table as old_rows for each statement '
        'execute function realtime_gateway.capture_delete()', nsp, rel);
    fresh := not exists (select 1 from realtime_gateway.enabled_tables e where e.table_oid = tbl);
    -- A manual enable wins over the publication: such a table is never auto-disabled.
    insert into realtime_gateway.enabled_tables as e (table_oid, source) values (tbl, source)
    on conflict (table_oid) do update
        set source = case when e.source = 'manual' or excluded.source = 'manual' then 'manual' else 'publication' end;
    perform pg_catalog.pg_notify('realtime_gateway', 'tables');
    return fresh;
end
$fn$;

create function realtime_gateway.disable(tbl regclass) returns boolean
language plpgsql set search_path = '' as $fn$
declare
    nsp text;
    rel text;
    was boolean;
begin
    perform pg_catalog.pg_advisory_xact_lock(1380406359, 3);
    select n.nspname, c.relname into nsp, rel
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = tbl;
    if found then
        execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_insert on %I.%I', nsp, rel);
        execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_update on %I.%I', nsp, rel);
        execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_delete on %I.%I', nsp, rel);
    end if;
    delete from realtime_gateway.enabled_tables e where e.table_oid = tbl;
    was := found;
    if was then
        perform pg_catalog.pg_notify('realtime_gateway', 'tables');
    end if;
    return was;
end
$fn$;

-- Supabase compatibility: tables in the publication are enabled; tables the sync
-- enabled and that left the publication are disabled. Only one session syncs at a time.
-- Returns the number of tables enabled or disabled, or -1 if the publication does not exist.
create function realtime_gateway.sync_publication(pub text) returns integer
language plpgsql set search_path = '' as $fn$
declare
    r record;
    changed integer := 0;
begin
    if not pg_catalog.pg_try_advisory_xact_lock(1380406359, 2) then
        return 0;
    end if;
    -- Forget dropped tables.
    delete from realtime_gateway.enabled_tables e
    where not exists (select 1 from pg_catalog.pg_class c where c.oid = e.table_oid);
    if not exists (select 1 from pg_catalog.pg_publication p where p.pubname = pub) then
        return -1;
    end if;
    for r in
        select c.oid
        from pg_catalog.pg_publication_tables pt
        join pg_catalog.pg_namespace n on n.nspname = pt.schemaname
        join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
        where pt.pubname = pub and c.relkind in ('r', 'p') and c.relpersistence <> 't'
          and n.nspname not in ('information_schema', 'realtime_gateway') and n.nspname not like 'pg\_%'
          and not exists (select 1 from realtime_gateway.enabled_tables e where e.table_oid = c.oid)
    loop
        perform realtime_gateway.enable(r.oid::regclass, 'publication');
        changed := changed + 1;
    end loop;
    for r in
        select e.table_oid
        from realtime_gateway.enabled_tables e
        where e.source = 'publication'
          and not exists (
              select 1
              from pg_catalog.pg_publication_tables pt
              join pg_catalog.pg_namespace n on n.nspname = pt.schemaname
              join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
              where pt.pubname = pub and c.oid = e.table_oid)
    loop
        perform realtime_gateway.disable(r.table_oid::regclass);
        changed := changed + 1;
    end loop;
    return changed;
end
$fn$;

-- Retention. Each call records the current snapshot xmin as a mark; rows are deleted
-- by txid below the newest mark older than `retention`. Every transaction below that
-- xmin had finished when the mark was taken, so the pruned set is a txid prefix and a
-- reader can tell exactly whether it lost anything: it did iff pruned_below exceeds the
-- xmin of the last snapshot it read up to. Returns the number of rows deleted.
create function realtime_gateway.prune(retention interval) returns bigint
language plpgsql set search_path = '' as $fn$
declare
    cutoff xid8;
    deleted bigint;
begin
    if not pg_catalog.pg_try_advisory_xact_lock(1380406359, 4) then
        return 0;
    end if;
    insert into realtime_gateway.prune_marks (snapshot_xmin)
    values (pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()));
    select max(m.snapshot_xmin) into cutoff
    from realtime_gateway.prune_marks m where m.taken_at <= now() - retention;
    if cutoff is null then
        return 0;
    end if;
    delete from realtime_gateway.prune_marks m
    where m.taken_at <= now() - retention and m.snapshot_xmin < cutoff;
    delete from realtime_gateway.change_log l where l.txid < cutoff;
    get diagnostics deleted = row_count;
    update realtime_gateway.state s set pruned_below = cutoff, pruned_at = now()
    where s.pruned_below < cutoff;
    return deleted;
end
$fn$;

-- Oversized rows: keep only values whose JSON text is at most max_value_bytes.
create function realtime_gateway.trim_record(r json, max_value_bytes integer) returns json
language sql immutable parallel safe set search_path = '' as $fn$
    select coalesce(
        pg_catalog.json_object_agg(e.key, e.value order by e.n)
            filter (where pg_catalog.octet_length(e.value::text) <= max_value_bytes),
        '{}'::json)
    from pg_catalog.json_each(r) with ordinality as e(key, value, n)
$fn$;

create function realtime_gateway.oversized_columns(r json, max_value_bytes integer) returns text[]
language sql immutable parallel safe set search_path = '' as $fn$
    select coalesce(
        pg_catalog.array_agg(e.key order by e.n)
            filter (where pg_catalog.octet_length(e.value::text) > max_value_bytes),
        '{}'::text[])
    from pg_catalog.json_each(r) with ordinality as e(key, value, n)
$fn$;

revoke all on all tables in schema realtime_gateway from public;
"#;

/// Installs or upgrades the `realtime_gateway` schema to [`SCHEMA_VERSION`].
///
/// Idempotent and safe to run concurrently from several replicas (an advisory
/// lock serializes them; all pending versions and their version rows are
/// applied in one transaction, so a failure leaves the schema unchanged). Do not share `client` with concurrent queries while
/// this runs: it issues `BEGIN`/`COMMIT` on it.
pub async fn migrate(client: &Client) -> Result<(), IngestError> {
    let current = lock_and_read_version(client).await;
    let current = match current {
        Ok(v) => v,
        Err(e) => {
            let _ = client.batch_execute("rollback").await;
            return Err(e.into());
        }
    };
    if current > SCHEMA_VERSION {
        tracing::warn!(
            found = current,
            known = SCHEMA_VERSION,
            "realtime_gateway schema is newer than this build"
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = index as i32 + 1;
        if version <= current {
            continue;
        }
        let applied = async {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "insert into realtime_gateway.migrations (version) values ($1)",
                    &[&version],
                )
                .await
        }
        .await;
        if let Err(source) = applied {
            let _ = client.batch_execute("rollback").await;
            return Err(IngestError::Migration { version, source });
        }
        tracing::info!(version, "applied realtime_gateway migration");
    }
    client.batch_execute("commit").await?;
    Ok(())
}

/// Opens the migration transaction, takes the lock, makes sure the schema and
/// the version table exist, and returns the current version.
async fn lock_and_read_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    client
        .batch_execute("begin; set local lock_timeout = '10s'")
        .await?;
    client
        .execute(
            "select pg_advisory_xact_lock($1, $2)",
            &[&LOCK_CLASS, &LOCK_MIGRATE],
        )
        .await?;
    // Only create when missing: CREATE ... IF NOT EXISTS still needs the CREATE
    // privilege, which a gateway role on an installed schema may not have.
    let installed: bool = client
        .query_one(
            "select to_regclass('realtime_gateway.migrations') is not null",
            &[],
        )
        .await?
        .get(0);
    if !installed {
        client
            .batch_execute(
                "create schema if not exists realtime_gateway;
             create table if not exists realtime_gateway.migrations (
                 version     integer primary key,
                 applied_at  timestamptz not null default now()
             );",
            )
            .await?;
    }
    let row = client
        .query_one(
            "select coalesce(max(version), 0) from realtime_gateway.migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
