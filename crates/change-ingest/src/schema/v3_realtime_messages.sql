-- Supabase Realtime's `realtime` schema objects for private channels and
-- Broadcast from the database: `realtime.messages` (partitioned by day on
-- `inserted_at`), `realtime.topic()`, `realtime.send()`,
-- `realtime.broadcast_changes()`. Each is created only where it is missing, so
-- a database that already has Supabase's own schema keeps its own objects.
-- Daily partitions are created (and old ones dropped) by the gateway's
-- maintenance (change_ingest::realtime::maintain_messages), as upstream does.
create schema if not exists realtime;

do $do$
begin
    if pg_catalog.to_regclass('realtime.messages') is null then
        create table realtime.messages (
            topic          text not null,
            extension      text not null,
            payload        jsonb,
            event          text,
            private        boolean default false,
            updated_at     timestamp not null default now(),
            inserted_at    timestamp not null default now(),
            id             uuid not null default gen_random_uuid(),
            binary_payload bytea,
            constraint messages_payload_exclusive check (payload is null or binary_payload is null),
            primary key (id, inserted_at)
        ) partition by range (inserted_at);
        comment on table realtime.messages is
            'Broadcast messages (realtime.send) and private-channel policies (RLS); created by realtime-gateway.';
        create index messages_inserted_at_topic_index on realtime.messages (inserted_at desc, topic)
            where extension = 'broadcast' and private is true;
        alter table realtime.messages enable row level security;
    end if;
end
$do$;

-- Supabase's API roles read and write through their policies (only roles that exist).
do $do$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated', 'service_role'] loop
        if exists (select 1 from pg_catalog.pg_roles where rolname = r) then
            execute pg_catalog.format('grant usage on schema realtime to %I', r);
            execute pg_catalog.format('grant select, insert, update on realtime.messages to %I', r);
        end if;
    end loop;
end
$do$;

do $do$
begin
    if not exists (
        select 1 from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'realtime' and p.proname = 'topic' and p.pronargs = 0
    ) then
        create function realtime.topic() returns text as $fn$
            select nullif(current_setting('realtime.topic', true), '')::text;
        $fn$ language sql stable;
    end if;

    if not exists (
        select 1 from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'realtime' and p.proname = 'send'
          and p.proargtypes = '3802 25 25 16'::pg_catalog.oidvector
    ) then
        -- Upstream's definition: inserts in the caller's transaction (delivered only
        -- if it commits); never fails the caller (errors become a WARNING).
        create function realtime.send(payload jsonb, event text, topic text, private boolean default true)
        returns void as $fn$
        declare
            generated_id uuid;
            final_payload jsonb;
        begin
            begin
                generated_id := gen_random_uuid();
                if payload ? 'id' then
                    final_payload := payload;
                else
                    final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
                end if;
                execute format('SET LOCAL realtime.topic TO %L', topic);
                insert into realtime.messages (id, payload, event, topic, private, extension)
                values (generated_id, final_payload, event, topic, private, 'broadcast');
            exception
                when others then
                    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
            end;
        end;
        $fn$ language plpgsql;
    end if;

    if not exists (
        select 1 from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'realtime' and p.proname = 'broadcast_changes'
    ) then
        create function realtime.broadcast_changes(topic_name text, event_name text, operation text,
            table_name text, table_schema text, new record, old record, level text default 'ROW')
        returns void as $fn$
        declare
            row_data jsonb := '{}'::jsonb;
        begin
            if level = 'STATEMENT' then
                raise exception 'function can only be triggered for each row, not for each statement';
            end if;
            if operation = 'INSERT' or operation = 'UPDATE' or operation = 'DELETE' then
                row_data := jsonb_build_object('old_record', old, 'record', new, 'operation', operation,
                    'table', table_name, 'schema', table_schema);
                perform realtime.send(row_data, event_name, topic_name);
            else
                raise exception 'Unexpected operation type: %', operation;
            end if;
        exception
            when others then
                raise exception 'Failed to process the row: %', sqlerrm;
        end;
        $fn$ language plpgsql;
    end if;
end
$do$;
