// Check 1 of issue 2: Broadcast with real supabase-js 2.119.0 (vsn 2.0.0, its
// default, which sends binary kind-3 frames; and vsn 1.0.0, JSON text), plus
// the per-serializer encodings seen by raw V1/V2 subscribers.
import { describe, test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { withLog } from '../lib/gateway.mjs'
import { startTarget } from '../lib/target.mjs'
import { RawClient, encodeKind3 } from '../lib/raw.mjs'
import { sbClient, subscribe, closeClients } from '../lib/supabase.mjs'
import { until, sleep } from '../lib/util.mjs'

let gw
before(async () => {
  gw = await startTarget({ name: 'broadcast' })
})
after(async () => {
  await gw?.stop()
})
const it = (name, fn) => test(name, withLog(() => gw, fn))

/** What a broadcast listener callback receives, reduced to the protocol fields. */
function fields(m) {
  const extra = Object.keys(m).filter((k) => !['type', 'event', 'payload', 'meta'].includes(k))
  assert.deepEqual(extra, [], `unexpected keys in the broadcast callback payload: ${JSON.stringify(m)}`)
  return { type: m.type, event: m.event, payload: m.payload }
}

/** Two supabase-js clients with one channel each on `room`, recording every broadcast. */
async function pair(vsn, room, broadcast) {
  const A = sbClient(gw, { vsn })
  const B = sbClient(gw, { vsn })
  const got = { A: [], B: [] }
  const chA = A.channel(room, { config: { broadcast } }).on('broadcast', { event: '*' }, (m) => got.A.push(fields(m)))
  const chB = B.channel(room, { config: { broadcast } }).on('broadcast', { event: '*' }, (m) => got.B.push(fields(m)))
  await subscribe(chA)
  await subscribe(chB)
  return { A, B, chA, chB, got, close: () => closeClients(A, B) }
}

const msg = (event, payload) => ({ type: 'broadcast', event, payload })

for (const vsn of ['2.0.0', '1.0.0']) {
  describe(`supabase-js broadcast, vsn ${vsn}`, () => {
    it('self:false — B receives A\'s broadcast, A does not', async () => {
      const p = await pair(vsn, 'room-1', { self: false })
      try {
        assert.equal(await p.chA.send(msg('greet', { from: 'A', n: 1, s: 'é✓' })), 'ok')
        await until(() => p.got.B.length >= 1, { what: 'B to receive A\'s broadcast' })
        assert.deepEqual(p.got.B, [msg('greet', { from: 'A', n: 1, s: 'é✓' })])
        // B answers; once A has B's message, A's own (sent earlier on the same
        // fan-out path) would have arrived before it if it were echoed.
        assert.equal(await p.chB.send(msg('reply', { from: 'B' })), 'ok')
        await until(() => p.got.A.length >= 1, { what: 'A to receive B\'s broadcast' })
        await sleep(100)
        assert.deepEqual(p.got.A, [msg('reply', { from: 'B' })], 'A must not receive its own broadcast with self:false')
        assert.deepEqual(p.got.B, [msg('greet', { from: 'A', n: 1, s: 'é✓' })], 'B must not receive its own broadcast')
      } finally {
        await p.close()
      }
    })

    it('self:true — A receives its own broadcast too, exactly once', async () => {
      const p = await pair(vsn, 'room-1-self', { self: true })
      try {
        assert.equal(await p.chA.send(msg('greet', { from: 'A' })), 'ok')
        await until(() => p.got.A.length >= 1 && p.got.B.length >= 1, { what: 'A and B to receive the broadcast' })
        await sleep(150)
        assert.deepEqual(p.got.A, [msg('greet', { from: 'A' })])
        assert.deepEqual(p.got.B, [msg('greet', { from: 'A' })])
      } finally {
        await p.close()
      }
    })

    it('ack:true — send() resolves \'ok\' from the server\'s reply (not the local no-ack shortcut)', async () => {
      const p = await pair(vsn, 'room-1-ack', { self: false, ack: true })
      try {
        // With ack:true realtime-js waits for the phx_reply; without one it would
        // resolve 'timed out' after the 10 s given here (its default; a busy machine may be slow).
        const results = await Promise.all([1, 2, 3].map((n) => p.chA.send(msg('acked', { n }), { timeout: 10000 })))
        assert.deepEqual(results, ['ok', 'ok', 'ok'])
        await until(() => p.got.B.length >= 3, { what: 'B to receive the three acked broadcasts' })
        assert.deepEqual(p.got.B, [1, 2, 3].map((n) => msg('acked', { n })))
      } finally {
        await p.close()
      }
    })
  })
}

describe('broadcast encodings per subscriber serializer', () => {
  const topic = 'realtime:room-1-mix'
  const cfg = (broadcast) => ({ config: { broadcast, presence: { key: '', enabled: false }, postgres_changes: [], private: false } })

  it('supabase-js V2 send (binary kind 3) → raw V2 gets kind 4, raw V1 gets JSON; a raw V2 array → JSON text to both', async () => {
    const v1 = await RawClient.connect(gw, { vsn: '1.0.0' })
    const v2 = await RawClient.connect(gw, { vsn: '2.0.0' })
    const S = sbClient(gw)
    try {
      await v1.join(topic, cfg({ self: false, ack: false }))
      await v2.join(topic, cfg({ self: false, ack: false }))
      const ch = S.channel('room-1-mix')
      await subscribe(ch)
      assert.equal(await ch.send(msg('cursor', { x: 3, s: 'é' })), 'ok')

      const bin = await v2.next((m) => m.event === 'broadcast', { what: 'kind-4 frame on V2' })
      assert.equal(bin.kind, 'binary', `V2 subscriber must get a binary frame for a binary-origin message, got ${bin.raw}`)
      assert.equal(bin.binKind, 4)
      const t = Buffer.from(topic)
      const e = Buffer.from('cursor')
      assert.deepEqual([...bin.bytes.subarray(0, 5)], [4, t.length, e.length, 0, 1], 'kind-4 header: kind, topic, event, metadata lengths, JSON encoding')
      assert.equal(bin.topic, topic)
      assert.equal(bin.userEvent, 'cursor')
      assert.deepEqual(bin.payload, { x: 3, s: 'é' })

      const js = await v1.next((m) => m.event === 'broadcast', { what: 'JSON broadcast on V1' })
      assert.deepEqual(js.frame, { topic, event: 'broadcast', payload: msg('cursor', { x: 3, s: 'é' }), ref: null })

      // A wscat-style V2 array push: the whole map is forwarded as JSON text.
      const pub = await RawClient.connect(gw, { vsn: '2.0.0' })
      try {
        const { joinRef } = await pub.join(topic, cfg({ self: false, ack: false }))
        pub.push(topic, 'broadcast', msg('arr', { a: [1, 2] }), { joinRef })
        const t2 = await v2.next((m) => m.event === 'broadcast', { what: 'array broadcast on V2' })
        assert.deepEqual(t2.frame, [null, null, topic, 'broadcast', msg('arr', { a: [1, 2] })])
        const t1 = await v1.next((m) => m.event === 'broadcast', { what: 'array broadcast on V1' })
        assert.deepEqual(t1.frame, { topic, event: 'broadcast', payload: msg('arr', { a: [1, 2] }), ref: null })
        // ack:false → no reply to the publisher.
        await pub.expectNone((m) => m.event === 'phx_reply', 200, 'reply to an un-acked broadcast')
      } finally {
        pub.terminate()
      }
    } finally {
      v1.terminate()
      v2.terminate()
      await closeClients(S)
    }
  })

  it('raw kind-3 with ack:true → phx_reply ok with the ref from the binary header; raw-binary payloads reach V2 only', async () => {
    const v1 = await RawClient.connect(gw, { vsn: '1.0.0' })
    const v2 = await RawClient.connect(gw, { vsn: '2.0.0' })
    const pub = await RawClient.connect(gw, { vsn: '2.0.0' })
    const room = 'realtime:room-1-bin'
    try {
      await v1.join(room, cfg({ self: false, ack: false }))
      await v2.join(room, cfg({ self: false, ack: false }))
      const { joinRef } = await pub.join(room, cfg({ self: false, ack: true }))

      pub.sendBinary(encodeKind3({ joinRef, ref: '41', topic: room, event: 'json-ev', payload: { k: 'v' } }))
      const r1 = await pub.reply(room, '41')
      assert.deepEqual(r1.frame, [joinRef, '41', room, 'phx_reply', { status: 'ok', response: {} }])

      const raw = Buffer.from([0, 1, 2, 0xfe, 0xff])
      pub.sendBinary(encodeKind3({ joinRef, ref: '42', topic: room, event: 'bin-ev', payload: raw, json: false }))
      const r2 = await pub.reply(room, '42')
      assert.deepEqual(r2.frame, [joinRef, '42', room, 'phx_reply', { status: 'ok', response: {} }])

      const a = await v2.next((m) => m.event === 'broadcast' && m.userEvent === 'json-ev', { what: 'json-ev on V2' })
      assert.deepEqual(a.payload, { k: 'v' })
      const b = await v2.next((m) => m.event === 'broadcast' && m.userEvent === 'bin-ev', { what: 'bin-ev on V2' })
      assert.equal(b.encoding, 0)
      assert.deepEqual([...b.payload], [...raw])

      const j = await v1.next((m) => m.event === 'broadcast', { what: 'json-ev on V1' })
      assert.deepEqual(j.frame, { topic: room, event: 'broadcast', payload: msg('json-ev', { k: 'v' }), ref: null })
      // A raw-binary payload cannot be expressed in V1: it is dropped for V1 subscribers.
      await v1.expectNone((m) => m.event === 'broadcast', 300, 'binary-payload broadcast on a V1 socket')
    } finally {
      v1.terminate()
      v2.terminate()
      pub.terminate()
    }
  })
})
