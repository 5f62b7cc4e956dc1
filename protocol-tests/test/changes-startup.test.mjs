// Issue 9 (TLS / start-up): a gateway whose database is unreachable at start keeps
// running — Broadcast works, Postgres Changes bindings wait instead of being refused —
// and attaches (with back-off) once PostgreSQL comes up, then delivers changes.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { startGateway, freePort, withLog } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'
import { RawClient } from '../lib/raw.mjs'
import { rawPgSubscribe, isPgSystem, waitLive, SUPABASE_ROLES } from '../lib/changes-env.mjs'
import { until } from '../lib/util.mjs'

let gw
let pg
const sockets = []

after(async () => {
  for (const s of sockets) s.close()
  if (gw) await gw.stop()
  if (pg) await pg.stop()
})

test(
  'database unreachable at start: Broadcast serves, changes bindings wait, delivery starts once PostgreSQL is up',
  withLog(() => gw, async () => {
    const port = await freePort()
    gw = await startGateway({
      name: 'changes-startup',
      env: { DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/postgres` },
    })

    // Broadcast (self) round trip while the database is down.
    const b = await RawClient.connect(gw, { vsn: '2.0.0' })
    sockets.push(b)
    const { reply } = await b.join('realtime:room', { config: { broadcast: { self: true }, presence: { key: '' }, postgres_changes: [], private: false } })
    assert.equal(reply.payload.status, 'ok')
    b.push('realtime:room', 'broadcast', { type: 'broadcast', event: 'hi', payload: { n: 1 } })
    const got = await b.next((m) => m.topic === 'realtime:room' && m.event === 'broadcast', { what: 'own broadcast' })
    assert.deepEqual(got.payload.payload, { n: 1 })

    // A changes binding is accepted and waits while the database is down (no "no
    // database" refusal); it is resolved against the feed once that is live.
    const c = await RawClient.connect(gw, { vsn: '2.0.0' })
    sockets.push(c)
    const early = rawPgSubscribe(gw, 'realtime:early', [{ event: '*', schema: 'public', table: 't' }], { client: c, timeoutMs: 120_000 })
    await c.expectNone((m) => m.topic === 'realtime:early' && isPgSystem(m), 1000, 'system message while the database is down')

    pg = await startPostgres({ name: 'changes-startup', port })
    const { system } = await early
    assert.doesNotMatch(system.payload.message, /no database/, system.raw)
    const db = await pg.connect()
    await db.query(SUPABASE_ROLES)
    await db.query(`create table t (id int primary key, v text); select realtime_gateway.enable('public.t')`)
    await waitLive(gw, 't')
    const changes = []
    await rawPgSubscribe(gw, 'realtime:feed', [{ event: '*', schema: 'public', table: 't' }], { client: c, onChange: (p) => changes.push(p.data) })
    await db.query(`insert into t values (1, 'after start')`)
    await until(() => changes.length > 0, { what: 'the change of a row written after the database came up' })
    assert.equal(changes[0].table, 't')
    assert.equal(changes[0].record.v, 'after start')
  }),
)
