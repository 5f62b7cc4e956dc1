-- writer-cost benchmark: two identical tables, one enabled for realtime.
-- Run after `realtime-gateway migrate` (or change_ingest::migrate).
drop table if exists bench_plain, bench_enabled;
create table bench_plain (id bigserial primary key, body text not null, created_at timestamptz not null default now());
create table bench_enabled (id bigserial primary key, body text not null, created_at timestamptz not null default now());
select realtime_gateway.enable('public.bench_enabled');
