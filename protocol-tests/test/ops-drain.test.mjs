// Drain on SIGTERM with two gateway replicas behind the real nginx (issue 11, check 2).
//
// Two gateways share one PostgreSQL; the shipped deploy/nginx/realtime.conf
// balances over both (one `server` line each). A supabase-js client, through
// nginx, subscribes to Postgres changes and a broadcast room. SIGTERM on the
// replica it landed on ("home") starts the drain: home's /readyz answers 503
// and a new upgrade to it gets 503 at once, while the client's socket keeps
// receiving changes. A second SIGTERM ends the drain delay (instead of waiting
// on the clock): home closes the socket with 1001, realtime-js reconnects
// through nginx — which skips home (503, then refused connections) — to the
// other replica, rejoins, and keeps receiving changes and broadcasts. Every
// change written is counted: each arrives exactly once, in order. Home exits 0
// once its socket is gone. The drain delay and grace are far longer than the
// test, so however slowly the machine runs the checks, the drain ends only when
// the test says so. (The delay expiring on its own: ops-health.test.mjs.)
//
// Changes committed while a client has no socket at all (between the 1001 and
// its rejoin) are not delivered, exactly as with Supabase Realtime (realtime-js
// carries no resume position; apps refetch on SUBSCRIBED): the writer pauses
// for that moment and resumes once the client is subscribed again.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, closeSbClients, waitLive } from '../lib/changes-env.mjs'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { startNginx, nginxMissing } from '../lib/nginx.mjs'
import { ANON_KEY } from '../lib/jwt.mjs'
import { sbClient, subscribe, wsOf } from '../lib/supabase.mjs'
import { until, withTimeout } from '../lib/util.mjs'
import WebSocket from 'ws'

const missing = nginxMissing()
// Far longer than the test: it ends the delay with a second SIGTERM once it has checked the drain.
const DRAIN_ENV = { DRAIN_DELAY_MS: '600000', SHUTDOWN_GRACE_MS: '660000' }

let env
let other
let ngx
const clients = []

if (missing) test.skip(`drain through nginx: ${missing}`, () => {})

before(async () => {
  if (missing) return
  env = await startChangesEnv({
    name: 'ops-drain',
    setupSql: 'create table items (id bigint generated always as identity primary key, n int not null)',
    gatewayEnv: DRAIN_ENV,
  })
  await env.db.query(`select realtime_gateway.enable('public.items')`)
  other = await startGateway({ name: 'ops-drain-b', env: { DATABASE_URL: env.dbUrl, ...DRAIN_ENV } })
  await waitLive(env.gw, 'items')
  await waitLive(other, 'items')
  ngx = await startNginx({ name: 'ops-drain-nginx', upstream: [`127.0.0.1:${env.gw.port}`, `127.0.0.1:${other.port}`] })
})

after(async () => {
  await closeSbClients(clients)
  await ngx?.stop()
  if (other?.alive) await other.stop()
  if (env) await env.stop()
})

const connections = async (gw) => (gw.alive ? gw.metric('realtime_connections_connected') : 0)

