-- Capture v2: a change log partitioned into a time ring (pruned by TRUNCATE of whole
-- partitions), crash markers on every row, capture that pins its output settings and
-- never fails the writer (oversized rows become key-only placeholders; no NOTIFY when
-- PREPARE TRANSACTION is possible), TRUNCATE capture, partitioned tables captured
-- through their root, triggers that fire for replicated writes, and lock-safe
-- enable/disable/sync (triggers created only when missing, under lock_timeout).
--
-- Advisory lock keys (class 1380406359 = 'RGTW'): 1 = idle listener (wake-up gate),
-- 2 = publication sync, 3 = enable/disable, 4 = retention.

-- The v1 log is replaced. A gateway of this version starts from the current snapshot,
-- so rows an older gateway had not read yet are not carried over.
drop table realtime_gateway.change_log;

create sequence realtime_gateway.change_seq cache 1000;
comment on sequence realtime_gateway.change_seq is
    'Orders the rows of one transaction (ids are per-backend cached: not ordered across transactions).';

-- slot: 5-minute window of the capture time, modulo 8 (a 40-minute ring; see slot_of).
-- boot: pg_postmaster_start_time() of the server that captured the row. Transaction ids
-- can be handed out again after a crash or a failover; (boot, txid) cannot.
create table realtime_gateway.change_log (
    slot        int2 not null,
    op          "char" not null,
    table_oid   oid not null,
    txid        xid8 not null default pg_catalog.pg_current_xact_id(),
    id          int8 not null default pg_catalog.nextval('realtime_gateway.change_seq'),
    boot        timestamptz not null,
    created_at  timestamptz not null,
    record      json,
    old_record  json
) partition by list (slot);
comment on table realtime_gateway.change_log is
    'Row changes captured by realtime-gateway triggers; read by snapshot difference, pruned by truncating whole time slots.';
comment on column realtime_gateway.change_log.op is 'I, U, D or T (truncate).';
comment on column realtime_gateway.change_log.record is
    'row_to_json of the new row; a JSON array [primary key, reason] when it could not be rendered (over 1 GB).';
create table realtime_gateway.change_log_0 partition of realtime_gateway.change_log for values in (0);
create table realtime_gateway.change_log_1 partition of realtime_gateway.change_log for values in (1);
create table realtime_gateway.change_log_2 partition of realtime_gateway.change_log for values in (2);
create table realtime_gateway.change_log_3 partition of realtime_gateway.change_log for values in (3);
create table realtime_gateway.change_log_4 partition of realtime_gateway.change_log for values in (4);
create table realtime_gateway.change_log_5 partition of realtime_gateway.change_log for values in (5);
create table realtime_gateway.change_log_6 partition of realtime_gateway.change_log for values in (6);
create table realtime_gateway.change_log_7 partition of realtime_gateway.change_log for values in (7);
create index change_log_txid_id on realtime_gateway.change_log (txid, id);

-- Width of a slot and number of slots: the ring covers 40 minutes, so retention can be at
-- most 30 minutes (a slot is truncated once its window ended at least `retention` ago).
-- (No `set search_path` on these three and every name qualified, so callers inline them.)
create function realtime_gateway.slot_width() returns integer
language sql immutable parallel safe as $fn$ select 300 $fn$;
create function realtime_gateway.slot_count() returns integer
language sql immutable parallel safe as $fn$ select 8 $fn$;
create function realtime_gateway.slot_of(at timestamptz) returns int2
language sql stable parallel safe as $fn$
    select pg_catalog.int2(pg_catalog.mod(pg_catalog.int8(pg_catalog.floor(
        pg_catalog.date_part('epoch', at) operator(pg_catalog./) realtime_gateway.slot_width()::float8)),
        realtime_gateway.slot_count()::int8))
$fn$;

alter table realtime_gateway.prune_marks add column snapshot_xmax xid8;

alter table realtime_gateway.enabled_tables drop constraint enabled_tables_source_check;
alter table realtime_gateway.enabled_tables add constraint enabled_tables_source_check
    check (source in ('manual', 'publication', 'internal'));

