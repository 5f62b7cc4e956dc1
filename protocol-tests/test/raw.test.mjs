// Check 5 of issue 2: raw Phoenix frames, as a wscat user sends them, in V1
// (objects, also when `vsn` is absent) and V2 (arrays, binary), asserting the
// exact frames the gateway answers with.
import { describe, test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { RawClient, expectedFrame, encodeKind3 } from '../lib/raw.mjs'
import { ANON_KEY } from '../lib/jwt.mjs'

let gw
before(async () => {
  gw = await startGateway({ name: 'raw' })
})
after(async () => {
  await gw?.stop()
})

const it = (name, fn) => test(name, withLog(() => gw, fn))

/** Connects, runs `fn(client)`, always closes. */
async function using(opts, fn) {
  const c = await RawClient.connect(gw, opts)
  try {
    return await fn(c)
  } finally {
    c.terminate()
  }
}

const SERIALIZERS = [
  { label: 'V1 (vsn=1.0.0)', vsn: '1.0.0', proto: 1 },
  { label: 'V1 (no vsn parameter: the default)', vsn: null, proto: 1 },
  { label: 'V2 (vsn=2.0.0)', vsn: '2.0.0', proto: 2 },
]

const OK_EMPTY = { status: 'ok', response: {} }
const UNMATCHED = { status: 'error', response: { reason: 'unmatched topic' } }
const CONFIG = { config: { broadcast: { self: false, ack: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } }

for (const S of SERIALIZERS) {
  const F = (fields) => expectedFrame(S.proto, fields)

  describe(`raw frames, ${S.label}`, () => {
    it('heartbeat → phx_reply ok with the same ref, regardless of channels', () =>
      using({ vsn: S.vsn }, async (c) => {
        c.push('phoenix', 'heartbeat', {}, { ref: 'hb-1' })
        const m = await c.reply('phoenix', 'hb-1')
        assert.deepEqual(m.frame, F({ ref: 'hb-1', topic: 'phoenix', event: 'phx_reply', payload: OK_EMPTY }))
        assert.equal(m.kind, 'text')
      }))

    it('join → ok {postgres_changes: []}; leave → ok reply, then phx_close with ref = join_ref', () =>
      using({ vsn: S.vsn }, async (c) => {
        const topic = `realtime:raw-join-${S.proto}-${S.vsn}`
        c.push(topic, 'phx_join', CONFIG, { ref: '1', joinRef: '1' })
        const joined = await c.reply(topic, '1')
        assert.deepEqual(
          joined.frame,
          F({ join_ref: '1', ref: '1', topic, event: 'phx_reply', payload: { status: 'ok', response: { postgres_changes: [] } } }),
        )
        // Presence is disabled in this join: no presence_state may follow.
        await c.expectNone((m) => m.event === 'presence_state', 200, 'presence_state for a join without presence')

        c.push(topic, 'phx_leave', {}, { ref: '2', joinRef: '1' })
        const left = await c.reply(topic, '2')
        const closed = await c.next((m) => m.event === 'phx_close', { what: 'phx_close' })
        assert.deepEqual(left.frame, F({ join_ref: '1', ref: '2', topic, event: 'phx_reply', payload: OK_EMPTY }))
        assert.deepEqual(closed.frame, F({ join_ref: '1', ref: '1', topic, event: 'phx_close', payload: {} }))
        assert.ok(c.log.indexOf(left) < c.log.indexOf(closed), 'the leave reply must precede phx_close')

        // The channel is gone: a push to it is now an unmatched topic.
        c.push(topic, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: '3', joinRef: '1' })
        const after = await c.reply(topic, '3')
        assert.deepEqual(after.frame, F({ join_ref: '1', ref: '3', topic, event: 'phx_reply', payload: UNMATCHED }))
        assert.deepEqual(c.inbox, [], `no other frames expected, got ${c.dumpInbox()}`)
      }))

    it('join with presence enabled → ok reply, then presence_state {} carrying the join_ref', () =>
      using({ vsn: S.vsn }, async (c) => {
        const topic = `realtime:raw-presence-${S.proto}-${S.vsn}`
        const payload = { config: { broadcast: { self: false, ack: false }, presence: { key: 'k', enabled: true }, postgres_changes: [], private: false } }
        c.push(topic, 'phx_join', payload, { ref: '7', joinRef: '7' })
        const reply = await c.reply(topic, '7')
        const state = await c.next((m) => m.event === 'presence_state', { what: 'presence_state' })
        assert.deepEqual(reply.frame, F({ join_ref: '7', ref: '7', topic, event: 'phx_reply', payload: { status: 'ok', response: { postgres_changes: [] } } }))
        assert.deepEqual(state.frame, F({ join_ref: '7', ref: null, topic, event: 'presence_state', payload: {} }))
        assert.ok(c.log.indexOf(reply) < c.log.indexOf(state), 'presence_state must follow the join reply')
      }))

    it('push to a topic not joined, and a join outside realtime:* → unmatched topic', () =>
      using({ vsn: S.vsn }, async (c) => {
        c.push('realtime:never-joined', 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: 'u1' })
        const m1 = await c.reply('realtime:never-joined', 'u1')
        assert.deepEqual(m1.frame, F({ ref: 'u1', topic: 'realtime:never-joined', event: 'phx_reply', payload: UNMATCHED }))

        c.push('room-without-prefix', 'phx_join', CONFIG, { ref: 'u2', joinRef: 'u2' })
        const m2 = await c.reply('room-without-prefix', 'u2')
        assert.deepEqual(m2.frame, F({ join_ref: 'u2', ref: 'u2', topic: 'room-without-prefix', event: 'phx_reply', payload: UNMATCHED }))

        // phx_leave for a topic that is not joined is answered ok (Phoenix behaviour).
        c.push('realtime:never-joined', 'phx_leave', {}, { ref: 'u3' })
        const m3 = await c.reply('realtime:never-joined', 'u3')
        assert.deepEqual(m3.frame, F({ ref: 'u3', topic: 'realtime:never-joined', event: 'phx_reply', payload: OK_EMPTY }))
      }))

    it('a second join on a joined topic: phx_close for the old join_ref, then the new reply; one subscription left', () =>
      using({ vsn: S.vsn }, async (c) => {
        const topic = `realtime:raw-rejoin-${S.proto}-${S.vsn}`
        await c.join(topic, CONFIG, { joinRef: '1' })
        const selfCfg = { config: { ...CONFIG.config, broadcast: { self: true, ack: false } } }
        c.push(topic, 'phx_join', selfCfg, { ref: '3', joinRef: '3' })
        const reply = await c.reply(topic, '3')
        const closeOld = c.log.find((m) => m.event === 'phx_close')
        assert.ok(closeOld, `phx_close for the old join expected; frames: ${c.log.map((m) => m.raw).join(' ')}`)
        assert.deepEqual(closeOld.frame, F({ join_ref: '1', ref: '1', topic, event: 'phx_close', payload: {} }))
        assert.ok(c.log.indexOf(closeOld) < c.log.indexOf(reply), 'phx_close(old) must precede the new join reply')
        assert.deepEqual(reply.frame, F({ join_ref: '3', ref: '3', topic, event: 'phx_reply', payload: { status: 'ok', response: { postgres_changes: [] } } }))

        // Only the new subscription exists: a self broadcast comes back exactly once.
        c.push(topic, 'broadcast', { type: 'broadcast', event: 'once', payload: { n: 1 } }, { ref: '4', joinRef: '3' })
        await c.next((m) => m.event === 'broadcast', { what: 'own broadcast' })
        await c.expectNone((m) => m.event === 'broadcast', 300, 'second copy of the broadcast')
      }))

    it('malformed JSON and wrongly shaped frames are dropped; the socket stays open and answers heartbeats', () =>
      using({ vsn: S.vsn }, async (c) => {
        const garbage = [
          '{"topic":',
          'not json at all',
          '',
          'null',
          '42',
          '"a string"',
          '{"topic":1,"event":{},"payload":[],"ref":"mal-0"}',
          '[1,2',
          '[null,"mal-1","phoenix",42,{}]',
          S.proto === 2
            ? '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"mal-2"}' // an object is not a V2 frame
            : '[null,"mal-2","phoenix","heartbeat",{}]', // an array is not a V1 frame
          '\u0000\u0001\u0002',
        ]
        for (const g of garbage) c.sendText(g)
        const hb = await c.heartbeat()
        assert.equal(hb.payload.status, 'ok')
        assert.ok(c.isOpen, 'socket must stay open')
        assert.equal(c.log.length, 1, `only the heartbeat reply was expected, got ${c.log.map((m) => m.raw).join(' | ')}`)
        // And it still works for channels.
        const { reply } = await c.join(`realtime:after-garbage-${S.proto}-${S.vsn}`, CONFIG)
        assert.equal(reply.payload.status, 'ok')
      }))

    it('binary garbage is dropped; the socket stays open and answers heartbeats', () =>
      using({ vsn: S.vsn }, async (c) => {
        const bins = [
          Buffer.alloc(0),
          Buffer.from([0xff, 0x00, 0x13, 0x37]),
          Buffer.from([3]), // kind 3 with no header
          Buffer.from([3, 5, 5, 60, 10, 0, 1, 0x41]), // kind 3, lengths beyond the frame
          Buffer.from([0, 1, 1, 7, 9, 0x31, 0x32, ...Buffer.from('phoenixheartbeat'), 0x7b, 0x7d]), // kind 0
          Buffer.from([4, 1, 1, 0, 1, 0x61, 0x62, 0x7b, 0x7d]), // kind 4 is server → client only
          encodeKind3({ joinRef: '1', ref: '2', topic: 'realtime:x', event: 'e', payload: {} }).subarray(0, 12),
          randomBytes(1000),
        ]
        for (const b of bins) c.sendBinary(b)
        const hb = await c.heartbeat()
        assert.equal(hb.payload.status, 'ok')
        assert.ok(c.isOpen, 'socket must stay open')
        // A kind-3 push to a topic this socket did not join may be answered with
        // `unmatched topic`; nothing else may come back.
        const others = c.log.filter((m) => m !== hb && !(m.event === 'phx_reply' && m.payload?.response?.reason === 'unmatched topic'))
        assert.deepEqual(others.map((m) => m.raw ?? m.bytes.toString('hex')), [])
      }))

    it('unknown events on a joined topic are ignored (no reply, socket open)', () =>
      using({ vsn: S.vsn }, async (c) => {
        const topic = `realtime:raw-unknown-${S.proto}-${S.vsn}`
        const { joinRef } = await c.join(topic, CONFIG)
        c.push(topic, 'foo', { a: 1 }, { ref: 'x1', joinRef })
        c.push(topic, 'presence_whatever', {}, { ref: 'x2', joinRef })
        await c.heartbeat()
        assert.deepEqual(c.inbox, [], `no frames expected, got ${c.dumpInbox()}`)
        assert.ok(c.isOpen)
      }))
  })
}