test('SIGTERM drains a replica: its client moves to the other one through nginx, no change lost', { skip: !!missing }, withLog(() => [env?.gw, other], async () => {
  const gws = [env.gw, other]
  for (const gw of gws) {
    const r = await fetch(`${gw.url}/readyz`)
    assert.equal(r.status, 200, `readyz before the drain: ${await r.text()}`)
  }

  // The client, through nginx: changes on `items` and a broadcast room, on one channel.
  const sb = sbClient({ url: ngx.url }, { reconnectAfterMs: () => 200 })
  clients.push(sb)
  const got = [] // n of every INSERT received, in arrival order
  const broadcasts = []
  const pgSubscribed = [] // one entry per "Subscribed to PostgreSQL"
  const ch = sb
    .channel('drain-room', { config: { broadcast: { self: true, ack: true } } })
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'items' }, (p) => got.push(p.new.n))
    .on('broadcast', { event: 'ping' }, (m) => broadcasts.push(m.payload.k))
    .on('system', {}, (s) => {
      if (s.extension === 'postgres_changes' && s.status === 'ok') pgSubscribed.push(Date.now())
    })
  const { waitFor } = await subscribe(ch)
  await until(() => pgSubscribed.length === 1, { what: 'Subscribed to PostgreSQL' })

  let home
  await until(async () => {
    const counts = await Promise.all(gws.map(connections))
    if (counts[0] + counts[1] !== 1) return false
    home = counts[0] === 1 ? env.gw : other
    return true
  }, { what: 'the client to be counted on exactly one replica' })
  const away = home === env.gw ? other : env.gw

  let written = 0
  /** Inserts one row and waits until the client has it (lockstep: nothing in flight afterwards). */
  const writeOne = async (what) => {
    const n = ++written
    await env.db.query('insert into items (n) values ($1)', [n])
    await until(() => got.includes(n), { what: `change ${n} (${what})` })
  }
  for (let i = 0; i < 10; i++) await writeOne('before the drain')
  assert.equal(await ch.send({ type: 'broadcast', event: 'ping', payload: { k: 'before' } }), 'ok')
  await until(() => broadcasts.includes('before'), { what: 'the broadcast before the drain' })

  // Drain begins.
  const socketClosed = new Promise((res) => wsOf(sb).once('close', (code) => res(code)))
  const exited = home.signal('SIGTERM')
  await until(async () => (await fetch(`${home.url}/readyz`)).status === 503, { what: 'home /readyz → 503' })
  const body = await (await fetch(`${home.url}/readyz`)).json()
  assert.deepEqual({ ready: body.ready, draining: body.draining }, { ready: false, draining: true })
  assert.equal((await fetch(`${home.url}/healthz`)).status, 200, 'liveness holds during the drain')
  assert.equal((await fetch(`${away.url}/readyz`)).status, 200, 'the other replica stays ready')
  assert.equal(await upgradeStatus(home.wsUrl(`/realtime/v1/websocket?apikey=${ANON_KEY}&vsn=1.0.0`)), 503, 'a new upgrade to a draining replica')

  // The draining replica still delivers to its client.
  for (let i = 0; i < 10; i++) await writeOne('during the drain, from the draining replica')
  assert.equal(await connections(home), 1, 'still on the draining replica')

  // End of the drain delay: 1001, and realtime-js reconnects through nginx to the other replica.
  home.signal('SIGTERM')
  assert.equal(await withTimeout(socketClosed, 20000, 'the 1001 close'), 1001)
  await waitFor('SUBSCRIBED', 30000)
  await until(() => pgSubscribed.length === 2, { timeoutMs: 30000, what: 'Subscribed to PostgreSQL after the move' })
  await until(async () => (await connections(away)) === 1, { what: 'the client on the other replica' })

  for (let i = 0; i < 10; i++) await writeOne('after the move')
  assert.equal(await ch.send({ type: 'broadcast', event: 'ping', payload: { k: 'after' } }), 'ok')
  const rest = await fetch(`${away.url}/api/broadcast`, {
    method: 'POST',
    headers: { apikey: ANON_KEY, 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ topic: 'drain-room', event: 'ping', payload: { k: 'rest' } }] }),
  })
  assert.equal(rest.status, 202)
  await until(() => broadcasts.includes('after') && broadcasts.includes('rest'), { what: 'broadcasts after the move' })

  // Counted: every change exactly once, in order.
  assert.deepEqual(got, Array.from({ length: written }, (_, i) => i + 1))

  // Its socket is gone, so it exits now, long before the grace ends (the bound only catches a hang).
  const exit = await withTimeout(exited, 60000, 'the drained gateway to exit')
  assert.deepEqual(exit, { code: 0, signal: null }, 'the drained gateway exits 0')
}))

/** The HTTP status a WebSocket upgrade to `url` gets (101 when it opens). */
function upgradeStatus(url) {
  return withTimeout(
    new Promise((res) => {
      const ws = new WebSocket(url)
      ws.on('error', () => {})
      ws.on('unexpected-response', (_req, r) => {
        r.resume()
        res(r.statusCode)
        ws.terminate()
      })
      ws.on('open', () => {
        res(101)
        ws.close()
      })
    }),
    20000,
    `an answer to the upgrade at ${url}`,
  )
}