-- Renders a large row (its stored size exceeds 512 KiB). Its JSON may exceed PostgreSQL's
-- 1 GB limit (escaping grows text up to 6x, hex bytea 2x, and stored values may be
-- compressed), so rendering happens in a read-only exception block (no subtransaction
-- id is assigned). On failure it returns NULL and flags the statement: the capture
-- function then stores `[primary key, reason]` for those rows (see key_fixup_sql).
create function realtime_gateway.render_large(r record) returns json
language plpgsql stable set search_path = '' as $fn$
begin
    return pg_catalog.row_to_json(r);
exception when others then
    perform pg_catalog.set_config('realtime_gateway.unrendered', '1', true);
    return null;
end
$fn$;

-- The statement that replaces the NULL images `render_large` left in the rows the
-- current statement captured ($1: their created_at, $2: their slot) with
-- `[primary key columns of rel, "Error 413: Payload Too Large"]`. Rows of a transition
-- table and the statement's log rows are matched by position (ids are drawn in
-- insertion order). Run by the capture function (only there are the transition tables
-- visible), and only when something failed to render.
create function realtime_gateway.key_fixup_sql(rel oid, image text, transition text) returns text
language sql stable set search_path = '' as $fn$
    select pg_catalog.format(
        'update realtime_gateway.change_log c
         set %1$I = pg_catalog.json_build_array(k.key, %2$L)
         from (select pg_catalog.row_number() over () as rn, pg_catalog.json_build_object(%3$s) as key
               from %4$I t) k,
              (select l.id, pg_catalog.row_number() over (order by l.id) as rn
               from realtime_gateway.change_log l
               where l.txid = pg_catalog.pg_current_xact_id() and l.slot = $2 and l.created_at = $1) o
         where c.txid = pg_catalog.pg_current_xact_id() and c.slot = $2 and c.created_at = $1
           and c.id = o.id and o.rn = k.rn and c.%1$I is null',
        image, 'Error 413: Payload Too Large',
        coalesce((select pg_catalog.string_agg(pg_catalog.format('%L, t.%I', a.attname, a.attname), ', ' order by k.ord)
                  from pg_catalog.pg_index i
                  cross join lateral pg_catalog.unnest(i.indkey::int2[]) with ordinality as k(attnum, ord)
                  join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
                  where i.indrelid = rel and i.indisprimary), ''),
        transition)
$fn$;

-- Capture. Statement-level, one INSERT ... SELECT per statement whatever its row count.
-- Output settings are pinned so row images do not depend on the writer's session.
-- Wake-up: NOTIFY only when PREPARE TRANSACTION is impossible (a transaction that ran
-- NOTIFY cannot be prepared) and a listener is idle (it then holds lock (class, 1)
-- exclusively; a busy listener holds nothing, and writers take it shared instead).
create or replace function realtime_gateway.capture_insert() returns trigger
language plpgsql security definer
set search_path = '' set timezone = 'UTC' set datestyle = 'ISO, MDY' set intervalstyle = 'postgres'
set extra_float_digits = '1' set bytea_output = 'hex' set lc_monetary = 'C'
as $fn$
#variable_conflict use_variable
declare
    v_at timestamptz := pg_catalog.clock_timestamp();
    v_slot int2 := realtime_gateway.slot_of(v_at);
    v_boot timestamptz := pg_catalog.pg_postmaster_start_time();
    v_rel oid := coalesce(pg_catalog.pg_partition_root(tg_relid), tg_relid);
begin
    insert into realtime_gateway.change_log (slot, op, table_oid, boot, created_at, record)
    select v_slot, 'I', v_rel, v_boot, v_at,
           case when pg_catalog.pg_column_size(n.*) <= 524288 then pg_catalog.row_to_json(n.*)
                else realtime_gateway.render_large(n.*) end
    from new_rows n;
    if pg_catalog.current_setting('realtime_gateway.unrendered', true) = '1' then
        perform pg_catalog.set_config('realtime_gateway.unrendered', '', true);
        execute realtime_gateway.key_fixup_sql(v_rel, 'record', 'new_rows') using v_at, v_slot;
    end if;
    if found and pg_catalog.current_setting('max_prepared_transactions') = '0'
       and not pg_catalog.pg_try_advisory_xact_lock_shared(1380406359, 1)
       and pg_catalog.pg_notification_queue_usage() < 0.5 then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

