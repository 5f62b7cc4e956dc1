// The shipped reverse-proxy config (deploy/nginx/realtime.conf) in a real
// nginx, in front of the real gateway: supabase-js 2.119.0 pointed at nginx's
// URL joins, broadcasts between two clients, sends over REST (httpSend) and
// heartbeats; raw clients check both WebSocket paths; REST limits and the
// denied admin paths are checked; a gateway shutdown reaches clients as 1001.
//
// nginx comes from /usr/sbin/nginx (scripts/install-deps.sh installs it); if
// it is absent the whole file is skipped with the reason.
import { describe, test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { startNginx, nginxMissing } from '../lib/nginx.mjs'
import { RawClient } from '../lib/raw.mjs'
import { ANON_KEY } from '../lib/jwt.mjs'
import { sbClient, subscribe, closeClients, wsOf } from '../lib/supabase.mjs'
import { until, sleep, withTimeout } from '../lib/util.mjs'

const missing = nginxMissing()

/** supabase-js pointed at nginx (sbClient only reads `.url`). */
const viaNginx = (ngx, realtime = {}) => sbClient({ url: ngx.url }, realtime)

const msg = (event, payload) => ({ type: 'broadcast', event, payload })

if (missing) {
  // Counted as a skipped test, with the reason, instead of silently passing.
  test.skip(`nginx reverse proxy tests (deploy/nginx/realtime.conf): ${missing}`, () => {})
}

describe('through nginx with deploy/nginx/realtime.conf', { skip: !!missing }, () => {
  let gw
  let ngx
  before(async () => {
    gw = await startGateway({ name: 'nginx-upstream', env: { EMBEDDED_POSTGRES: 'off' } })
    ngx = await startNginx({ upstream: `127.0.0.1:${gw.port}` })
  })
  after(async () => {
    await ngx?.stop()
    await gw?.stop()
  })
  const it = (name, fn) => test(name, withLog(() => gw, withNginxLog(() => ngx, fn)))

  it('GET /healthz is proxied (200, Success, answered by nginx)', async () => {
    const r = await fetch(`${ngx.url}/healthz`)
    assert.equal(r.status, 200)
    assert.match(r.headers.get('server') ?? '', /^nginx/)
    assert.deepEqual(await r.json(), { message: 'Success' })
  })

  for (const vsn of ['2.0.0', '1.0.0']) {
    it(`supabase-js (vsn ${vsn}): two clients join via nginx and broadcast to each other`, async () => {
      const A = viaNginx(ngx, { vsn })
      const B = viaNginx(ngx, { vsn })
      try {
        assert.ok(A.realtime.endpointURL().startsWith(`ws://127.0.0.1:${ngx.port}/realtime/v1/websocket`), A.realtime.endpointURL())
        const got = { A: [], B: [] }
        const room = `nginx-room-${vsn}`
        const chA = A.channel(room, { config: { broadcast: { self: false, ack: true } } }).on('broadcast', { event: '*' }, (m) =>
          got.A.push({ type: m.type, event: m.event, payload: m.payload }),
        )
        const chB = B.channel(room, { config: { broadcast: { self: false, ack: true } } }).on('broadcast', { event: '*' }, (m) =>
          got.B.push({ type: m.type, event: m.event, payload: m.payload }),
        )
        await subscribe(chA)
        await subscribe(chB)
        assert.equal(await chA.send(msg('greet', { from: 'A', s: 'é✓' })), 'ok')
        await until(() => got.B.length >= 1, { what: "B to receive A's broadcast through nginx" })
        assert.equal(await chB.send(msg('reply', { from: 'B' })), 'ok')
        await until(() => got.A.length >= 1, { what: "A to receive B's broadcast through nginx" })
        await sleep(100)
        assert.deepEqual(got.B, [msg('greet', { from: 'A', s: 'é✓' })])
        assert.deepEqual(got.A, [msg('reply', { from: 'B' })])
      } finally {
        await closeClients(A, B)
      }
    })
  }

  it('supabase-js httpSend through nginx answers 202 and reaches a subscriber', async () => {
    const S = viaNginx(ngx)
    const R = viaNginx(ngx)
    try {
      const got = []
      const chR = R.channel('nginx-http').on('broadcast', { event: 'rest' }, (m) => got.push(m.payload))
      await subscribe(chR)
      const chS = S.channel('nginx-http')
      assert.ok(chS.broadcastEndpointURL.startsWith(`${ngx.url}/realtime/v1/api/broadcast`), chS.broadcastEndpointURL)
      // httpSend resolves {success: true} only on HTTP 202.
      assert.deepEqual(await chS.httpSend('rest', { via: 'nginx', n: 1 }), { success: true })
      await until(() => got.length >= 1, { what: 'the REST broadcast through nginx' })
      assert.deepEqual(got, [{ via: 'nginx', n: 1 }])
    } finally {
      await closeClients(S, R)
    }
  })

  it('supabase-js heartbeats round-trip through nginx', async () => {
    const beats = []
    // realtime-js gives each heartbeat reply one interval before it calls it a timeout
    // and reconnects: 3 s leaves room for a busy machine, and 2 answered beats are enough.
    const C = viaNginx(ngx, { heartbeatIntervalMs: 3000, heartbeatCallback: (status) => beats.push(status) })
    try {
      const ch = C.channel('nginx-heartbeat')
      const { statuses } = await subscribe(ch)
      const ws = wsOf(C)
      await until(() => beats.filter((s) => s === 'ok').length >= 2, { timeoutMs: 60000, what: `2 answered heartbeats (saw ${beats.join(',')})` })
      assert.ok(!beats.includes('timeout') && !beats.includes('error'), `heartbeat failures: ${beats.join(',')}`)
      assert.equal(wsOf(C), ws, 'the client must not have reconnected')
      assert.deepEqual(statuses, ['SUBSCRIBED'])
    } finally {
      await closeClients(C)
    }
  })

  for (const path of ['/socket/websocket', '/realtime/v1/websocket']) {
    it(`raw V1 client on ${path} via nginx: join and heartbeat reply`, async () => {
      const c = await RawClient.connect(ngx, { vsn: '1.0.0', path })
      try {
        const { reply } = await c.join('realtime:nginx-raw', { config: {} })
        assert.equal(reply.payload.status, 'ok', reply.raw)
        const hb = await c.heartbeat()
        assert.deepEqual(hb.frame, { topic: 'phoenix', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: hb.ref })
      } finally {
        c.close()
      }
    })
  }

  it('REST broadcast bodies up to the gateway limit pass nginx (client_max_body_size ≥ MAX_BODY_SIZE)', async () => {
    const R = viaNginx(ngx)
    try {
      const got = []
      await subscribe(R.channel('nginx-big').on('broadcast', { event: 'big' }, (m) => got.push(m.payload)))
      // 4.5 MB of JSON: over nginx's 1 MB default, under the gateway's 5,000,000 bytes.
      const blob = 'x'.repeat(4_500_000)
      const r = await fetch(`${ngx.url}/api/broadcast`, {
        method: 'POST',
        headers: { apikey: ANON_KEY, 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ topic: 'nginx-big', event: 'big', payload: { blob } }] }),
      })
      assert.equal(r.status, 202, await r.text())
      await until(() => got.length >= 1, { timeoutMs: 10000, what: 'the 4.5 MB broadcast' })
      assert.equal(got[0].blob.length, blob.length)
    } finally {
      await closeClients(R)
    }
  })

  it('the tables admin API and /metrics are not exposed through nginx', async () => {
    for (const path of ['/api/realtime/tables', '/realtime/v1/api/realtime/tables', '/realtime/v1/api/realtime/tables/public.messages']) {
      const r = await fetch(`${ngx.url}${path}`, { headers: { apikey: ANON_KEY } })
      await r.arrayBuffer()
      assert.equal(r.status, 403, `${path} through nginx`)
    }
    const m = await fetch(`${ngx.url}/metrics`)
    await m.arrayBuffer()
    assert.equal(m.status, 404)
    // ... while the gateway itself still serves them.
    const direct = await fetch(`${gw.url}/metrics`)
    await direct.arrayBuffer()
    assert.equal(direct.status, 200)
  })

})

