// Admin APIs on the real binary with a real PostgreSQL (issue 11, check 3):
// GET /api/realtime/status, GET /api/realtime/events (+ POST .../events/clear),
// GET /api/realtime/connections. Auth is on (the harness sets API_JWT_SECRET):
// 401 without a token, 403 with the anon key, 200 with a service_role token.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, closeSbClients, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { ANON_KEY, signHS256 } from '../lib/jwt.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sbClient, subscribe } from '../lib/supabase.mjs'
import { until, withTimeout } from '../lib/util.mjs'

// realtime-js reconnects when a heartbeat is not answered within one interval.
const HEARTBEAT_MS = 3000
const SERVICE_KEY = signHS256({ role: 'service_role', exp: 4102444800 })
const USER_KEY = signHS256({ role: 'authenticated', sub: 'user-7', exp: 4102444800 })

let env
const clients = []

before(async () => {
  env = await startChangesEnv({
    name: 'ops-api',
    setupSql: 'create table notes (id int primary key, body text); create table other (id int primary key)',
    // Short enough for the idle disconnect below, long enough that the other clients
    // (raw ones between frames, supabase-js heartbeating every HEARTBEAT_MS) outlive a
    // busy machine's pauses.
    gatewayEnv: { IDLE_TIMEOUT_MS: '10000' },
  })
  await env.db.query(`select realtime_gateway.enable('public.notes')`)
  await env.db.query(`select realtime_gateway.enable('public.other')`)
  await waitLive(env.gw, 'notes')
  await waitLive(env.gw, 'other')
})

after(async () => {
  await closeSbClients(clients)
  if (env) await env.stop()
})

const it = (name, fn) => test(name, withLog(() => env?.gw, fn))

/** GET/POST an admin path with the service_role key; asserts 200 and returns the JSON. */
async function admin(path, { method = 'GET', key = SERVICE_KEY } = {}) {
  const r = await fetch(`${env.gw.url}${path}`, { method, headers: { authorization: `Bearer ${key}` } })
  const text = await r.text()
  assert.equal(r.status, 200, `${method} ${path}: ${text}`)
  return JSON.parse(text)
}

it('every admin API needs a service_role token: 401 without a token or with a bad one, 403 with the anon key', async () => {
  const paths = [
    ['GET', '/api/realtime/status'],
    ['GET', '/api/realtime/events'],
    ['POST', '/api/realtime/events/clear'],
    ['GET', '/api/realtime/connections'],
    ['GET', '/realtime/v1/api/realtime/status'],
  ]
  const forged = signHS256({ role: 'service_role', exp: 4102444800 }, 'another-secret-that-is-at-least-32-characters-long')
  for (const [method, path] of paths) {
    const none = await fetch(`${env.gw.url}${path}`, { method })
    assert.equal(none.status, 401, `${method} ${path} without a token`)
    await none.arrayBuffer()
    const bad = await fetch(`${env.gw.url}${path}`, { method, headers: { authorization: `Bearer ${forged}` } })
    assert.equal(bad.status, 401, `${method} ${path} with a forged token`)
    await bad.arrayBuffer()
    const anon = await fetch(`${env.gw.url}${path}`, { method, headers: { apikey: ANON_KEY } })
    assert.equal(anon.status, 403, `${method} ${path} with the anon key`)
    await anon.arrayBuffer()
  }
  await admin('/api/realtime/status', { key: SERVICE_KEY })
})

it('status: version, uptime, readiness, feed live with enabled tables, lag and rows behind, channels by kind', async () => {
  const sb = sbClient(env.gw, { heartbeatIntervalMs: HEARTBEAT_MS })
  clients.push(sb)
  await subscribe(
    sb
      .channel('status-room', { config: { presence: { key: 'p1' } } })
      .on('postgres_changes', { event: '*', schema: 'public', table: 'notes' }, () => {})
      .on('presence', { event: 'sync' }, () => {}),
  )
  await env.db.query(`insert into notes values (1, 'status')`)
  const s = await until(async () => {
    const s = await admin('/api/realtime/status')
    // rows_behind is counted before the other fields are read: a change read
    // meanwhile shows in the counters first, and in rows_behind on the next call.
    const done = s.counters.changes >= 1 && s.change_feed.rows_behind === 0 && s.channels.postgres_changes >= 1
    return done ? s : null
  }, { what: 'the status to show the change read (rows_behind 0) and the channel' })
  assert.match(s.version, /^\d+\.\d+\.\d+/)
  assert.ok(s.uptime_secs > 0)
  assert.equal(s.ready, true)
  assert.equal(s.draining, false)
  assert.ok(s.connections >= 1)
  assert.ok(s.channels.total >= 1 && s.channels.presence >= 1 && s.channels.postgres_changes >= 1, JSON.stringify(s.channels))
  assert.equal(s.change_feed.state, 'live')
  assert.ok(s.change_feed.enabled_tables.includes('public.notes'), JSON.stringify(s.change_feed))
  assert.ok(s.change_feed.enabled_tables.includes('public.other'))
  assert.equal(typeof s.change_feed.lag_seconds, 'number')
  assert.equal(s.change_feed.rows_behind, 0, 'every committed change was read')
  assert.ok(s.counters.changes >= 1 && s.counters.frames_sent >= 1, JSON.stringify(s.counters))
  for (const reason of ['client_close', 'client_gone', 'idle', 'lag', 'token_expired', 'limit', 'shutdown', 'protocol_error']) {
    assert.equal(typeof s.counters.disconnects[reason], 'number', reason)
  }
})

