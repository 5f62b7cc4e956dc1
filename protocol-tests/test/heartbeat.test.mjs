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

  it('raw socket sending nothing is closed after the default 60 s idle timeout', { timeout: 100_000 }, withLog(() => gwDefault, async () => {
    // Lower bound from before the connect (the server's idle clock starts at its upgrade,
    // which is later), so a busy client event loop cannot make an on-time close look early;
    // the upper bound only catches a socket that is never closed.
    const connectStart = Date.now()
    const c = await RawClient.connect(gwDefault, { vsn: '2.0.0' })
    try {
      const closed = await Promise.race([c.closed, sleep(85_000).then(() => null)])
      assert.ok(closed, 'a silent socket was still open after 85 s')
      const after = closed.at - connectStart
      assert.ok(after >= 59_900, `closed after ${after} ms; expected ~60000 (code ${closed.code})`)
    } finally {
      c.terminate()
    }
  }))

  it('IDLE_TIMEOUT_MS=3000: a silent socket (even one with a joined channel) is closed after ~3 s', { timeout: 30_000 }, withLog(() => gwFast, async () => {
    // Lower bounds are taken before the last frame the server can have seen from each
    // socket (before the connect; before the join), so they hold however busy the machine
    // is; the 20 s wait only catches a socket that is never closed.
    const connectStart = Date.now()
    const silent = await RawClient.connect(gwFast, { vsn: '2.0.0' })
    const joined = await RawClient.connect(gwFast, { vsn: '1.0.0' })
    try {
      const t1 = Date.now() // the join below is the last frame this socket sends
      await joined.join('realtime:room-4-idle', { config: {} })
      const [a, b] = await Promise.all([silent.closed, joined.closed].map((p) => Promise.race([p, sleep(20_000).then(() => null)])))
      assert.ok(a, 'the silent socket was still open after 20 s')
      assert.ok(b, 'the joined-but-silent socket was still open after 20 s')
      const ta = a.at - connectStart
      const tb = b.at - t1
      assert.ok(ta >= 2_950, `silent socket closed ${ta} ms after its connect began; expected ~3000`)
      assert.ok(tb >= 2_950, `joined socket closed ${tb} ms after its join was sent; expected ~3000`)
      assert.ok(gwFast.alive)
    } finally {
      silent.terminate()
      joined.terminate()
    }
  }))

  it('IDLE_TIMEOUT_MS=3000: a socket heartbeating every second stays open across 8 heartbeats', { timeout: 30_000 }, withLog(() => gwFast, async () => {
    // Counted, not timed: 8 heartbeats a second apart span well over the 3 s timeout.
    const c = await RawClient.connect(gwFast, { vsn: '2.0.0' })
    try {
      for (let n = 0; n < 8; n++) {
        const m = await c.heartbeat()
        assert.deepEqual(m.payload, { status: 'ok', response: {} })
        await sleep(1_000)
      }
      assert.ok(c.isOpen, `closed: ${JSON.stringify(c.closeInfo)}`)
    } finally {
      c.terminate()
    }
  }))
})