describe('raw frames, connection level', () => {
  it('both WebSocket paths serve the protocol; unknown query parameters are tolerated', async () => {
    for (const path of ['/realtime/v1/websocket', '/socket/websocket']) {
      await using({ vsn: '2.0.0', path, query: { log_level: 'info', foo: 'bar' } }, async (c) => {
        c.push('phoenix', 'heartbeat', {}, { ref: '9' })
        const m = await c.reply('phoenix', '9')
        assert.deepEqual(m.frame, [null, '9', 'phoenix', 'phx_reply', OK_EMPTY], path)
      })
    }
  })

  it('WebSocket ping → pong with the same data', () =>
    using({ vsn: '2.0.0' }, async (c) => {
      const pong = new Promise((res) => c.ws.once('pong', (d) => res(d.toString())))
      c.ws.ping(Buffer.from('are-you-there'))
      const data = await Promise.race([pong, new Promise((_, rej) => setTimeout(() => rej(new Error('no pong')), 3000))])
      assert.equal(data, 'are-you-there')
    }))

  it('V2 ref / join_ref: a push with join_ref null to a joined topic is accepted', () =>
    using({ vsn: '2.0.0' }, async (c) => {
      const topic = 'realtime:raw-null-join-ref'
      await c.join(topic, { config: { broadcast: { self: true, ack: true }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } })
      c.sendText(JSON.stringify([null, 'n1', topic, 'broadcast', { type: 'broadcast', event: 'e', payload: { ok: 1 } }]))
      const reply = await c.reply(topic, 'n1')
      assert.deepEqual(reply.payload, OK_EMPTY)
      const b = await c.next((m) => m.event === 'broadcast', { what: 'own broadcast' })
      assert.deepEqual(b.frame, [null, null, topic, 'broadcast', { type: 'broadcast', event: 'e', payload: { ok: 1 } }])
    }))
})

