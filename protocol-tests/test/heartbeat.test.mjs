// Check 4 of issue 2: heartbeats and the idle timeout.
// - a supabase-js channel subscribed for 70 s with default heartbeats (25 s) stays
//   SUBSCRIBED on a gateway with the default 60 s idle timeout;
// - a raw socket that sends nothing is closed after the idle time (60 s default,
//   and 3 s with IDLE_TIMEOUT_MS=3000), while one that keeps sending stays open.
// The tests run concurrently, so the file takes ~70 s.
import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sbClient, subscribe, closeClients, wsOf } from '../lib/supabase.mjs'
import { until, sleep } from '../lib/util.mjs'

let gwDefault // IDLE_TIMEOUT_MS unset: the 60 s default
let gwFast // IDLE_TIMEOUT_MS=3000
before(async () => {
  ;[gwDefault, gwFast] = await Promise.all([
    startGateway({ name: 'heartbeat-default' }),
    startGateway({ name: 'heartbeat-idle3s', env: { IDLE_TIMEOUT_MS: '3000' } }),
  ])
})
after(async () => {
  await Promise.all([gwDefault?.stop(), gwFast?.stop()])
})

const HOLD_MS = 70_000

describe('heartbeat and idle timeout', { concurrency: true }, () => {
  it('supabase-js: a channel subscribed for 70 s with default heartbeats stays SUBSCRIBED', { timeout: HOLD_MS + 30_000 }, withLog(() => gwDefault, async () => {
    const beats = []
    const client = sbClient(gwDefault, { heartbeatCallback: (status) => beats.push(status) })
    const got = []
    const ch = client.channel('room-4').on('broadcast', { event: '*' }, (m) => got.push(m.payload))
    const socketEvents = []
    try {
      const { statuses } = await subscribe(ch)
      const ws = wsOf(client)
      ws.on('close', (code, reason) => socketEvents.push(`close ${code} ${reason}`))
      const t0 = Date.now()
      await sleep(HOLD_MS)
      const held = Date.now() - t0

      assert.ok(held >= HOLD_MS, `held only ${held} ms`)
      assert.deepEqual(socketEvents, [], 'the socket must not close')
      assert.equal(wsOf(client), ws, 'the client must not have reconnected')
      assert.equal(ws.readyState, 1, 'the WebSocket must still be OPEN')
      assert.deepEqual(statuses, ['SUBSCRIBED'], `channel statuses: ${statuses.join(' → ')}`)
      assert.equal(ch.state, 'joined')
      // 70 s at a 25 s interval: heartbeats at ~25 s and ~50 s, both answered.
      const ok = beats.filter((s) => s === 'ok').length
      assert.ok(ok >= 2, `expected ≥ 2 answered heartbeats, callback saw: ${beats.join(',')}`)
      assert.ok(!beats.includes('timeout') && !beats.includes('error'), `heartbeat failures: ${beats.join(',')}`)

      // And the channel is alive on the server side too.
      const r = await fetch(`${gwDefault.url}/api/broadcast/room-4/events/still-here`, {
        method: 'POST',
        headers: { apikey: client.supabaseKey, 'content-type': 'application/json' },
        body: JSON.stringify({ after: '70s' }),
      })
      assert.equal(r.status, 202)
      await until(() => got.length >= 1, { what: 'a broadcast after 70 s' })
      assert.deepEqual(got, [{ after: '70s' }])
    } finally {
      await closeClients(client)
    }
  }))

  it('raw socket sending nothing is closed after the default 60 s idle timeout', { timeout: 90_000 }, withLog(() => gwDefault, async () => {
    const c = await RawClient.connect(gwDefault, { vsn: '2.0.0' })
    try {
      const closed = await Promise.race([c.closed, sleep(75_000).then(() => null)])
      assert.ok(closed, 'a silent socket was still open after 75 s')
      // Measured from the client's 'open' event, which can only be later than the server's upgrade.
      const after = closed.at - c.openedAt
      assert.ok(after >= 58_000 && after <= 66_000, `closed after ${after} ms; expected ~60000 (code ${closed.code})`)
    } finally {
      c.terminate()
    }
  }))

  it('IDLE_TIMEOUT_MS=3000: a silent socket (even one with a joined channel) is closed after ~3 s', { timeout: 30_000 }, withLog(() => gwFast, async () => {
    const silent = await RawClient.connect(gwFast, { vsn: '2.0.0' })
    const joined = await RawClient.connect(gwFast, { vsn: '1.0.0' })
    try {
      const t1 = Date.now() // the join below is the last frame this socket sends
      await joined.join('realtime:room-4-idle', { config: {} })
      const [a, b] = await Promise.all([silent.closed, joined.closed].map((p) => Promise.race([p, sleep(10_000).then(() => null)])))
      assert.ok(a, 'the silent socket was still open after 10 s')
      assert.ok(b, 'the joined-but-silent socket was still open after 10 s')
      // Lower bounds leave 500 ms for client-side event-loop delay in noticing 'open'.
      const ta = a.at - silent.openedAt
      const tb = b.at - t1
      assert.ok(ta >= 2_500 && ta <= 5_000, `silent socket closed ${ta} ms after opening; expected ~3000`)
      assert.ok(tb >= 2_500 && tb <= 5_000, `joined socket closed ${tb} ms after its join; expected ~3000`)
      assert.ok(gwFast.alive)
    } finally {
      silent.terminate()
      joined.terminate()
    }
  }))

  it('IDLE_TIMEOUT_MS=3000: a socket heartbeating every second stays open for 8 s', { timeout: 30_000 }, withLog(() => gwFast, async () => {
    const c = await RawClient.connect(gwFast, { vsn: '2.0.0' })
    try {
      const t0 = Date.now()
      let n = 0
      while (Date.now() - t0 < 8_000) {
        const m = await c.heartbeat()
        assert.deepEqual(m.payload, { status: 'ok', response: {} })
        n++
        await sleep(1_000)
      }
      assert.ok(c.isOpen, `closed: ${JSON.stringify(c.closeInfo)}`)
      assert.ok(n >= 7, `only ${n} heartbeats answered`)
    } finally {
      c.terminate()
    }
  }))
})
