-- Version 2: Supabase-compatible auth.uid(), auth.jwt(), auth.role() and
-- auth.email(), so RLS policies written for Supabase work on any PostgreSQL.
-- Only what is missing is created: a database with Supabase's own `auth`
-- schema keeps its definitions. They read the settings realtime-gateway sets
-- when it evaluates policies as a subscriber (request.jwt.claims, and the
-- legacy request.jwt.claim.sub / request.jwt.claim.role).
do $v2$
begin
    if not exists (select 1 from pg_catalog.pg_namespace where nspname = 'auth') then
        create schema auth;
        grant usage on schema auth to public;
    end if;
    if pg_catalog.to_regprocedure('auth.uid()') is null then
        create function auth.uid() returns uuid language sql stable as $f$
            select coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
            )::uuid
        $f$;
    end if;
    if pg_catalog.to_regprocedure('auth.role()') is null then
        create function auth.role() returns text language sql stable as $f$
            select coalesce(
                nullif(current_setting('request.jwt.claim.role', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
            )::text
        $f$;
    end if;
    if pg_catalog.to_regprocedure('auth.email()') is null then
        create function auth.email() returns text language sql stable as $f$
            select coalesce(
                nullif(current_setting('request.jwt.claim.email', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
            )::text
        $f$;
    end if;
    if pg_catalog.to_regprocedure('auth.jwt()') is null then
        create function auth.jwt() returns jsonb language sql stable as $f$
            select coalesce(
                nullif(current_setting('request.jwt.claim', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')
            )::jsonb
        $f$;
    end if;
exception when insufficient_privilege then
    -- Without them no policy can call them either; nothing to provide.
    raise notice 'realtime_gateway: not allowed to create the auth schema or its functions: %', sqlerrm;
end
$v2$;
