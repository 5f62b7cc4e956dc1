// Shared setup for the Postgres Changes tests: a throwaway PostgreSQL, a fresh
// database, the gateway pointed at it, and raw-frame subscriber helpers.
//
//   const env = await startChangesEnv({ name: 'changes-x', setupSql: 'create table ...' })
//   env.db        node-postgres Client on the test database
//   env.gw        gateway handle (lib/gateway.mjs)
//   env.pg        cluster handle (lib/postgres.mjs)
//   await env.stop()
import { startGateway } from './gateway.mjs'
import { startPostgres } from './postgres.mjs'
import { RawClient } from './raw.mjs'
import { until, WAIT_MS } from './util.mjs'

export const LISTENER_APP = 'realtime_gateway_listener'

/**
 * Supabase's API roles and default grants on `public` (as `supabase start` creates them;
 * same SQL as change_ingest::authz::SUPABASE_ROLES_SQL). The gateway judges every change as
 * the subscriber's role, so the anon key needs an `anon` role. Run before the test's own SQL.
 */
export const SUPABASE_ROLES = `
do $$
begin
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
exception when duplicate_object or unique_violation then
  null;
end
$$;
grant usage on schema public to anon, authenticated, service_role;
grant select, insert, update, delete on all tables in schema public to anon, authenticated, service_role;
alter default privileges in schema public grant select, insert, update, delete on tables to anon, authenticated, service_role;
`

export async function startChangesEnv({ name, setupSql = '', gatewayEnv = {}, dbName = name.replace(/[^a-z0-9_]/gi, '_') } = {}) {
  const pg = await startPostgres({ name })
  try {
    const dbUrl = await pg.createDatabase(dbName)
    const db = await pg.connect(dbName)
    await db.query(SUPABASE_ROLES)
    if (setupSql) await db.query(setupSql)
    const gw = await startGateway({ name, env: { DATABASE_URL: dbUrl, ...gatewayEnv } })
    const env = {
      pg,
      db,
      gw,
      dbName,
      dbUrl,
      /** Waits until the gateway's listener connection is (re)connected; returns its pid. */
      async listenerPid({ timeoutMs = WAIT_MS } = {}) {
        return until(
          async () => {
            const r = await pg.query('postgres', `select pid from pg_stat_activity where application_name = $1 and datname = $2`, [LISTENER_APP, dbName])
            return r.rows[0]?.pid
          },
          { timeoutMs, every: 50, what: `a connection with application_name ${LISTENER_APP}` },
        )
      },
      /** Terminates the listener connection; returns the number of backends terminated. */
      async killListener() {
        // Through the `postgres` database, so it works while the test database refuses connections.
        const r = await pg.query(
          'postgres',
          `select pg_terminate_backend(pid) as ok from pg_stat_activity where application_name = $1 and datname = $2`,
          [LISTENER_APP, dbName],
        )
        return r.rows.filter((x) => x.ok).length
      },
      async stop() {
        let err
        try {
          await gw.stop()
        } catch (e) {
          err = e
        }
        await pg.stop()
        if (err) throw err
      },
    }
    return env
  } catch (e) {
    console.error(`----- tail of postgres log -----\n${pg.logTail()}`)
    await pg.stop()
    throw e
  }
}

/** True for a `system` frame of the postgres_changes extension. */
export const isPgSystem = (m) => m.event === 'system' && m.payload?.extension === 'postgres_changes'

/**
 * Raw V2 channel join with `postgres_changes` bindings; waits for the join reply and
 * for the first postgres_changes `system` message. Returns {client, topic, joinRef, reply, system}.
 * `onChange(payload, msg)` sees every postgres_changes frame on `topic` (installed before the
 * join). With `collect: false` the client stops keeping frames once subscribed (for bulk tests).
 */
export async function rawPgSubscribe(gw, topic, bindings, { client, onChange, collect = true, timeoutMs = WAIT_MS } = {}) {
  const c = client ?? (await RawClient.connect(gw, { vsn: '2.0.0' }))
  if (onChange) {
    const prev = c.onMessage
    c.onMessage = (m) => {
      if (prev) prev(m)
      if (m.topic === topic && m.event === 'postgres_changes') onChange(m.payload, m)
    }
  }
  const { joinRef, reply } = await c.join(topic, { config: { broadcast: { self: false }, presence: { key: '', enabled: false }, postgres_changes: bindings, private: false } })
  const system = await c.next((m) => m.topic === topic && isPgSystem(m), { timeoutMs, what: `system message on ${topic}` })
  if (!collect) {
    c.collect = false
    c.inbox.length = 0
    c.log.length = 0
  }
  return { client: c, topic, joinRef, reply, system }
}

/**
 * Closes supabase-js clients without RealtimeClient.disconnect(), whose socket adapter
 * leaves an uncleared 10 s timer that keeps the test process alive after the tests.
 */
export async function closeSbClients(clients) {
  await Promise.all(
    clients.filter(Boolean).map(async (c) => {
      const rt = c.realtime
      for (const ch of rt.getChannels()) await rt.removeChannel(ch).catch(() => {})
      rt._cancelPendingDisconnect?.()
      const sock = rt.socketAdapter?.socket
      if (!sock) return rt.disconnect().catch(() => {})
      await new Promise((res) => {
        const t = setTimeout(res, 2000)
        t.unref()
        sock.disconnect(() => {
          clearTimeout(t)
          res()
        })
      })
      clearInterval(rt._workerHeartbeatTimer)
    }),
  )
}

/**
 * Waits until a binding on `schema.table` gets "Subscribed to PostgreSQL" (the gateway has
 * picked up that the table is enabled): joins probe channels on one raw socket every 50 ms.
 * With `status: 'error'`, waits for the opposite (the gateway has seen it disabled).
 * Returns the number of attempts.
 */
export async function waitLive(gw, table, { schema = 'public', timeoutMs = WAIT_MS, status = 'ok' } = {}) {
  const c = await RawClient.connect(gw, { vsn: '2.0.0' })
  const deadline = Date.now() + timeoutMs
  try {
    for (let n = 1; ; n++) {
      const s = await rawPgSubscribe(gw, `realtime:probe-${table}-${n}`, [{ event: '*', schema, table }], { client: c, timeoutMs })
      if (s.system.payload.status === status) return n
      if (Date.now() > deadline) throw new Error(`${schema}.${table}: no "${status}" system message after ${timeoutMs} ms: ${s.system.raw}`)
      await new Promise((r) => setTimeout(r, 50))
    }
  } finally {
    c.close()
  }
}