it('events: changes and broadcasts in order, filtered by table and topic, limited, cleared', async () => {
  await admin('/api/realtime/events/clear', { method: 'POST' })
  assert.deepEqual((await admin('/api/realtime/events')).events, [])
  const sb = sbClient(env.gw, { heartbeatIntervalMs: HEARTBEAT_MS })
  clients.push(sb)
  const ch = sb.channel('events-room', { config: { broadcast: { ack: true } } })
  await subscribe(ch)
  await env.db.query(`insert into notes values (10, 'first')`)
  assert.equal(await ch.send({ type: 'broadcast', event: 'hello', payload: { n: 1 } }), 'ok')
  await env.db.query(`insert into other values (11)`)
  const big = 'y'.repeat(5000)
  const r = await fetch(`${env.gw.url}/api/broadcast`, {
    method: 'POST',
    headers: { apikey: ANON_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: 'events-room', event: 'big', payload: { big } }] }),
  })
  assert.equal(r.status, 202)
  const { events } = await until(async () => {
    const e = await admin('/api/realtime/events')
    return e.events.length >= 4 ? e : null
  }, { what: 'four events' })
  const kinds = events.map((e) => (e.kind === 'broadcast' ? `b:${e.event}` : `c:${e.table}`))
  assert.deepEqual(kinds.sort(), ['b:big', 'b:hello', 'c:notes', 'c:other'])
  const ids = events.map((e) => e.id)
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b), 'oldest first')
  const note = events.find((e) => e.table === 'notes')
  assert.equal(note.schema, 'public')
  assert.equal(note.type, 'INSERT')
  assert.deepEqual(JSON.parse(note.payload), { id: 10, body: 'first' })
  const hello = events.find((e) => e.event === 'hello')
  assert.equal(hello.topic, 'realtime:events-room')
  assert.equal(hello.deliveries, 0, 'self: false, nobody else in the room')
  const bigEvent = events.find((e) => e.event === 'big')
  assert.equal(bigEvent.truncated, true)
  assert.ok(bigEvent.payload.length <= 1024)

  const byTable = await admin('/api/realtime/events?table=public.notes')
  assert.deepEqual(byTable.events.map((e) => e.table), ['notes'])
  const byShortTable = await admin('/api/realtime/events?table=other')
  assert.deepEqual(byShortTable.events.map((e) => e.table), ['other'])
  const byTopic = await admin('/api/realtime/events?topic=events-room')
  assert.deepEqual(byTopic.events.map((e) => e.event).sort(), ['big', 'hello'])
  const last = await admin('/api/realtime/events?limit=1')
  assert.deepEqual(last.events.map((e) => e.id), [Math.max(...ids)])
  const after = await admin(`/api/realtime/events?after=${ids[1]}`)
  assert.deepEqual(after.events.map((e) => e.id), ids.slice(2))

  const cleared = await admin('/api/realtime/events/clear', { method: 'POST' })
  assert.ok(cleared.cleared_through >= Math.max(...ids))
  assert.deepEqual((await admin('/api/realtime/events')).events, [])
})

it('connections: id, peer, sub, role, channels, since, frames in/out; disconnects with their reason', async () => {
  const c = await RawClient.connect(env.gw, { apikey: USER_KEY })
  await c.join('realtime:conn-room', { config: { presence: { enabled: true }, postgres_changes: [{ event: '*', schema: 'public', table: 'notes' }] } })
  await c.heartbeat()
  const mine = await until(async () => {
    const s = await admin('/api/realtime/connections')
    return s.connections.find((x) => x.sub === 'user-7')
  }, { what: 'the raw client in the connections list' })
  assert.equal(mine.role, 'authenticated')
  assert.match(mine.peer, /^127\.0\.0\.1:\d+$/)
  assert.match(mine.since, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  assert.ok(mine.frames_in >= 2, `frames_in ${mine.frames_in}`)
  assert.ok(mine.frames_out >= 2, `frames_out ${mine.frames_out}`)
  assert.equal(mine.lagged_frames, 0)
  assert.deepEqual(mine.channels, [{ topic: 'realtime:conn-room', private: false, presence: true, postgres_changes: 1 }])

  // A client close, and an idle one (IDLE_TIMEOUT_MS, no heartbeats).
  c.close()
  const idle = await RawClient.connect(env.gw, { apikey: signHS256({ role: 'anon', sub: 'idle-user', exp: 4102444800 }) })
  await withTimeout(idle.closed, 60000, 'the idle socket to be closed')
  const { disconnects, count } = await until(async () => {
    const s = await admin('/api/realtime/connections')
    const ok = s.disconnects.some((d) => d.sub === 'user-7') && s.disconnects.some((d) => d.sub === 'idle-user')
    return ok ? s : null
  }, { what: 'both disconnects' })
  const closed = disconnects.find((d) => d.sub === 'user-7')
  assert.equal(closed.reason, 'client_close')
  assert.equal(closed.id, mine.id)
  assert.match(closed.ended, /Z$/)
  assert.equal(disconnects.find((d) => d.sub === 'idle-user').reason, 'idle')
  assert.equal(typeof count, 'number')
  const s = await admin('/api/realtime/status')
  assert.ok(s.counters.disconnects.client_close >= 1 && s.counters.disconnects.idle >= 1, JSON.stringify(s.counters.disconnects))
})