describe('through nginx: gateway shutdown', { skip: !!missing }, () => {
  test('SIGTERM on the gateway reaches a supabase-js socket behind nginx as close 1001', async () => {
    const gw = await startGateway({ name: 'nginx-drain', env: { EMBEDDED_POSTGRES: 'off', SHUTDOWN_GRACE_MS: '3000' } })
    let ngx
    let C
    try {
      ngx = await startNginx({ name: 'nginx-drain', upstream: `127.0.0.1:${gw.port}` })
      C = viaNginx(ngx)
      await subscribe(C.channel('nginx-drain'))
      const closed = new Promise((res) => wsOf(C).once('close', (code, reason) => res({ code, reason: reason.toString() })))
      // SIGTERM without stop()'s SIGKILL after 5 s: the exit must be the gateway's own
      // (code 0); the 60 s bound only catches a gateway that never exits.
      const exit = await withTimeout(gw.signal('SIGTERM'), 60000, 'the gateway to exit')
      assert.deepEqual(exit, { code: 0, signal: null }, `gateway exit ${JSON.stringify(exit)}`)
      const c = await withTimeout(closed, 20000, 'the socket behind nginx to close')
      assert.equal(c.code, 1001, `close code through nginx: ${JSON.stringify(c)}`)
    } catch (e) {
      console.error(`\n----- gateway log -----\n${gw.logTail()}\n----- nginx log -----\n${ngx?.logTail() ?? '(not started)'}`)
      throw e
    } finally {
      await closeClients(C)
      await ngx?.stop()
      if (gw.alive) await gw.stop()
    }
  })
})

/** Like withLog, for nginx: prints the tail of its log when the test fails. */
function withNginxLog(getNginx, fn) {
  return async (t) => {
    try {
      return await fn(t)
    } catch (e) {
      const ngx = getNginx()
      if (ngx) console.error(`\n----- tail of nginx log ${ngx.logPath} -----\n${ngx.logTail()}\n----- end of log -----`)
      throw e
    }
  }
}