describe('frame size limit (MAX_FRAME_SIZE, default 5000000)', () => {
  const padded = (bytes, ref) => {
    const head = JSON.stringify({ topic: 'phoenix', event: 'heartbeat', payload: { pad: '' }, ref })
    return head.replace('"pad":""', `"pad":"${'x'.repeat(bytes - head.length)}"`)
  }

  it('a 4.9 MB text frame is accepted', () =>
    using({ vsn: '1.0.0' }, async (c) => {
      const frame = padded(4_900_000, 'big-ok')
      assert.equal(frame.length, 4_900_000)
      c.sendText(frame)
      const m = await c.reply('phoenix', 'big-ok', { timeoutMs: 30000 })
      assert.deepEqual(m.payload, OK_EMPTY)
    }))

  for (const kind of ['text', 'binary', 'fragmented text']) {
    it(`a ${kind} message over 5 MB closes that socket cleanly (1009 or TCP close); others keep working`, async () => {
      const bystander = await RawClient.connect(gw, { vsn: '2.0.0' })
      try {
        await using({ vsn: '1.0.0' }, async (c) => {
          if (kind === 'text') c.sendText(padded(5_100_000, 'too-big'))
          else if (kind === 'binary') c.sendBinary(randomBytes(5_100_000))
          else {
            // Three 2 MB fragments: each under the limit, the message over it.
            const part = Buffer.alloc(2_000_000, 0x61)
            c.ws.send(part, { binary: false, fin: false })
            c.ws.send(part, { binary: false, fin: false })
            c.ws.send(part, { binary: false, fin: true })
          }
          const closed = await Promise.race([c.closed, new Promise((res) => setTimeout(() => res(null), 10000))])
          assert.ok(closed, 'the socket was not closed within 10 s')
          assert.ok([1009, 1006].includes(closed.code), `close code ${closed.code} (${closed.reason}); expected 1009 or an abrupt TCP close`)
          assert.equal(c.log.filter((m) => m.event === 'phx_reply').length, 0, 'the oversized heartbeat must not be answered')
        })
        // The gateway is still up: the bystander and a brand-new socket both work.
        assert.deepEqual((await bystander.heartbeat()).payload, OK_EMPTY)
        await using({ vsn: '2.0.0' }, async (c) => assert.deepEqual((await c.heartbeat()).payload, OK_EMPTY))
        assert.ok(gw.alive)
      } finally {
        bystander.terminate()
      }
    })
  }

  it('MAX_FRAME_SIZE is honoured (2000: 1900 bytes accepted, 2100 bytes close)', async () => {
    const small = await startGateway({ name: 'raw-small-frames', env: { MAX_FRAME_SIZE: '2000' } })
    try {
      await withLog(() => small, async () => {
        const c = await RawClient.connect(small, { vsn: '1.0.0' })
        c.sendText(padded(1900, 'p1900'))
        assert.deepEqual((await c.reply('phoenix', 'p1900')).payload, OK_EMPTY)
        c.sendText(padded(2100, 'p2100'))
        const closed = await Promise.race([c.closed, new Promise((res) => setTimeout(() => res(null), 5000))])
        assert.ok(closed, 'not closed within 5 s')
        assert.ok([1009, 1006].includes(closed.code), `close code ${closed.code}`)
        assert.equal(c.log.filter((m) => m.ref === 'p2100').length, 0)
      })()
    } finally {
      await small.stop()
    }
  })
})

// Keep ANON_KEY referenced: the raw clients send it as `apikey` (see lib/raw.mjs).
void ANON_KEY