-- old_rows and new_rows are filled in lockstep by the executor (one old and one new
-- tuple per updated row, in the same call, also for rows moving between partitions),
-- so the i-th rows of each belong together, even when the key changes or there is none.
create or replace function realtime_gateway.capture_update() returns trigger
language plpgsql security definer
set search_path = '' set timezone = 'UTC' set datestyle = 'ISO, MDY' set intervalstyle = 'postgres'
set extra_float_digits = '1' set bytea_output = 'hex' set lc_monetary = 'C'
as $fn$
#variable_conflict use_variable
declare
    v_at timestamptz := pg_catalog.clock_timestamp();
    v_slot int2 := realtime_gateway.slot_of(v_at);
    v_boot timestamptz := pg_catalog.pg_postmaster_start_time();
    v_rel oid := coalesce(pg_catalog.pg_partition_root(tg_relid), tg_relid);
begin
    insert into realtime_gateway.change_log (slot, op, table_oid, boot, created_at, record, old_record)
    select v_slot, 'U', v_rel, v_boot, v_at, n.j, o.j
    from (select case when pg_catalog.pg_column_size(t.*) <= 524288 then pg_catalog.row_to_json(t.*)
                      else realtime_gateway.render_large(t.*) end as j,
                 pg_catalog.row_number() over () as rn
          from new_rows t) n
    join (select case when pg_catalog.pg_column_size(t.*) <= 524288 then pg_catalog.row_to_json(t.*)
                      else realtime_gateway.render_large(t.*) end as j,
                 pg_catalog.row_number() over () as rn
          from old_rows t) o on o.rn = n.rn
    order by n.rn;
    if pg_catalog.current_setting('realtime_gateway.unrendered', true) = '1' then
        perform pg_catalog.set_config('realtime_gateway.unrendered', '', true);
        execute realtime_gateway.key_fixup_sql(v_rel, 'record', 'new_rows') using v_at, v_slot;
        execute realtime_gateway.key_fixup_sql(v_rel, 'old_record', 'old_rows') using v_at, v_slot;
    end if;
    if found and pg_catalog.current_setting('max_prepared_transactions') = '0'
       and not pg_catalog.pg_try_advisory_xact_lock_shared(1380406359, 1)
       and pg_catalog.pg_notification_queue_usage() < 0.5 then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

create or replace function realtime_gateway.capture_delete() returns trigger
language plpgsql security definer
set search_path = '' set timezone = 'UTC' set datestyle = 'ISO, MDY' set intervalstyle = 'postgres'
set extra_float_digits = '1' set bytea_output = 'hex' set lc_monetary = 'C'
as $fn$
#variable_conflict use_variable
declare
    v_at timestamptz := pg_catalog.clock_timestamp();
    v_slot int2 := realtime_gateway.slot_of(v_at);
    v_boot timestamptz := pg_catalog.pg_postmaster_start_time();
    v_rel oid := coalesce(pg_catalog.pg_partition_root(tg_relid), tg_relid);
begin
    insert into realtime_gateway.change_log (slot, op, table_oid, boot, created_at, old_record)
    select v_slot, 'D', v_rel, v_boot, v_at,
           case when pg_catalog.pg_column_size(o.*) <= 524288 then pg_catalog.row_to_json(o.*)
                else realtime_gateway.render_large(o.*) end
    from old_rows o;
    if pg_catalog.current_setting('realtime_gateway.unrendered', true) = '1' then
        perform pg_catalog.set_config('realtime_gateway.unrendered', '', true);
        execute realtime_gateway.key_fixup_sql(v_rel, 'old_record', 'old_rows') using v_at, v_slot;
    end if;
    if found and pg_catalog.current_setting('max_prepared_transactions') = '0'
       and not pg_catalog.pg_try_advisory_xact_lock_shared(1380406359, 1)
       and pg_catalog.pg_notification_queue_usage() < 0.5 then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

-- TRUNCATE of a partitioned table fires on the root and on every partition: the reader
-- keeps one per table and transaction.
create function realtime_gateway.capture_truncate() returns trigger
language plpgsql security definer set search_path = '' as $fn$
#variable_conflict use_variable
declare
    v_at timestamptz := pg_catalog.clock_timestamp();
