// Issue 10: hostile input. Every case asserts the precise outcome for the
// attacker (reply text, close code, or a drop with the socket still answering
// heartbeats) and counts exactly what a bystander on the same topic receives
// (`arena().settle()` makes the count exact: the attacker's frames are all
// handled, then a marker from a control client closes the count). The gateway
// stays up and its memory stays under a ceiling throughout.
//
// Cases run concurrently (one gateway per configuration), so the file's wall
// time is that of its slowest case.
import { describe, test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { encodeKind3, expectedFrame } from '../lib/raw.mjs'
import { ANON_KEY, JWT_SECRET, signHS256 } from '../lib/jwt.mjs'
import { sbClient, subscribe, closeClients } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'
import {
  CFG,
  ACK,
  PRESENCE,
  arena,
  connect,
  closeAll,
  withClient,
  refusedUpgrade,
  tcpConnect,
  closedOf,
  fdLimit,
  metricWhere,
  userEvent,
  byteSocket,
  clientFrame,
} from '../lib/hostile.mjs'

const headers = (extra = {}) => ({ apikey: ANON_KEY, authorization: `Bearer ${ANON_KEY}`, 'content-type': 'application/json', ...extra })
const b64url = (v) => Buffer.from(JSON.stringify(v)).toString('base64url')
const NOT_OBJECT = { status: 'error', response: { reason: 'Broadcast payload must be a JSON object' } }
const OK = { status: 'ok', response: {} }
const now = () => Math.floor(Date.now() / 1000)

// RSS ceiling (KiB) of every gateway over the whole file: 5 MB frames, a
// 10k-message batch, 10k joins (main gateway) and 10k half-open TCP connections
// (their own gateway) pass through them. Measured peaks ~100 MiB (debug build);
// an unbounded queue or a kept copy per join or per frame would pass this quickly.
const RSS_CEILING_KIB = 256 * 1024

let gw // defaults, with short header/write timeouts for slowloris and stalled writers
let gwLimits // small per-client limits
let gwNoChan // NO_CHANNEL_TIMEOUT_IN_MS
let gwUsers // TENANT_MAX_CONCURRENT_USERS=2
let gwPerUser // MAX_CONNECTIONS_PER_USER=2
let gwJoinRate // TENANT_MAX_JOINS_PER_SECOND=1
let gwEvents // TENANT_MAX_EVENTS_PER_SECOND=5000, MAX_PAYLOAD_SIZE_IN_KB=3000
let gwWriter // dedicated: the never-reading publisher (its connection gauge is the signal)
let gwLazy // dedicated: the never-reading subscriber
let gwLoops // dedicated: join/leave loops (its channel gauge is the signal)
let gwSlow // dedicated: slowloris (a short header timeout)
let gwFlood // dedicated: 10k half-open connections (a short header timeout)
const peakRss = new Map()
let rssTimer
const all = () => [gw, gwLimits, gwNoChan, gwUsers, gwPerUser, gwJoinRate, gwEvents, gwWriter, gwLazy, gwLoops, gwSlow, gwFlood]

before(async () => {
  ;[gw, gwLimits, gwNoChan, gwUsers, gwPerUser, gwJoinRate, gwEvents, gwWriter, gwLazy, gwLoops, gwSlow, gwFlood] = await Promise.all([
    startGateway({ name: 'hostile' }),
    startGateway({
      name: 'hostile-limits',
      env: { TENANT_MAX_CHANNELS_PER_CLIENT: 3, CLIENT_MAX_EVENTS_PER_SECOND: 3, MAX_PAYLOAD_SIZE_IN_KB: 1, MAX_POSTGRES_CHANGES_PER_JOIN: 2 },
    }),
    startGateway({ name: 'hostile-nochan', env: { NO_CHANNEL_TIMEOUT_IN_MS: 1500 } }),
    startGateway({ name: 'hostile-users', env: { TENANT_MAX_CONCURRENT_USERS: 2 } }),
    startGateway({ name: 'hostile-peruser', env: { MAX_CONNECTIONS_PER_USER: 2 } }),
    startGateway({ name: 'hostile-joinrate', env: { TENANT_MAX_JOINS_PER_SECOND: 1 } }),
    startGateway({ name: 'hostile-events', env: { TENANT_MAX_EVENTS_PER_SECOND: 5000, MAX_PAYLOAD_SIZE_IN_KB: 3000 } }),
    startGateway({ name: 'hostile-writer', env: { WRITE_TIMEOUT_MS: 2000, CLIENT_MAX_EVENTS_PER_SECOND: 1_000_000 } }),
    startGateway({ name: 'hostile-lazy', env: { WRITE_TIMEOUT_MS: 3000 } }),
    startGateway({ name: 'hostile-loops' }),
    startGateway({ name: 'hostile-slow', env: { HEADER_READ_TIMEOUT_MS: 3000 } }),
    startGateway({ name: 'hostile-flood', env: { HEADER_READ_TIMEOUT_MS: 3000 } }),
  ])
  const sample = () => {
    for (const g of all()) {
      try {
        peakRss.set(g.name, Math.max(peakRss.get(g.name) ?? 0, g.rssKiB()))
      } catch {}
    }
  }
  sample()
  rssTimer = setInterval(sample, 50)
})

after(async () => {
  closeAll()
  clearInterval(rssTimer)
  await Promise.all(all().map((g) => g?.stop()))
})

// The timeout only catches hangs (cases take seconds; a loaded machine may stretch them).
const it = (name, fn, opts = {}) => test(name, { timeout: 180_000, ...opts }, withLog(all, fn))

describe('hostile input', { concurrency: true }, () => {
  // ------------------------------------------------------------ text frames

  it('invalid JSON text frames are dropped; the socket answers heartbeats; the bystander gets nothing', async () => {
    const a = await arena(gw, 'badjson')
    await withClient(gw, {}, async (x) => {
      await x.join(a.topic, CFG)
      const bad = ['{', '[null,"1",', 'nul', '[1,2,3,4,5', '"unterminated', '[null,"1","t","e",{"a":tru}]', '{"a":1}}', '\u0000', ' ', '[]]']
      for (const t of bad) x.sendText(t)
      x.sendText(`[null,"2","${a.topic}","broadcast",{"type":"broadcast","event":"e","payload":{"x":1}}` /* unclosed */)
      assert.deepEqual(await a.settle(x), [])
      const answered = x.log.filter((m) => userEvent(m) !== '__marker__').map((m) => [m.topic, m.event])
      assert.deepEqual(answered, [[a.topic, 'phx_reply'], ['phoenix', 'phx_reply']], 'only the join and heartbeat replies')
    })
    a.close()
  })

  it('invalid UTF-8 inside a text frame is dropped (JSON must be UTF-8)', async () => {
    const a = await arena(gw, 'utf8')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const head = Buffer.from(`["${joinRef}","9","${a.topic}","broadcast",{"type":"broadcast","event":"e","payload":{"s":"`)
      x.ws.send(Buffer.concat([head, Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('"}}]')]), { binary: false })
      x.ws.send(Buffer.from([0xc0, 0xaf, 0x5b, 0x5d]), { binary: false })
      assert.deepEqual(await a.settle(x), [])
      assert.equal(x.log.find((m) => m.ref === '9'), undefined, 'no reply for a dropped frame')
    })
    a.close()
  })

  for (const proto of [1, 2]) {
    it(`wrong types in every field of a V${proto} frame are dropped`, async () => {
      const a = await arena(gw, `types-v${proto}`)
      await withClient(gw, { vsn: proto === 2 ? '2.0.0' : '1.0.0' }, async (x) => {
        await x.join(a.topic, CFG)
        const good = { type: 'broadcast', event: 'e', payload: { n: 1 } }
        const frames =
          proto === 2
            ? [
                [null, '1', 5, 'broadcast', good], // topic
                [null, '1', null, 'broadcast', good],
                [null, '1', a.topic, 7, good], // event
                [null, '1', a.topic, null, good],
                [null, '1', a.topic, ['broadcast'], good],
                [null, { r: 1 }, a.topic, 'broadcast', good], // ref
                [null, 1.5, a.topic, 'broadcast', good],
                [true, '1', a.topic, 'broadcast', good], // join_ref
                [[1], '1', a.topic, 'broadcast', good],
                [null, '1', a.topic, 'broadcast'], // too short
                { topic: a.topic, event: 'broadcast', payload: good, ref: '1' }, // object on V2
              ]
            : [
                { topic: 5, event: 'broadcast', payload: good, ref: '1' },
                { topic: a.topic, event: 7, payload: good, ref: '1' },
                { topic: a.topic, event: 'broadcast', payload: good, ref: { r: 1 } },
                { topic: a.topic, event: 'broadcast', payload: good, ref: '1', join_ref: true },
                { topic: a.topic, event: 'broadcast', payload: good }, // no ref
                { topic: a.topic, payload: good, ref: '1' }, // no event
                { event: 'broadcast', payload: good, ref: '1' }, // no topic
                { topic: a.topic, event: 'broadcast', ref: '1' }, // no payload
                [null, '1', a.topic, 'broadcast', good], // array on V1
              ]
        for (const f of frames) x.sendText(JSON.stringify(f))
        assert.deepEqual(await a.settle(x), [])
        assert.deepEqual(x.log.filter((m) => m.ref === '1'), [], 'no frame may be answered')
      })
      a.close()
    })
  }

  it('a join whose payload is not an object is refused (InvalidJoinPayload), nothing subscribed', async () => {
    const a = await arena(gw, 'joinpayload')
    await withClient(gw, {}, async (x) => {
      const reason = 'InvalidJoinPayload: The join payload must be a JSON object'
      for (const [i, p] of ['just a string', 42, [CFG], null, true, 1.5].entries()) {
        x.push(a.topic, 'phx_join', p, { ref: `j${i}`, joinRef: `j${i}` })
        const r = await x.reply(a.topic, `j${i}`)
        assert.deepEqual(r.frame, expectedFrame(2, { join_ref: `j${i}`, ref: `j${i}`, topic: a.topic, event: 'phx_reply', payload: { status: 'error', response: { reason } } }))
      }
      // Not joined: a push is an unmatched topic, and nothing reaches the bystander.
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: 'b1', joinRef: 'j0' })
      assert.deepEqual((await x.reply(a.topic, 'b1')).payload, { status: 'error', response: { reason: 'unmatched topic' } })
      assert.deepEqual(await a.settle(x), [])
    })
    a.close()
  })

  it('config fields of the wrong type fall back to defaults (upstream changeset): joined, broadcasts relayed', async () => {
    const a = await arena(gw, 'configtypes')
    await withClient(gw, {}, async (x) => {
      const payloads = [
        { config: 'x' },
        { config: { broadcast: 5, presence: 'x', postgres_changes: { a: 1 }, private: 'maybe' } },
        { config: { broadcast: { self: 'yes', ack: [] }, presence: { key: { k: 1 }, enabled: 'nope' } } },
      ]
      for (const [i, p] of payloads.entries()) {
        const { reply } = await x.join(a.topic, p, { joinRef: `c${i}` })
        assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } }, JSON.stringify(p))
      }
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'ok-after-odd-config', payload: { n: 1 } }, { joinRef: 'c2' })
      const got = await a.settle(x)
      assert.deepEqual(got.map(userEvent), ['ok-after-odd-config'])
    })
    a.close()
  })

  for (const ack of [true, false]) {
    it(`broadcasts whose payload is not an object are never relayed (ack ${ack}: ${ack ? 'error reply' : 'no reply'})`, async () => {
      const a = await arena(gw, `notobject-${ack}`)
      await withClient(gw, {}, async (x) => {
        const { joinRef } = await x.join(a.topic, ack ? ACK : CFG)
        const bad = [null, 5, 'text', [1, 2], true, -0.5]
        for (const [i, p] of bad.entries()) x.push(a.topic, 'broadcast', p, { ref: `n${i}`, joinRef })
        x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'good', payload: {} }, { ref: 'g', joinRef })
        const got = await a.settle(x)
        assert.deepEqual(got.map(userEvent), ['good'], 'only the object payload is relayed')
        for (const i of bad.keys()) {
          const r = x.log.find((m) => m.ref === `n${i}`)
          if (ack) assert.deepEqual(r?.payload, NOT_OBJECT, `reply to ${JSON.stringify(bad[i])}`)
          else assert.equal(r, undefined, 'no reply without ack')
        }
      })
      a.close()
    })
  }

  it('presence messages that are not objects: error reply; a non-map track payload: upstream reason; no diff reaches anyone', async () => {
    const a = await arena(gw, 'presencetypes', { bystanderJoin: PRESENCE })
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, PRESENCE)
      for (const [i, p] of [null, 5, 'track', [1]].entries()) {
        x.push(a.topic, 'presence', p, { ref: `p${i}`, joinRef })
        assert.deepEqual((await x.reply(a.topic, `p${i}`)).payload, { status: 'error', response: {} })
      }
      x.push(a.topic, 'presence', { type: 'presence', event: 'track', payload: 'me' }, { ref: 't1', joinRef })
      assert.deepEqual((await x.reply(a.topic, 't1')).payload, { status: 'error', response: { reason: 'Presence track payload must be a map' } })
      x.push(a.topic, 'presence', { type: 'presence', event: 'dance' }, { ref: 't2', joinRef })
      assert.deepEqual((await x.reply(a.topic, 't2')).payload, { status: 'error', response: {} })
      await a.settle(x)
      assert.deepEqual(a.others().filter((m) => m.event === 'presence_diff'), [], 'no presence_diff for refused calls')
    })
    a.close()
  })

  it('access_token events with wrong types are ignored (no reply, channel kept)', async () => {
    const a = await arena(gw, 'tokentypes')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      for (const p of [null, 5, 'tok', { access_token: 5 }, { access_token: null }, { access_token: ['x'] }]) x.push(a.topic, 'access_token', p, { ref: 'at', joinRef })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'still-joined', payload: {} }, { ref: 'b', joinRef })
      assert.deepEqual((await x.reply(a.topic, 'b')).payload, OK)
      assert.deepEqual((await a.settle(x)).map(userEvent), ['still-joined'])
      assert.deepEqual(x.log.filter((m) => m.ref === 'at'), [])
    })
    a.close()
  })

  it('heartbeats with odd payloads are answered ok; unknown events are ignored', async () => {
    const a = await arena(gw, 'unknown')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, CFG)
      for (const [i, p] of [null, 5, 'x', [1], { a: { b: [] } }].entries()) {
        x.push('phoenix', 'heartbeat', p, { ref: `h${i}` })
        assert.deepEqual((await x.reply('phoenix', `h${i}`)).payload, OK)
      }
      for (const e of ['foo', 'phx_reply', 'phx_close', 'phx_error', 'presence_state', 'postgres_changes', 'system', 'BROADCAST']) x.push(a.topic, e, { type: 'broadcast', event: 'e', payload: {} }, { ref: 'u', joinRef })
      x.push('phoenix', 'not-a-heartbeat', {}, { ref: 'u' })
      assert.deepEqual(await a.settle(x), [])
      assert.deepEqual(x.log.filter((m) => m.ref === 'u'), [], 'unknown events get no reply')
      assert.ok(x.isOpen)
    })
    a.close()
  })

  it('refs and event names over 255 bytes are dropped; 255 bytes are fine', async () => {
    const a = await arena(gw, 'longrefs')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const r255 = 'r'.repeat(255)
      x.push('phoenix', 'heartbeat', {}, { ref: r255 })
      assert.equal((await x.reply('phoenix', r255)).ref, r255)
      x.push('phoenix', 'heartbeat', {}, { ref: 'r'.repeat(256) })
      x.push('phoenix', 'heartbeat', {}, { ref: 'R'.repeat(4_000_000) })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: '1', joinRef: 'j'.repeat(256) })
      x.push(a.topic, 'b'.repeat(256), { type: 'broadcast', event: 'e', payload: {} }, { ref: '2', joinRef })
      x.push(a.topic, 'phx_join', CFG, { ref: '3', joinRef: 'j'.repeat(1_000_000) })
      assert.deepEqual(await a.settle(x), [])
      // Replies on `phoenix`: the 255-byte heartbeat and settle()'s own heartbeat, nothing else.
      const hb = x.log.filter((m) => m.event === 'phx_reply' && m.topic === 'phoenix')
      assert.equal(hb.length, 2)
      assert.equal(hb[0].ref, r255)
      assert.equal(x.log.filter((m) => m.ref?.length > 255 || ['1', '2', '3'].includes(m.ref)).length, 0, 'oversized fields are never answered')
    })
    a.close()
  })

  it('topics over 255 bytes cannot be joined (TopicNameTooLong); 255 bytes can', async () => {
    await withClient(gw, {}, async (x) => {
      const ok = `realtime:${'t'.repeat(255 - 9)}`
      assert.equal((await x.join(ok, CFG)).reply.payload.status, 'ok')
      for (const topic of [`realtime:${'t'.repeat(256 - 9)}`, `realtime:${'x'.repeat(1_000_000)}`]) {
        const { reply } = await x.join(topic, CFG, { joinRef: 'long' })
        assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'TopicNameTooLong: Topic name must be at most 255 bytes' } })
      }
      x.push(`realtime:${'y'.repeat(300)}`, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: 'lb' })
      assert.deepEqual((await x.reply(`realtime:${'y'.repeat(300)}`, 'lb')).payload, { status: 'error', response: { reason: 'unmatched topic' } })
    })
  })

  it('deeply nested payloads: 126 levels relayed, 200 levels dropped (no stack overflow)', async () => {
    const a = await arena(gw, 'nesting')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, CFG)
      const nest = (n) => '['.repeat(n) + ']'.repeat(n)
      // Frame array + payload object + "payload" object = 3 levels around the nest.
      x.sendText(`["${joinRef}","1","${a.topic}","broadcast",{"type":"broadcast","event":"deep-ok","payload":{"n":${nest(124)}}}]`)
      x.sendText(`["${joinRef}","2","${a.topic}","broadcast",{"type":"broadcast","event":"too-deep","payload":{"n":${nest(200)}}}]`)
      x.sendText(`["${joinRef}","3","${a.topic}","broadcast",{"type":"broadcast","event":"way-too-deep","payload":${'{"a":'.repeat(100_000)}1${'}'.repeat(100_000)}}]`)
      assert.deepEqual((await a.settle(x)).map(userEvent), ['deep-ok'])
    })
    a.close()
  })

  it('a 5 MB + 1 text message closes only that socket with 1009; the bystander and new sockets keep working', async () => {
    const a = await arena(gw, 'bigframe')
    const x = await connect(gw)
    await x.join(a.topic, CFG)
    x.sendText(JSON.stringify([null, '1', a.topic, 'broadcast', { type: 'broadcast', event: 'e', payload: { pad: 'p'.repeat(5_000_001) } }]))
    const closed = await x.closed
    assert.equal(closed.code, 1009)
    const y = await connect(gw, { vsn: '2.0.0' })
    await y.join(a.topic, CFG)
    y.push(a.topic, 'broadcast', { type: 'broadcast', event: 'after', payload: {} })
    assert.deepEqual((await a.settle(y)).map(userEvent), ['after'])
    y.terminate()
    a.close()
  })

  it('a payload over MAX_PAYLOAD_SIZE_IN_KB (Supabase\'s 3,000 KB) under the frame limit: ack error payload_size_exceeded, not relayed', async () => {
    const a = await arena(gwEvents, 'bigpayload')
    await withClient(gwEvents, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'big', payload: { pad: 'p'.repeat(3_100_000) } }, { ref: 'big', joinRef })
      assert.deepEqual((await x.reply(a.topic, 'big', { timeoutMs: 20_000 })).payload, { status: 'error', response: 'payload_size_exceeded' })
      x.sendBinary(encodeKind3({ joinRef, ref: 'big3', topic: a.topic, event: 'big', payload: { pad: 'q'.repeat(3_100_000) } }))
      assert.deepEqual((await x.reply(a.topic, 'big3', { timeoutMs: 20_000 })).payload, { status: 'error', response: 'payload_size_exceeded' })
      assert.deepEqual(await a.settle(x), [])
    })
    a.close()
  })

  // ------------------------------------------------------ WebSocket framing

  const violations = [
    ['an unmasked client frame', () => clientFrame(1, '[null,"1","phoenix","heartbeat",{}]', { masked: false })],
    ['reserved bits set', () => clientFrame(1, '[null,"1","phoenix","heartbeat",{}]', { rsv: 4 })],
    ['a reserved opcode (0x3)', () => clientFrame(3, 'x')],
    ['a reserved control opcode (0xB)', () => clientFrame(0xb, 'x')],
    ['a continuation without a first frame', () => clientFrame(0, 'x')],
    ['a ping over 125 bytes', () => clientFrame(9, Buffer.alloc(126, 1))],
    ['a fragmented ping', () => clientFrame(9, 'x', { fin: false })],
    ['a new message inside a fragmented one', () => Buffer.concat([clientFrame(1, '[null,', { fin: false }), clientFrame(1, 'x')])],
  ]
  for (const [what, frame] of violations) {
    it(`WebSocket protocol violation (${what}) closes that socket with 1002; the bystander keeps receiving`, async () => {
      const a = await arena(gw, 'framing')
      try {
        const x = await byteSocket(gw)
        x.send(clientFrame(1, JSON.stringify(['1', '1', a.topic, 'phx_join', CFG])))
        await x.next((f) => f.opcode === 1)
        x.send(frame())
        assert.equal(await x.closed, 1002)
        a.control.push(a.topic, 'broadcast', { type: 'broadcast', event: 'after', payload: {} })
        assert.deepEqual((await a.settle()).map(userEvent), ['after'])
      } finally {
        a.close()
      }
    })
  }

  it('a message in 1,000 one-byte fragments, with pings between them, is reassembled and relayed once', async () => {
    const a = await arena(gw, 'fragments')
    try {
      const x = await byteSocket(gw)
      x.send(clientFrame(1, JSON.stringify(['1', '1', a.topic, 'phx_join', CFG])))
      await x.next((f) => f.opcode === 1)
      const text = Buffer.from(JSON.stringify(['1', '2', a.topic, 'broadcast', { type: 'broadcast', event: 'pieces', payload: { pad: 'p'.repeat(900) } }]))
      const parts = []
      for (let i = 0; i < text.length; i++) {
        parts.push(clientFrame(i === 0 ? 1 : 0, text.subarray(i, i + 1), { fin: i === text.length - 1 }))
        if (i % 100 === 50) parts.push(clientFrame(9, `p${i}`))
      }
      x.send(Buffer.concat(parts))
      x.send(clientFrame(1, '[null,"hb","phoenix","heartbeat",{}]'))
      await x.next((f) => f.opcode === 1 && f.payload.toString().includes('"hb"'))
      assert.equal(x.frames.filter((f) => f.opcode === 0xa).length, 10, 'every ping answered with a pong')
      assert.deepEqual((await a.settle()).map(userEvent), ['pieces'])
    } finally {
      a.close()
    }
  })

  it('a ping flood is answered pong for pong; the socket and the bystander keep working', async () => {
    const a = await arena(gw, 'pings')
    try {
      const x = await byteSocket(gw)
      const N = 5000
      x.send(Buffer.concat(Array.from({ length: N }, (_, i) => clientFrame(9, `${i}`))))
      x.send(clientFrame(1, '[null,"hb","phoenix","heartbeat",{}]'))
      await x.next((f) => f.opcode === 1 && f.payload.toString().includes('"hb"'))
      const pongs = x.frames.filter((f) => f.opcode === 0xa).map((f) => f.payload.toString())
      assert.equal(pongs.length, N)
      assert.equal(pongs.at(-1), `${N - 1}`)
      a.control.push(a.topic, 'broadcast', { type: 'broadcast', event: 'after-pings', payload: {} })
      assert.deepEqual((await a.settle()).map(userEvent), ['after-pings'])
      x.socket.destroy()
    } finally {
      a.close()
    }
  })

  it('a binary message over 5 MB closes only that socket with 1009', async () => {
    const a = await arena(gw, 'bigbinary')
    try {
      const x = await connect(gw)
      const { joinRef } = await x.join(a.topic, CFG)
      x.sendBinary(encodeKind3({ joinRef, topic: a.topic, event: 'huge', payload: Buffer.alloc(5_000_001, 7), json: false }))
      assert.equal((await x.closed).code, 1009)
      a.control.push(a.topic, 'broadcast', { type: 'broadcast', event: 'after-huge', payload: {} })
      assert.deepEqual((await a.settle()).map(userEvent), ['after-huge'])
    } finally {
      a.close()
    }
  })

  // ---------------------------------------------------------- binary frames

  it('binary frames of every kind but 3 are dropped', async () => {
    const a = await arena(gw, 'kinds')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const body = encodeKind3({ joinRef, ref: 'k', topic: a.topic, event: 'e', payload: { n: 1 } })
      for (let kind = 0; kind < 256; kind++) {
        if (kind === 3) continue
        const f = Buffer.from(body)
        f[0] = kind
        x.sendBinary(f)
      }
      assert.deepEqual(await a.settle(x), [])
      assert.deepEqual(x.log.filter((m) => m.ref === 'k'), [])
    })
    a.close()
  })

  it('kind 3 with every encoding byte: 0 relayed as bytes, 1 (JSON object) relayed, 2..255 dropped', async () => {
    const a = await arena(gw, 'encodings')
    const v1 = await connect(gw, { vsn: '1.0.0' })
    await v1.join(a.topic, CFG)
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, CFG)
      const bytes = Buffer.from([0, 1, 2, 0xff, 0x7b])
      x.sendBinary(encodeKind3({ joinRef, topic: a.topic, event: 'raw', payload: bytes, json: false }))
      x.sendBinary(encodeKind3({ joinRef, topic: a.topic, event: 'json', payload: { n: 1 } }))
      for (let enc = 2; enc < 256; enc++) {
        const f = encodeKind3({ joinRef, topic: a.topic, event: `enc-${enc}`, payload: { n: enc } })
        f[6] = enc
        x.sendBinary(f)
      }
      const got = await a.settle(x)
      assert.deepEqual(got.map(userEvent), ['raw', 'json'])
      assert.equal(got[0].kind, 'binary')
      assert.equal(got[0].encoding, 0)
      assert.deepEqual([...got[0].payload], [...bytes], 'raw bytes relayed unchanged')
      assert.deepEqual(got[1].payload, { n: 1 })
      // V1 cannot carry raw bytes: it gets the JSON one only.
      await v1.heartbeat()
      assert.deepEqual(v1.log.filter((m) => m.event === 'broadcast' && userEvent(m) !== '__marker__').map(userEvent), ['json'])
    })
    v1.terminate()
    a.close()
  })

  it('kind 3 with lying length bytes (beyond the frame, or a truncated header) is dropped', async () => {
    const a = await arena(gw, 'lengths')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const good = encodeKind3({ joinRef, ref: 'L', topic: a.topic, event: 'e', payload: {} })
      for (let field = 1; field <= 5; field++) {
        for (const v of [255, good[field] + 1, good.length]) {
          const f = Buffer.from(good.subarray(0, 7 + good[1] + good[2] + good[3] + good[4] + good[5]))
          f[field] = Math.min(255, v)
          x.sendBinary(f)
        }
      }
      for (let cut = 1; cut < 7; cut++) x.sendBinary(good.subarray(0, cut))
      assert.deepEqual(await a.settle(x), [])
      assert.deepEqual(x.log.filter((m) => m.ref === 'L'), [])
    })
    a.close()
  })

  it('kind 3 whose JSON payload does not parse, or is not an object: ack error, never relayed (as kind 4 or JSON)', async () => {
    const a = await arena(gw, 'k3json')
    const v1 = await connect(gw, { vsn: '1.0.0' })
    await v1.join(a.topic, CFG)
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const raws = ['{oops', '', '[1,2]', '5', 'null', '"s"', '{"a":1}x', '\u0000{}']
      for (const [i, raw] of raws.entries()) x.sendBinary(encodeKind3({ joinRef, ref: `r${i}`, topic: a.topic, event: 'bad', payload: Buffer.from(raw), json: false }).fill(1, 6, 7))
      x.sendBinary(encodeKind3({ joinRef, ref: 'ok', topic: a.topic, event: 'good', payload: { a: 1 } }))
      assert.deepEqual((await a.settle(x)).map(userEvent), ['good'])
      for (const i of raws.keys()) assert.deepEqual(x.log.find((m) => m.ref === `r${i}`)?.payload, NOT_OBJECT, raws[i])
      await v1.heartbeat()
      assert.deepEqual(v1.log.filter((m) => m.event === 'broadcast' && userEvent(m) !== '__marker__').map(userEvent), ['good'])
    })
    v1.terminate()
    a.close()
  })

  it('kind 3 whose metadata is not a JSON object is dropped as malformed (no reply even with ack); an object is relayed as meta', async () => {
    const a = await arena(gw, 'k3meta')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      for (const [i, meta] of ['{', 'not json', '[1]', '7', 'null'].entries()) x.sendBinary(encodeKind3({ joinRef, ref: `m${i}`, topic: a.topic, event: 'bad-meta', meta, payload: {} }))
      x.sendBinary(encodeKind3({ joinRef, ref: 'mok', topic: a.topic, event: 'with-meta', meta: '{"id":"abc"}', payload: { n: 1 } }))
      const got = await a.settle(x)
      assert.deepEqual(got.map(userEvent), ['with-meta'])
      assert.deepEqual(got[0].meta, { id: 'abc' })
      assert.deepEqual(x.log.filter((m) => /^m\d$/.test(m.ref ?? '')), [])
      assert.deepEqual(x.log.find((m) => m.ref === 'mok')?.payload, OK)
    })
    a.close()
  })

  it('kind 3 with a non-UTF-8 topic or event is dropped; to an unjoined topic: unmatched topic', async () => {
    const a = await arena(gw, 'k3utf8')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      const f = encodeKind3({ joinRef, ref: 'u1', topic: a.topic, event: 'ev', payload: {} })
      const badTopic = Buffer.from(f)
      badTopic[7 + f[1] + f[2]] = 0xff
      x.sendBinary(badTopic)
      const badEvent = Buffer.from(f)
      badEvent[7 + f[1] + f[2] + f[3]] = 0xc3
      x.sendBinary(badEvent)
      x.sendBinary(encodeKind3({ joinRef: '1', ref: 'u2', topic: 'realtime:not-joined-here', event: 'e', payload: {} }))
      assert.deepEqual((await x.reply('realtime:not-joined-here', 'u2')).payload, { status: 'error', response: { reason: 'unmatched topic' } })
      assert.deepEqual(await a.settle(x), [])
      assert.deepEqual(x.log.filter((m) => m.ref === 'u1'), [])
    })
    a.close()
  })

  // -------------------------------------------------------- joins and leaves

  it('10k joins on one socket: the join burst is answered ok, then ClientJoinRateLimitReached and close 1001; the bystander is unaffected', async () => {
    const a = await arena(gw, 'joinflood')
    const x = await connect(gw)
    const frames = []
    for (let i = 0; i < 10_000; i++) frames.push(JSON.stringify([`${i}`, `${i}`, a.topic, 'phx_join', CFG]))
    x.sendText(frames[0])
    for (const f of frames.slice(1)) x.sendText(f)
    const closed = await x.closed
    assert.deepEqual(closed, { ...closed, code: 1001, reason: 'Too many joins per second' })
    const replies = x.log.filter((m) => m.event === 'phx_reply')
    const oks = replies.filter((m) => m.payload.status === 'ok')
    // The burst (100) always fits; the refill (100/s) may add a few more on a slow machine.
    assert.ok(oks.length >= 100 && oks.length < 10_000, `${oks.length} joins accepted`)
    assert.deepEqual(replies.slice(0, oks.length), oks, 'the accepted joins come first')
    assert.deepEqual(replies.slice(oks.length).map((m) => m.payload), [{ status: 'error', response: { reason: 'ClientJoinRateLimitReached: Too many joins per second' } }])
    // Each re-join replaced the previous one: one phx_close per accepted join but the last.
    assert.equal(x.log.filter((m) => m.event === 'phx_close').length, oks.length, 'the refused join still closed the last channel first')
    assert.deepEqual(await a.settle(), [])
    a.close()
  })

  it('join/leave loops leave nothing behind: presence diffs exact, channel gauge back to its start', async () => {
    const a = await arena(gwLoops, 'loops', { bystanderJoin: PRESENCE })
    await withClient(gwLoops, {}, async (x) => {
      const start = await metricWhere(gwLoops, 'realtime_channels_joined')
      const LOOPS = 40 // within the per-socket join burst
      for (let i = 0; i < LOOPS; i++) {
        const { joinRef } = await x.join(a.topic, PRESENCE, { joinRef: `L${i}` })
        x.push(a.topic, 'presence', { type: 'presence', event: 'track', payload: { i } }, { ref: `t${i}`, joinRef })
        await x.reply(a.topic, `t${i}`)
        x.push(a.topic, 'phx_leave', {}, { ref: `l${i}`, joinRef })
        await x.reply(a.topic, `l${i}`)
      }
      await a.settle(x)
      const diffs = a.others().filter((m) => m.event === 'presence_diff')
      assert.equal(diffs.length, 2 * LOOPS, 'one join and one leave diff per loop')
      assert.deepEqual(diffs.map((d) => Object.keys(d.payload.joins).length + Object.keys(d.payload.leaves).length), new Array(2 * LOOPS).fill(1))
      await until(async () => (await metricWhere(gwLoops, 'realtime_channels_joined')) === start, { what: 'the channel gauge back to its start' })
    })
    a.close()
  })

  it('phx_leave honours join_ref: a stale one is ignored (channel kept), the current one leaves', async () => {
    const a = await arena(gw, 'staleleave')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK, { joinRef: 'new' })
      x.push(a.topic, 'phx_leave', {}, { ref: 's1', joinRef: 'old' })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'stale-ref', payload: {} }, { ref: 's2', joinRef: 'old' })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'kept', payload: {} }, { ref: 's3', joinRef })
      assert.deepEqual((await x.reply(a.topic, 's3')).payload, OK)
      assert.deepEqual((await a.settle(x)).map(userEvent), ['kept'])
      assert.deepEqual(x.log.filter((m) => ['s1', 's2'].includes(m.ref)), [], 'stale messages get no reply')
      x.push(a.topic, 'phx_leave', {}, { ref: 's4', joinRef })
      assert.deepEqual((await x.reply(a.topic, 's4')).payload, OK)
      await x.next((m) => m.event === 'phx_close' && m.ref === joinRef)
    })
    a.close()
  })

  it('SQL metacharacters in topics are plain names', async () => {
    await withClient(gw, {}, async (x) => {
      for (const name of [`'; drop table realtime.messages; --`, `" or 1=1 --`, `%_*\\`, 'a:b:c', '$$;select pg_sleep(10);$$']) {
        const a = await arena(gw, 'sql')
        const topic = `realtime:${name}`
        await withClient(gw, {}, async (y) => {
          await y.join(topic, CFG)
          const { joinRef } = await x.join(topic, ACK, { joinRef: `q${name.length}` })
          x.push(topic, 'broadcast', { type: 'broadcast', event: 'sql', payload: { name } }, { ref: 'q', joinRef })
          assert.deepEqual((await x.reply(topic, 'q')).payload, OK)
          const got = await y.next((m) => m.event === 'broadcast')
          assert.deepEqual(got.payload.payload, { name })
        })
        assert.deepEqual(await a.settle(x), [], 'nothing leaks to other topics')
        a.close()
      }
    })
  })

  it('kind 3 on a V1 socket is decoded too: relayed to V2 as kind 4, to V1 as JSON', async () => {
    const a = await arena(gw, 'k3v1')
    try {
      await withClient(gw, { vsn: '1.0.0' }, async (x) => {
        const { joinRef } = await x.join(a.topic, CFG)
        x.sendBinary(encodeKind3({ joinRef, topic: a.topic, event: 'from-v1', meta: '{"m":1}', payload: { n: 1 } }))
        const got = await a.settle(x)
        assert.deepEqual(got.map((m) => [m.kind, userEvent(m), m.payload, m.meta]), [['binary', 'from-v1', { n: 1 }, { m: 1 }]])
      })
    } finally {
      a.close()
    }
  })

  it('presence: untrack without a track, and an identical re-track, send no diff', async () => {
    const a = await arena(gw, 'presencenoop', { bystanderJoin: PRESENCE })
    try {
      await withClient(gw, {}, async (x) => {
        const { joinRef } = await x.join(a.topic, PRESENCE)
        x.push(a.topic, 'presence', { type: 'presence', event: 'untrack' }, { ref: 'u', joinRef })
        assert.deepEqual((await x.reply(a.topic, 'u')).payload, OK)
        for (const ref of ['t1', 't2']) {
          x.push(a.topic, 'presence', { type: 'presence', event: 'TRACK', payload: { same: true } }, { ref, joinRef })
          assert.deepEqual((await x.reply(a.topic, ref)).payload, OK)
        }
        await a.settle(x)
        assert.equal(a.others().filter((m) => m.event === 'presence_diff').length, 1, 'only the first track')
      })
    } finally {
      a.close()
    }
  })

  it('access_token refreshes: sb_ keys and the same token are ignored; an expired token closes the channel with upstream\'s message', async () => {
    const a = await arena(gw, 'refreshexp')
    try {
      await withClient(gw, {}, async (x) => {
        const { joinRef } = await x.join(a.topic, ACK)
        x.push(a.topic, 'access_token', { access_token: 'sb_publishable_abc' }, { ref: 'r1', joinRef })
        x.push(a.topic, 'access_token', { access_token: ANON_KEY }, { ref: 'r2', joinRef })
        x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'still', payload: {} }, { ref: 'b', joinRef })
        assert.deepEqual((await x.reply(a.topic, 'b')).payload, OK)
        x.push(a.topic, 'access_token', { access_token: signHS256({ role: 'anon', exp: now() - 30 }) }, { ref: 'r3', joinRef })
        const sys = await x.next((m) => m.event === 'system')
        assert.match(sys.payload.message, /^Token has expired \d+ seconds ago$/)
        await x.next((m) => m.event === 'phx_close' && m.ref === joinRef)
        assert.deepEqual((await a.settle(x)).map(userEvent), ['still'])
        assert.deepEqual(x.log.filter((m) => ['r1', 'r2', 'r3'].includes(m.ref)), [])
      })
    } finally {
      a.close()
    }
  })

  it('a forged user_token (the older join key) is refused like an access_token', async () => {
    await withClient(gw, {}, async (x) => {
      const forged = signHS256({ role: 'service_role', exp: 4102444800 }, 'another-wrong-secret-another-wrong-secret')
      const { reply } = await x.join('realtime:usertoken', { ...CFG, user_token: forged })
      assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'JwtSignatureError: Failed to validate JWT signature' } })
    })
  })

  it('REST topics with SQL metacharacters and encoded slashes reach exactly their own topic', async () => {
    const names = [`it's; drop table x; --`, 'a/b', '100%_done', '"quoted"']
    const arenas = []
    try {
      for (const n of names) {
        const a = await arena(gw, 'restsql')
        arenas.push(a)
        // Rejoin the bystander on the odd name (the arena's own topic stays the control).
        await a.by.join(`realtime:${n}`, CFG)
      }
      for (const n of names) {
        const r = await fetch(`${gw.url}/api/broadcast/${encodeURIComponent(n)}/events/sql`, { method: 'POST', headers: headers(), body: JSON.stringify({ name: n }) })
        assert.equal(r.status, 202, n)
      }
      for (const [i, a] of arenas.entries()) {
        await a.settle()
        // Each bystander is on one odd name: it gets that message, once, and no other.
        const got = a.by.log.filter((m) => m.event === 'broadcast' && userEvent(m) === 'sql')
        assert.deepEqual(got.map((m) => [m.topic, m.payload]), [[`realtime:${names[i]}`, { name: names[i] }]], `bystander ${i}`)
      }
    } finally {
      arenas.forEach((a) => a.close())
    }
  })

  it('events per second count presence calls too: a presence flood closes the channel with "Too many messages per second"', async () => {
    await withClient(gwLimits, {}, async (x) => {
      const { joinRef } = await x.join('realtime:presence-flood', PRESENCE)
      for (let i = 0; i < 20; i++) x.push('realtime:presence-flood', 'presence', { type: 'presence', event: 'track', payload: { i } }, { ref: `p${i}`, joinRef })
      const sys = await x.next((m) => m.event === 'system')
      assert.ok(['Too many messages per second', 'Client presence rate limit exceeded'].includes(sys.payload.message), sys.raw)
      // With 3 events/s and 5 calls per window, the event rate trips first unless the machine stalls for a second.
      await x.next((m) => m.event === 'phx_close' && m.ref === joinRef)
    })
  })

  // ------------------------------------------------------------------ limits

  it('presence: the 6th call in 30 s gets "Client presence rate limit exceeded" and phx_close; the bystander sees exact diffs', async () => {
    const a = await arena(gw, 'presencerate', { bystanderJoin: PRESENCE })
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, { config: { ...PRESENCE.config, presence: { key: 'spammer', enabled: true } } })
      for (let i = 0; i < 5; i++) {
        x.push(a.topic, 'presence', { type: 'presence', event: 'track', payload: { i } }, { ref: `p${i}`, joinRef })
        assert.deepEqual((await x.reply(a.topic, `p${i}`)).payload, OK)
      }
      x.push(a.topic, 'presence', { type: 'presence', event: 'track', payload: { i: 5 } }, { ref: 'p5', joinRef })
      const sys = await x.next((m) => m.event === 'system')
      const close = await x.next((m) => m.event === 'phx_close')
      assert.deepEqual(sys.frame, [joinRef, null, a.topic, 'system', { extension: 'system', status: 'error', message: 'Client presence rate limit exceeded', channel: a.topic.slice(9) }])
      assert.deepEqual(close.frame, [joinRef, joinRef, a.topic, 'phx_close', {}])
      assert.equal(x.log.find((m) => m.ref === 'p5' && m.event === 'phx_reply'), undefined)
      await a.settle(x)
      const diffs = a.others().filter((m) => m.event === 'presence_diff')
      // Track, four updates (each a leave + join of the key), then the closed channel's leave.
      assert.equal(diffs.length, 6)
      assert.deepEqual(Object.keys(diffs[5].payload.leaves), ['spammer'])
      assert.deepEqual(diffs[5].payload.joins, {})
    })
    a.close()
  })

  it('events per second (CLIENT_MAX_EVENTS_PER_SECOND=3): "Too many messages per second" closes the offender only; the bystander got exactly what was acked', async () => {
    const a = await arena(gwLimits, 'eventrate')
    await withClient(gwLimits, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, ACK)
      // Pushes keep going out until the limit trips: the gateway's clock decides
      // when, so a slow or busy machine only makes this take longer.
      let sent = 0
      await until(
        () => {
          if (x.log.some((m) => m.event === 'system')) return true
          for (let k = 0; k < 10; k++, sent++) x.push(a.topic, 'broadcast', { type: 'broadcast', event: `e${sent}`, payload: { i: sent } }, { ref: `e${sent}`, joinRef })
          return false
        },
        { every: 5, what: () => `the event limit to trip (${sent} sent)` },
      )
      const close = await x.next((m) => m.event === 'phx_close')
      const got = await a.settle(x)
      const acked = x.log.filter((m) => m.event === 'phx_reply' && m.payload.status === 'ok' && /^e\d+$/.test(m.ref)).map((m) => m.ref)
      assert.ok(acked.length >= 3 && acked.length < sent, `${acked.length} of ${sent} accepted`)
      assert.deepEqual(got.map(userEvent), acked, 'the bystander received exactly the accepted messages, in order')
      const sys = x.log.find((m) => m.event === 'system')
      assert.deepEqual(sys.frame, [joinRef, null, a.topic, 'system', { extension: 'system', status: 'error', message: 'Too many messages per second', channel: a.topic.slice(9) }])
      assert.ok(x.log.indexOf(sys) < x.log.indexOf(close))
      assert.equal(close.ref, joinRef)
      // The rest were pushes to a closed channel.
      const rest = x.log.filter((m) => m.event === 'phx_reply' && /^e\d+$/.test(m.ref) && m.payload.status !== 'ok')
      assert.equal(acked.length + 1 + rest.length, sent, 'the refused message gets the system message, every later one unmatched topic')
      assert.ok(rest.every((m) => m.payload.response.reason === 'unmatched topic'))
      // The bystander is still subscribed.
      assert.equal((await a.settle()).length, 0)
    })
    assert.ok((await metricWhere(gwLimits, 'realtime_errors_total', { code: 'MessagePerSecondRateLimitReached' })) >= 1)
    a.close()
  })

  it('channels per socket (TENANT_MAX_CHANNELS_PER_CLIENT=3): the 4th join gets ChannelRateLimitReached', async () => {
    await withClient(gwLimits, {}, async (x) => {
      for (let i = 0; i < 3; i++) assert.equal((await x.join(`realtime:chan-${i}`, CFG)).reply.payload.status, 'ok')
      const { reply } = await x.join('realtime:chan-3', CFG)
      assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'ChannelRateLimitReached: Too many channels' } })
      assert.ok(x.isOpen)
      assert.ok((await metricWhere(gwLimits, 'realtime_errors_total', { code: 'ChannelRateLimitReached' })) >= 1)
    })
  })

  it('postgres_changes entries per join (MAX_POSTGRES_CHANGES_PER_JOIN=2): 3 are refused', async () => {
    await withClient(gwLimits, {}, async (x) => {
      const pc = [{ event: '*', schema: 'public' }, { event: 'INSERT', schema: 'public', table: 'a' }, { event: 'DELETE', schema: 'public', table: 'b' }]
      const { reply } = await x.join('realtime:pc-limit', { config: { ...CFG.config, postgres_changes: pc } })
      assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'InvalidJoinPayload: Too many postgres_changes entries: at most 2 per join' } })
    })
  })

  it('payload size (MAX_PAYLOAD_SIZE_IN_KB=1): broadcast ack error, presence "Track message size exceeded", REST 422', async () => {
    const a = await arena(gwLimits, 'size', { bystanderJoin: PRESENCE })
    await withClient(gwLimits, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, { config: { ...ACK.config, presence: { key: 'big', enabled: true } } })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'small', payload: { p: 'x'.repeat(800) } }, { ref: 'b1', joinRef })
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'large', payload: { p: 'x'.repeat(1100) } }, { ref: 'b2', joinRef })
      assert.deepEqual((await x.reply(a.topic, 'b1')).payload, OK)
      assert.deepEqual((await x.reply(a.topic, 'b2')).payload, { status: 'error', response: 'payload_size_exceeded' })
      assert.deepEqual((await a.settle(x)).map(userEvent), ['small'])
      // REST: both endpoints refuse the large payload and deliver nothing.
      const sub = a.topic.slice(9)
      let r = await fetch(`${gwLimits.url}/api/broadcast`, { method: 'POST', headers: headers(), body: JSON.stringify({ messages: [{ topic: sub, event: 'ok', payload: {} }, { topic: sub, event: 'large', payload: { p: 'x'.repeat(1100) } }] }) })
      assert.equal(r.status, 422)
      assert.deepEqual(await r.json(), { errors: { messages: [{}, { payload: ['Payload size exceeds tenant limit'] }] } })
      r = await fetch(`${gwLimits.url}/api/broadcast/${sub}/events/large`, { method: 'POST', headers: headers(), body: JSON.stringify({ p: 'x'.repeat(1100) }) })
      assert.equal(r.status, 422)
      assert.deepEqual(await r.json(), { errors: { payload: ['Payload size exceeds tenant limit'] } })
      assert.deepEqual(await a.settle(x), [])
      // Presence: the channel is shut down.
      x.push(a.topic, 'presence', { type: 'presence', event: 'track', payload: { p: 'x'.repeat(1100) } }, { ref: 'p1', joinRef })
      const sys = await x.next((m) => m.event === 'system')
      assert.equal(sys.payload.message, 'Track message size exceeded')
      await x.next((m) => m.event === 'phx_close' && m.ref === joinRef)
      assert.ok((await metricWhere(gwLimits, 'realtime_errors_total', { code: 'PayloadSizeExceeded' })) >= 3)
    })
    a.close()
  })

  it('presence metas one socket keeps tracked are bounded by MAX_PAYLOAD_SIZE_IN_KB over all its channels', async () => {
    await withClient(gwLimits, {}, async (x) => {
      const track = async (topic, joinRef, bytes, ref) => {
        x.push(topic, 'presence', { type: 'presence', event: 'track', payload: { p: 'x'.repeat(bytes) } }, { ref, joinRef })
      }
      const one = await x.join('realtime:budget-1', PRESENCE)
      const two = await x.join('realtime:budget-2', PRESENCE)
      await track('realtime:budget-1', one.joinRef, 500, 'a')
      assert.deepEqual((await x.reply('realtime:budget-1', 'a')).payload, OK)
      // Re-tracking on the same channel replaces its meta: still within the budget.
      await track('realtime:budget-1', one.joinRef, 520, 'b')
      assert.deepEqual((await x.reply('realtime:budget-1', 'b')).payload, OK)
      // A second channel's 500 bytes would pass 1,000 in all.
      await track('realtime:budget-2', two.joinRef, 500, 'c')
      const sys = await x.next((m) => m.event === 'system' && m.topic === 'realtime:budget-2')
      assert.deepEqual(sys.payload, { extension: 'system', status: 'error', message: 'Track message size exceeded', channel: 'budget-2' })
      await x.next((m) => m.event === 'phx_close' && m.topic === 'realtime:budget-2')
      // Untracking frees it (after a second: this gateway allows 3 events per second).
      await sleep(1100)
      x.push('realtime:budget-1', 'presence', { type: 'presence', event: 'untrack' }, { ref: 'd', joinRef: one.joinRef })
      assert.deepEqual((await x.reply('realtime:budget-1', 'd')).payload, OK)
      const three = await x.join('realtime:budget-3', PRESENCE)
      await track('realtime:budget-3', three.joinRef, 500, 'e')
      assert.deepEqual((await x.reply('realtime:budget-3', 'e')).payload, OK)
    })
  })

  it('NO_CHANNEL_TIMEOUT_IN_MS: a socket without channels is closed (1000), one with a channel stays', async () => {
    const idle = await connect(gwNoChan)
    const chatty = await connect(gwNoChan)
    const beat = setInterval(() => chatty.isOpen && chatty.push('phoenix', 'heartbeat', {}), 300)
    // A socket that joins in time: on a very busy machine the timeout may run
    // out between the upgrade and the join, so a socket closed first is replaced.
    const joined = async (topic) => {
      for (let attempt = 0; ; attempt++) {
        const c = await connect(gwNoChan)
        try {
          const { joinRef, reply } = await c.join(topic, CFG)
          assert.equal(reply.payload.status, 'ok')
          return { c, joinRef }
        } catch (e) {
          if (c.isOpen || attempt === 10) throw e
        }
      }
    }
    const { c: kept } = await joined('realtime:nochan-kept')
    const { c: left, joinRef } = await joined('realtime:nochan-left')
    left.push('realtime:nochan-left', 'phx_leave', {}, { joinRef })
    const c1 = await idle.closed
    const c2 = await left.closed
    const c3 = await chatty.closed
    clearInterval(beat)
    assert.deepEqual([c1.code, c1.reason, c2.code, c2.reason], [1000, 'no channel joined', 1000, 'no channel joined'])
    assert.deepEqual([c3.code, c3.reason], [1000, 'no channel joined'], 'heartbeats alone do not keep a socket without channels')
    assert.ok(kept.isOpen, 'a socket with a channel is kept')
    await kept.heartbeat()
    kept.terminate()
  })

  it('concurrent users (TENANT_MAX_CONCURRENT_USERS=2): 3rd join ConnectionRateLimitReached, then connect 429; a user leaving frees a place', async () => {
    const c = await connect(gwUsers)
    const a = await connect(gwUsers)
    const b = await connect(gwUsers)
    assert.equal((await a.join('realtime:users', CFG)).reply.payload.status, 'ok')
    assert.equal((await b.join('realtime:users', CFG)).reply.payload.status, 'ok')
    assert.equal((await a.join('realtime:users-2', CFG)).reply.payload.status, 'ok', 'a counted socket joins more channels')
    assert.deepEqual((await c.join('realtime:users', CFG)).reply.payload, { status: 'error', response: { reason: 'ConnectionRateLimitReached: Too many connected users' } })
    assert.deepEqual(await refusedUpgrade(gwUsers), { status: 429, body: { error: 'Too many connected users' } })
    a.terminate()
    await until(async () => (await metricWhere(gwUsers, 'realtime_connections_connected')) === 2, { what: 'a to be gone' })
    assert.equal((await c.join('realtime:users', CFG)).reply.payload.status, 'ok')
    b.terminate()
    c.terminate()
  })

  it('connections per user (MAX_CONNECTIONS_PER_USER=2): 3rd socket of a sub gets 429, other users and keys without sub are not counted; a closed socket frees a place', async () => {
    const userJwt = (sub) => signHS256({ role: 'authenticated', sub, exp: 4102444800 })
    const A = userJwt('user-a')
    const a1 = await connect(gwPerUser, { apikey: A })
    const a2 = await connect(gwPerUser, { apikey: A })
    const before = await metricWhere(gwPerUser, 'realtime_errors_total', { code: 'UserConnectionLimitReached' })
    assert.deepEqual(await refusedUpgrade(gwPerUser, { apikey: A }), { status: 429, body: { error: 'Too many connections for this user' } })
    assert.equal(await metricWhere(gwPerUser, 'realtime_errors_total', { code: 'UserConnectionLimitReached' }), before + 1)
    const b = await connect(gwPerUser, { apikey: userJwt('user-b') })
    assert.equal((await b.join('realtime:peruser', CFG)).reply.payload.status, 'ok', 'user B is not limited by A')
    const anons = await Promise.all([1, 2, 3].map(() => connect(gwPerUser)))
    await Promise.all(anons.map((x) => x.heartbeat()))
    assert.equal((await a2.join('realtime:peruser', CFG)).reply.payload.status, 'ok', "A's accepted sockets work")
    a1.terminate()
    // Released when the connection task ends: retry until it has.
    const a3 = await until(
      async () => {
        try {
          return await connect(gwPerUser, { apikey: A })
        } catch (e) {
          assert.match(e.message, /HTTP 429/)
          return null
        }
      },
      { what: "a place for A after closing one of A's sockets" },
    )
    assert.equal((await a3.join('realtime:peruser', CFG)).reply.payload.status, 'ok')
    assert.deepEqual(await refusedUpgrade(gwPerUser, { apikey: A }), { status: 429, body: { error: 'Too many connections for this user' } }, 'still 2 at most')
    for (const x of [a2, a3, b, ...anons]) x.terminate()
  })

  it('gateway-wide joins per second (TENANT_MAX_JOINS_PER_SECOND=1): join refused with disconnect, connect 429', async () => {
    // The budget refills once a second: retry the pair until both land in one
    // second (on any machine the first attempt does; this only bounds a hang).
    let outcome
    for (let attempt = 0; attempt < 20 && !outcome; attempt++) {
      const x = await connect(gwJoinRate)
      const first = await x.join('realtime:jr', CFG, { joinRef: 'a' })
      const second = await x.join('realtime:jr2', CFG, { joinRef: 'b' })
      if (first.reply.payload.status === 'ok' && second.reply.payload.status === 'error') {
        const closed = await x.closed
        let refused
        try {
          refused = await refusedUpgrade(gwJoinRate)
        } catch {
          continue // the budget refilled meanwhile
        }
        outcome = { second: second.reply.payload, closed: [closed.code, closed.reason], refused }
      }
      x.terminate()
      await sleep(1100)
    }
    assert.deepEqual(outcome, {
      second: { status: 'error', response: { reason: 'ClientJoinRateLimitReached: Too many joins per second' } },
      closed: [1001, 'Too many joins per second'],
      refused: { status: 429, body: { error: 'Too many joins per second' } },
    })
  })

  it('gateway-wide events per second (TENANT_MAX_EVENTS_PER_SECOND=5000): a 10k batch is refused whole (429), 2k delivered whole', async () => {
    const a = await arena(gwEvents, 'tenantevents')
    const sub = a.topic.slice(9)
    const batch = (n, tag) => JSON.stringify({ messages: Array.from({ length: n }, (_, i) => ({ topic: sub, event: tag, payload: { i } })) })
    let r = await fetch(`${gwEvents.url}/api/broadcast`, { method: 'POST', headers: headers(), body: batch(10_000, 'big') })
    assert.equal(r.status, 429)
    assert.deepEqual(await r.json(), { message: 'Too many messages to broadcast, please reduce the batch size' })
    assert.deepEqual(await a.settle(), [])
    r = await fetch(`${gwEvents.url}/api/broadcast`, { method: 'POST', headers: headers(), body: batch(2000, 'fits') })
    assert.equal(r.status, 202)
    const got = await a.settle()
    assert.equal(got.length, 2000)
    assert.ok(got.every((m, i) => m.payload.payload.i === i), 'in order')
    a.close()
  })

  // -------------------------------------------------------------------- REST

  it('a REST batch of 10,000 messages is delivered whole (10x the client backlog) to raw and supabase-js subscribers', async () => {
    const a = await arena(gw, 'restbatch')
    const sub = a.topic.slice(9)
    const client = sbClient(gw)
    try {
      const seen = []
      const ch = client.channel(sub).on('broadcast', { event: 'bulk' }, (m) => seen.push(m.payload.i))
      await subscribe(ch, { timeoutMs: 30_000 })
      const messages = Array.from({ length: 10_000 }, (_, i) => ({ topic: sub, event: 'bulk', payload: { i, pad: 'p'.repeat(100) } }))
      const r = await fetch(`${gw.url}/api/broadcast`, { method: 'POST', headers: headers(), body: JSON.stringify({ messages }) })
      assert.equal(r.status, 202, await r.text())
      const got = await a.settle()
      assert.equal(got.length, 10_000)
      assert.ok(got.every((m, i) => m.payload.payload.i === i), 'in order, no gap')
      await until(() => seen.length >= 10_000, { timeoutMs: 60_000, what: `supabase-js to get 10k (has ${seen.length})` })
      assert.ok(seen.every((v, i) => v === i))
      assert.deepEqual(a.others(), [], 'no lag notice')
    } finally {
      await closeClients(client)
      a.close()
    }
  })

  it('REST: wrong content types → 415; no content type on the single endpoint is JSON', async () => {
    const a = await arena(gw, 'resttypes')
    const sub = a.topic.slice(9)
    const unsupported = { error: 'Unsupported Media Type. Use application/json or application/octet-stream' }
    for (const ct of ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/jsonp']) {
      let r = await fetch(`${gw.url}/api/broadcast/${sub}/events/e`, { method: 'POST', headers: headers({ 'content-type': ct }), body: '{"a":1}' })
      assert.deepEqual([r.status, await r.json()], [415, unsupported], ct)
      r = await fetch(`${gw.url}/api/broadcast`, { method: 'POST', headers: headers({ 'content-type': ct }), body: JSON.stringify({ messages: [{ topic: sub, event: 'e', payload: {} }] }) })
      assert.deepEqual([r.status, await r.json()], [415, unsupported], `batch ${ct}`)
    }
    const h = headers()
    delete h['content-type']
    const r = await fetch(`${gw.url}/api/broadcast/${sub}/events/no-ct`, { method: 'POST', headers: h, body: new TextEncoder().encode('{"a":1}') })
    assert.equal(r.status, 202)
    const got = await a.settle()
    assert.deepEqual(got.map(userEvent), ['no-ct'])
    a.close()
  })

  it('REST: bodies past MAX_BODY_SIZE → 413; invalid batches → 422 with upstream errors; nothing is delivered', async () => {
    const a = await arena(gw, 'restbad')
    const sub = a.topic.slice(9)
    const post = (path, body, h = headers()) => fetch(`${gw.url}${path}`, { method: 'POST', headers: h, body })
    let r = await post('/api/broadcast', JSON.stringify({ messages: [{ topic: sub, event: 'e', payload: { p: 'x'.repeat(5_000_001) } }] }))
    assert.deepEqual([r.status, await r.json()], [413, { message: 'Payload size exceeds tenant limit' }])
    r = await post(`/api/broadcast/${sub}/events/e`, Buffer.alloc(5_000_001, 0x61), headers({ 'content-type': 'application/octet-stream' }))
    assert.deepEqual([r.status, await r.json()], [413, { message: 'Payload size exceeds tenant limit' }])
    r = await post('/api/broadcast', JSON.stringify({ messages: [{ topic: sub, event: 'e', payload: {} }, { topic: sub, event: 'e', payload: 'str' }, { topic: sub, event: 'e' }, { topic: '', event: '', payload: {} }] }))
    assert.equal(r.status, 422)
    assert.deepEqual(await r.json(), { errors: { messages: [{}, { payload: ['is invalid'] }, { payload: ["can't be blank"] }, { topic: ["can't be blank"], event: ["can't be blank"] }] } })
    for (const body of ['{', '[]', '{"messages":"x"}', '{"messages":[5]}', 'null']) {
      r = await post('/api/broadcast', body)
      assert.equal(r.status, 422, body)
    }
    r = await post('/api/broadcast', '{"messages":[]}')
    assert.deepEqual([r.status, await r.json()], [422, { errors: { messages: ["can't be blank"] } }])
    r = await post(`/api/broadcast/${sub}/events/e`, '{not json')
    assert.deepEqual([r.status, await r.json()], [422, { errors: { payload: ['is not valid JSON'] } }])
    r = await post(`/api/broadcast/${sub}/events/${'e'.repeat(256)}`, '{}')
    assert.equal(r.status, 422)
    r = await post(`/api/broadcast/${sub}/events/e`, '{}', headers({ authorization: `Bearer ${signHS256({ role: 'anon', exp: 4102444800 }, 'wrong-secret-wrong-secret-wrong-secret')}`, apikey: 'x' }))
    assert.deepEqual([r.status, await r.json()], [401, { message: 'Unauthorized' }])
    assert.deepEqual(await a.settle(), [])
    a.close()
  })

  // -------------------------------------------------------------------- auth

  it('forged, expired, malformed and alg:none apikeys are refused at connect (401 with upstream messages)', async () => {
    const forged = signHS256({ role: 'anon', exp: 4102444800 }, 'not-the-secret-not-the-secret-not-the-secret')
    const expired = signHS256({ role: 'anon', exp: now() - 100 })
    const none = `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url({ role: 'service_role', exp: 4102444800 })}.`
    assert.deepEqual(await refusedUpgrade(gw, { apikey: forged }), { status: 401, body: { error: 'Failed to validate JWT signature' } })
    const e = await refusedUpgrade(gw, { apikey: expired })
    assert.equal(e.status, 401)
    assert.match(e.body.error, /^Token has expired/)
    assert.deepEqual(await refusedUpgrade(gw, { apikey: 'garbage' }), { status: 401, body: { error: 'The token provided is not a valid JWT' } })
    assert.deepEqual(await refusedUpgrade(gw, { apikey: null }), { status: 401, body: { error: 'API key is missing' } })
    const n = await refusedUpgrade(gw, { apikey: none })
    assert.equal(n.status, 401, 'alg: none is never accepted')
  })

  it('forged, expired, malformed and alg:none access_tokens are refused at join; the bystander is unaffected', async () => {
    const a = await arena(gw, 'jointokens')
    await withClient(gw, {}, async (x) => {
      const forged = signHS256({ role: 'service_role', exp: 4102444800 }, 'not-the-secret-not-the-secret-not-the-secret')
      const expired = signHS256({ role: 'anon', exp: now() - 100 })
      const none = `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url({ role: 'service_role', exp: 4102444800 })}.`
      const noRole = signHS256({ exp: 4102444800 })
      const cases = [
        [forged, /^JwtSignatureError: Failed to validate JWT signature$/],
        [expired, /^InvalidJWTToken: Token has expired \d+ seconds ago$/],
        ['abc.def', /^MalformedJWT: The token provided is not a valid JWT$/],
        [noRole, /^InvalidJWTToken: Fields `role` and `exp` are required in JWT$/],
        // alg: none has no signer (upstream's Joken answer)
        [none, /^JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration$/],
      ]
      for (const [i, [token, reason]] of cases.entries()) {
        const { reply } = await x.join(a.topic, { ...CFG, access_token: token }, { joinRef: `t${i}` })
        assert.equal(reply.payload.status, 'error')
        assert.match(reply.payload.response.reason, reason)
      }
      x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'e', payload: {} }, { ref: 'nb' })
      assert.equal((await x.reply(a.topic, 'nb')).payload.response.reason, 'unmatched topic')
      assert.deepEqual(await a.settle(x), [])
    })
    a.close()
  })

  it('a forged access_token event closes that channel (system error + phx_close); others stay', async () => {
    const a = await arena(gw, 'refresh')
    await withClient(gw, {}, async (x) => {
      const { joinRef } = await x.join(a.topic, CFG)
      x.push(a.topic, 'access_token', { access_token: signHS256({ role: 'anon', exp: 4102444800 }, 'forged-forged-forged-forged-forged') }, { joinRef })
      const sys = await x.next((m) => m.event === 'system')
      assert.deepEqual(sys.payload, { extension: 'system', status: 'error', message: 'Failed to validate JWT signature', channel: a.topic.slice(9) })
      await x.next((m) => m.event === 'phx_close' && m.ref === joinRef)
      assert.deepEqual(await a.settle(x), [])
    })
    a.close()
  })

  // --------------------------------------------------------- slow and silent

  it('slowloris: an upgrade sent one byte at a time is cut off after HEADER_READ_TIMEOUT_MS (3 s); others keep working', async () => {
    const a = await arena(gwSlow, 'slowloris')
    const s = await tcpConnect(gwSlow)
    const request = `GET /socket/websocket?apikey=${ANON_KEY}&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`
    let sent = 0
    const closed = closedOf(s)
    let open = true
    closed.then(() => (open = false))
    // Keep dripping (one byte per 200 ms: a ~400-byte head would take 80 s)
    // until the server gives up on us.
    while (open && sent < request.length) {
      s.write(request[sent++])
      if (sent === 1) {
        // Others are served while the slow head is pending (sent at once: a
        // busy test process may take longer than the header timeout to drip more).
        a.control.push(a.topic, 'broadcast', { type: 'broadcast', event: 'during', payload: {} })
      }
      await Promise.race([sleep(200), closed])
    }
    assert.equal(open, false, 'the server must close the connection before the head is complete')
    assert.ok(sent < request.length)
    assert.deepEqual((await a.settle()).map(userEvent), ['during'])
    a.close()
  })

  it('thousands of half-open TCP connections: bystanders and new sockets keep working, memory bounded, all cut off by the header timeout', async () => {
    const limit = await fdLimit()
    const N = Math.min(10_000, limit - 4000)
    assert.ok(N >= 1000, `fd limit ${limit} too low for this test`)
    const a = await arena(gwFlood, 'halfopen')
    const rss0 = gwFlood.rssKiB()
    const sockets = []
    for (let i = 0; i < N; i += 500) {
      const batch = await Promise.all(Array.from({ length: Math.min(500, N - i) }, () => tcpConnect(gwFlood).catch(() => null)))
      for (const s of batch) if (s) sockets.push(s)
    }
    // Half of them also send a partial request head.
    sockets.forEach((s, i) => i % 2 && s.write('GET /socket/websocket HTTP/1.1\r\nHost: x\r\n'))
    const closed = sockets.map(closedOf)
    a.control.push(a.topic, 'broadcast', { type: 'broadcast', event: 'while-flooded', payload: {} })
    await withClient(gwFlood, {}, async (y) => {
      await y.join(a.topic, CFG)
      assert.equal((await y.heartbeat()).payload.status, 'ok')
    })
    const growth = gwFlood.rssKiB() - rss0
    const perConn = (growth * 1024) / sockets.length
    assert.deepEqual((await a.settle()).map(userEvent), ['while-flooded'])
    await Promise.race([Promise.all(closed), sleep(40_000).then(() => assert.fail('half-open connections not closed by the server'))])
    console.log(`# ${sockets.length} half-open connections: RSS growth ${growth} KiB (${perConn.toFixed(0)} B each)`)
    // A silent connection costs ~1.4 KiB (it never reaches hyper); one with a
    // partial request head ~16 KiB (hyper's buffers); both live at most
    // HEADER_READ_TIMEOUT_MS, and at most MAX_HTTP_CONNECTIONS reach hyper.
    assert.ok(perConn < 16 * 1024, `RSS grew by ${growth} KiB for ${sockets.length} half-open connections`)
    a.close()
  })

  it('a client that never reads while others flood: readers get everything, exactly; the stalled socket is closed', async () => {
    const a = await arena(gwLazy, 'neverreads')
    const lazy = await connect(gwLazy)
    await lazy.join(a.topic, CFG)
    lazy.collect = false
    lazy.pause()
    const sub = a.topic.slice(9)
    assert.equal(await metricWhere(gwLazy, 'realtime_connections_connected'), 3)
    for (let k = 0; k < 6; k++) {
      const messages = Array.from({ length: 1000 }, (_, i) => ({ topic: sub, event: 'flood', payload: { i: k * 1000 + i, pad: 'f'.repeat(1000) } }))
      const r = await fetch(`${gwLazy.url}/api/broadcast`, { method: 'POST', headers: headers(), body: JSON.stringify({ messages }) })
      assert.equal(r.status, 202)
    }
    const got = await a.settle()
    assert.equal(got.length, 6000)
    assert.ok(got.every((m, i) => m.payload.payload.i === i))
    // The lazy socket's writer stalls (WRITE_TIMEOUT_MS=3000), and the whole connection goes.
    await until(async () => (await metricWhere(gwLazy, 'realtime_connections_connected')) === 2, { timeoutMs: 30_000, what: 'the stalled socket to be closed' })
    lazy.terminate()
    a.close()
  })

  it('a publisher that never reads is disconnected once its writer stalls; what it sent before reaches bystanders exactly', async () => {
    const a = await arena(gwWriter, 'deafpublisher')
    const x = await connect(gwWriter, { collect: false })
    const { joinRef } = { joinRef: 'deaf' }
    x.push(a.topic, 'phx_join', ACK, { ref: joinRef, joinRef })
    await sleep(100)
    x.pause()
    // Acked broadcasts with a large ref fill its own socket with replies it
    // never reads; it keeps sending until the server has closed it.
    let sent = 0
    const bigRef = 'r'.repeat(250)
    while ((await metricWhere(gwWriter, 'realtime_connections_connected')) > 2) {
      for (let i = 0; i < 200; i++) {
        x.push(a.topic, 'broadcast', { type: 'broadcast', event: 'deaf', payload: { i: sent++ } }, { ref: bigRef, joinRef })
      }
      await sleep(20)
      assert.ok(sent < 5_000_000, 'the stalled publisher was never disconnected')
    }
    // Every broadcast the server handled came from the deaf socket (the
    // control's marker is sent below): the bystander got exactly those, in
    // order, and none of what was sent after the reader stopped.
    const handled = await metricWhere(gwWriter, 'realtime_channel_events', { event: 'broadcast' })
    const got = await a.settle()
    assert.equal(got.length, handled)
    assert.ok(got.every((m, i) => m.payload.payload.i === i))
    assert.ok(got.length < sent, 'frames sent after the disconnect were not handled')
    x.terminate()
    a.close()
  })
})

test('every gateway stayed under the memory ceiling and never died', withLog(all, async () => {
  for (const g of all()) assert.ok(g.alive, `${g.name} died`)
  console.log(`# hostile: peak RSS (KiB) ${[...peakRss].map(([n, v]) => `${n} ${v}`).join(', ')}; ceiling ${RSS_CEILING_KIB}`)
  for (const [name, peak] of peakRss) assert.ok(peak < RSS_CEILING_KIB, `${name}: peak RSS ${peak} KiB over ${RSS_CEILING_KIB} KiB`)
}))