begin
    insert into realtime_gateway.change_log (slot, op, table_oid, boot, created_at)
    values (realtime_gateway.slot_of(v_at), 'T', coalesce(pg_catalog.pg_partition_root(tg_relid), tg_relid),
            pg_catalog.pg_postmaster_start_time(), v_at);
    if pg_catalog.current_setting('max_prepared_transactions') = '0'
       and not pg_catalog.pg_try_advisory_xact_lock_shared(1380406359, 1)
       and pg_catalog.pg_notification_queue_usage() < 0.5 then
        perform pg_catalog.pg_notify('realtime_gateway', '');
    end if;
    return null;
end
$fn$;

-- The relations that need capture triggers for `tbl`: the table and, when it is
-- partitioned, every partition at any depth (a write addressed to a partition fires only
-- that partition's statement triggers).
create function realtime_gateway.capture_targets(tbl oid) returns setof oid
language sql stable set search_path = '' as $fn$
    select tbl
    union
    select t.relid::oid from pg_catalog.pg_partition_tree(tbl) t where t.relid::oid <> tbl
$fn$;

-- Creates the capture triggers `tbl` lacks and makes them fire for replicated writes too
-- (ENABLE ALWAYS: rows applied by logical replication run with session_replication_role
-- = replica, and upstream Realtime sees those rows in the WAL). Touches the table (SHARE
-- ROW EXCLUSIVE, which readers never wait for) only when something is missing. Returns
-- the number of DDL statements run.
create function realtime_gateway.install_triggers(tbl oid) returns integer
language plpgsql set search_path = '' as $fn$
declare
    t record;
    enabled "char";
    ran integer := 0;
begin
    for t in
        select * from (values
            ('realtime_gateway_capture_insert', 'insert', 'referencing new table as new_rows', 'capture_insert'),
            ('realtime_gateway_capture_update', 'update', 'referencing old table as old_rows new table as new_rows', 'capture_update'),
            ('realtime_gateway_capture_delete', 'delete', 'referencing old table as old_rows', 'capture_delete'),
            ('realtime_gateway_capture_truncate', 'truncate', '', 'capture_truncate')
        ) as v(name, event, referencing, fn)
    loop
        select g.tgenabled into enabled from pg_catalog.pg_trigger g
        where g.tgrelid = tbl and g.tgname = t.name;
        if not found then
            execute pg_catalog.format('create trigger %I after %s on %s %s for each statement execute function realtime_gateway.%I()',
                t.name, t.event, tbl::regclass, t.referencing, t.fn);
            ran := ran + 1;
            enabled := 'O';
        end if;
        if enabled <> 'A' then
            execute pg_catalog.format('alter table %s enable always trigger %I', tbl::regclass, t.name);
            ran := ran + 1;
        end if;
    end loop;
    return ran;
end
$fn$;

-- Uses the caller's lock_timeout, or 5 s when none is set: DDL here must never queue
-- every writer of a table behind a long transaction.
create function realtime_gateway.bound_lock_wait() returns void
language plpgsql set search_path = '' as $fn$
begin
    if pg_catalog.current_setting('lock_timeout') = '0' then
        perform pg_catalog.set_config('lock_timeout', '5s', true);
    end if;
end
$fn$;

create or replace function realtime_gateway.enable(tbl regclass, source text default 'manual') returns boolean
language plpgsql set search_path = '' as $fn$
declare
    kind "char";
    nsp text;
    rel text;
    persistence "char";
    is_partition boolean;
    fresh boolean;
    target oid;
begin
    perform realtime_gateway.bound_lock_wait();
    perform pg_catalog.pg_advisory_xact_lock(1380406359, 3);
    select c.relkind, n.nspname, c.relname, c.relpersistence, c.relispartition
    into kind, nsp, rel, persistence, is_partition
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
    if is_partition then
        raise exception '"%.%" cannot be enabled for realtime: it is a partition of %; enable that table (its changes are reported under its name)',
            nsp, rel, pg_catalog.pg_partition_root(tbl)
            using errcode = 'wrong_object_type';
    end if;
    if source not in ('manual', 'publication', 'internal') then
        raise exception 'source must be manual, publication or internal' using errcode = 'invalid_parameter_value';
    end if;
    for target in select realtime_gateway.capture_targets(tbl) loop
        perform realtime_gateway.install_triggers(target);
    end loop;
    fresh := not exists (select 1 from realtime_gateway.enabled_tables e where e.table_oid = tbl);
    -- manual > internal > publication: the sync only ever disables what it enabled.
    insert into realtime_gateway.enabled_tables as e (table_oid, source) values (tbl, source)
    on conflict (table_oid) do update
        set source = case when 'manual' in (e.source, excluded.source) then 'manual'
                          when 'internal' in (e.source, excluded.source) then 'internal'
                          else 'publication' end;
    perform pg_catalog.pg_notify('realtime_gateway', 'tables');
    return fresh;
end
$fn$;

create or replace function realtime_gateway.disable(tbl regclass) returns boolean
language plpgsql set search_path = '' as $fn$
declare
    target oid;
    was boolean;
begin
    perform realtime_gateway.bound_lock_wait();
    perform pg_catalog.pg_advisory_xact_lock(1380406359, 3);
    if exists (select 1 from pg_catalog.pg_class c where c.oid = tbl) then
        for target in select realtime_gateway.capture_targets(tbl) loop
            execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_insert on %s', target::regclass);
            execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_update on %s', target::regclass);
            execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_delete on %s', target::regclass);
            execute pg_catalog.format('drop trigger if exists realtime_gateway_capture_truncate on %s', target::regclass);
        end loop;
    end if;
    delete from realtime_gateway.enabled_tables e where e.table_oid = tbl;
    was := found;
    if was then
        perform pg_catalog.pg_notify('realtime_gateway', 'tables');
    end if;
    return was;
end
$fn$;

-- Supabase compatibility: tables in the publication are enabled (a partition listed there
-- enables its root: changes are reported under the root, like publish_via_partition_root);
-- tables the sync enabled that left it are disabled. A table that is busy (lock_timeout)
-- is counted and retried on the next call; the others go ahead. Enabled partitioned
-- tables get the triggers their new partitions lack. Only one session syncs at a time.
drop function realtime_gateway.sync_publication(text);
create function realtime_gateway.sync_publication(pub text)
returns table (enabled integer, disabled integer, repaired integer, busy integer, publication_exists boolean)
language plpgsql set search_path = '' as $fn$
declare
    r record;
begin
    enabled := 0; disabled := 0; repaired := 0; busy := 0;
    publication_exists := pub is not null
        and exists (select 1 from pg_catalog.pg_publication p where p.pubname = pub);
    if not pg_catalog.pg_try_advisory_xact_lock(1380406359, 2) then
        return next;
        return;
    end if;
    -- Forget dropped tables.
    delete from realtime_gateway.enabled_tables e
    where not exists (select 1 from pg_catalog.pg_class c where c.oid = e.table_oid);
    if publication_exists then
        for r in
            select distinct coalesce(pg_catalog.pg_partition_root(c.oid), c.oid) as oid
            from pg_catalog.pg_publication_tables pt
            join pg_catalog.pg_namespace n on n.nspname = pt.schemaname
            join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
            where pt.pubname = pub and c.relkind in ('r', 'p') and c.relpersistence <> 't'
              and n.nspname not in ('information_schema', 'realtime_gateway') and n.nspname not like 'pg\_%'
              and not exists (select 1 from realtime_gateway.enabled_tables e
                              where e.table_oid = coalesce(pg_catalog.pg_partition_root(c.oid), c.oid))
        loop
            begin
                perform realtime_gateway.enable(r.oid::regclass, 'publication');
                enabled := enabled + 1;
            exception when lock_not_available then
                busy := busy + 1;
            end;
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
                  where pt.pubname = pub and coalesce(pg_catalog.pg_partition_root(c.oid), c.oid) = e.table_oid)
        loop
            begin
                perform realtime_gateway.disable(r.table_oid::regclass);
                disabled := disabled + 1;
            exception when lock_not_available then
                busy := busy + 1;
            end;
        end loop;
    end if;
    -- Missing triggers: new partitions, tables enabled by an older version.
    for r in
        select t.target
        from realtime_gateway.enabled_tables e
        cross join lateral realtime_gateway.capture_targets(e.table_oid) as t(target)
        where (select pg_catalog.count(*) from pg_catalog.pg_trigger g
               where g.tgrelid = t.target and g.tgenabled = 'A'
                 and g.tgname in ('realtime_gateway_capture_insert', 'realtime_gateway_capture_update',
                                  'realtime_gateway_capture_delete', 'realtime_gateway_capture_truncate')) < 4
    loop
        begin
            repaired := repaired + realtime_gateway.install_triggers(r.target);
        exception when lock_not_available then
            busy := busy + 1;
        end;
    end loop;
    if repaired > 0 then
        perform pg_catalog.pg_notify('realtime_gateway', 'tables');
    end if;
    return next;
end
$fn$;

-- Retention. Slot k may be truncated once (a) the last window that mapped to k ended at
-- least `retention` ago and (b) every transaction that could have written into it has
-- finished: xmin of the current snapshot >= xmax recorded by a mark taken after that
-- window ended (a writer's xid exists before its capture time). The rows truncated then
-- all have txid < that xmax, which becomes pruned_below: a reader lost something iff
-- pruned_below exceeds the xmin of the last snapshot it read up to. Returns the slots
-- truncated, the ones left because a lock was busy, and, when (b) holds a due slot back,
-- the oldest transaction's xmin and since when the slot has been due.
drop function realtime_gateway.prune(interval);
create function realtime_gateway.prune(retention interval)
returns table (truncated integer, busy integer, pinned_xmin xid8, pinned_since timestamptz)
language plpgsql set search_path = '' as $fn$
declare
    width integer := realtime_gateway.slot_width();
    slots integer := realtime_gateway.slot_count();
    now_at timestamptz := pg_catalog.clock_timestamp();
    snap pg_snapshot := pg_catalog.pg_current_snapshot();
    current_window int8;
    k integer;
    window_end timestamptz;
    bound xid8;
begin
    truncated := 0; busy := 0;
    if retention > pg_catalog.make_interval(secs => width * (slots - 2)) then
        retention := pg_catalog.make_interval(secs => width * (slots - 2));
    end if;
    if not pg_catalog.pg_try_advisory_xact_lock(1380406359, 4) then
        return next;
        return;
    end if;
    insert into realtime_gateway.prune_marks (taken_at, snapshot_xmin, snapshot_xmax)
    values (now_at, pg_catalog.pg_snapshot_xmin(snap), pg_catalog.pg_snapshot_xmax(snap));
    current_window := pg_catalog.floor(pg_catalog.date_part('epoch', now_at) / width)::int8;
    for k in 0 .. slots - 1 loop
        -- The newest past window mapped to slot k (never the current or the next one).
        window_end := pg_catalog.to_timestamp(((current_window - 1
            - pg_catalog.mod(current_window - 1 - k, slots)) + 1) * width);
        continue when current_window::integer % slots = k or (current_window + 1)::integer % slots = k;
        continue when now_at - window_end < retention;
        select m.snapshot_xmax into bound from realtime_gateway.prune_marks m
        where m.taken_at >= window_end and m.snapshot_xmax is not null
        order by m.taken_at limit 1;
        continue when bound is null;
        if pg_catalog.pg_snapshot_xmin(snap) < bound then
            if pinned_since is null or window_end + retention < pinned_since then
                pinned_since := window_end + retention;
                pinned_xmin := pg_catalog.pg_snapshot_xmin(snap);
            end if;
            continue;
        end if;
        continue when not exists (select 1 from realtime_gateway.change_log c where c.slot = k);
        begin
            execute pg_catalog.format('truncate realtime_gateway.%I', 'change_log_' || k);
            truncated := truncated + 1;
            update realtime_gateway.state s set pruned_below = bound, pruned_at = now_at
            where s.pruned_below < bound;
        exception when lock_not_available then
            busy := busy + 1;
        end;
    end loop;
    delete from realtime_gateway.prune_marks m
    where m.taken_at < now_at - pg_catalog.make_interval(secs => width * slots * 2);
    return next;
end
$fn$;

revoke all on all tables in schema realtime_gateway from public;
revoke all on all sequences in schema realtime_gateway from public;
