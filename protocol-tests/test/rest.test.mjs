// Check 2 of issue 2: REST broadcast — supabase-js httpSend() (single endpoint),
// send() on an unjoined channel (batch endpoint fallback) and direct POSTs to
// both endpoints under both prefixes — reaches subscribers, answering 202.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { withLog } from '../lib/gateway.mjs'
import { startTarget } from '../lib/target.mjs'
import { RawClient } from '../lib/raw.mjs'
import { ANON_KEY } from '../lib/jwt.mjs'
import { sbClient, subscribe, closeClients } from '../lib/supabase.mjs'
import { until, sleep } from '../lib/util.mjs'

let gw
before(async () => {
  gw = await startTarget({ name: 'rest' })
})
after(async () => {
  await gw?.stop()
})
const it = (name, fn) => test(name, withLog(() => gw, fn))

const msg = (event, payload) => ({ type: 'broadcast', event, payload })
const cfg = { config: { broadcast: { self: false, ack: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } }
const headers = { apikey: ANON_KEY, authorization: `Bearer ${ANON_KEY}`, 'content-type': 'application/json' }

async function post(path, body) {
  const r = await fetch(gw.url + path, { method: 'POST', headers, body: JSON.stringify(body) })
  return { status: r.status, text: await r.text() }
}

/** A supabase-js subscriber on `room` recording its broadcasts. */
async function sbSubscriber(room) {
  const c = sbClient(gw)
  const got = []
  const ch = c.channel(room).on('broadcast', { event: '*' }, (m) => got.push({ type: m.type, event: m.event, payload: m.payload }))
  await subscribe(ch)
  return { c, got }
}

it('httpSend() reaches supabase-js and raw subscribers; it resolves {success:true}, i.e. HTTP 202', async () => {
  const sub = await sbSubscriber('room-2')
  const v1 = await RawClient.connect(gw, { vsn: '1.0.0' })
  const v2 = await RawClient.connect(gw, { vsn: '2.0.0' })
  const sender = sbClient(gw)
  try {
    await v1.join('realtime:room-2', cfg)
    await v2.join('realtime:room-2', cfg)
    // The sender's channel is never subscribed: httpSend is plain REST.
    const res = await sender.channel('room-2').httpSend('http-ev', { n: 1, s: 'é' })
    assert.deepEqual(res, { success: true })
    await until(() => sub.got.length >= 1, { what: 'supabase-js subscriber to get the httpSend message' })
    assert.deepEqual(sub.got, [msg('http-ev', { n: 1, s: 'é' })])
    const j = await v1.next((m) => m.event === 'broadcast', { what: 'V1 broadcast' })
    assert.deepEqual(j.frame, { topic: 'realtime:room-2', event: 'broadcast', payload: msg('http-ev', { n: 1, s: 'é' }), ref: null })
    // PROTOCOL §6.2: the single endpoint fans out a user broadcast (kind 4 for V2).
    const b = await v2.next((m) => m.event === 'broadcast', { what: 'V2 broadcast' })
    assert.equal(b.kind, 'binary', `expected kind 4, got ${b.raw}`)
    assert.equal(b.topic, 'realtime:room-2')
    assert.equal(b.userEvent, 'http-ev')
    assert.deepEqual(b.payload, { n: 1, s: 'é' })
  } finally {
    v1.terminate()
    v2.terminate()
    await closeClients(sub.c, sender)
  }
})

it('send() on an unjoined channel falls back to the batch endpoint and resolves \'ok\'', async () => {
  const sub = await sbSubscriber('room-2-fallback')
  const sender = sbClient(gw)
  const warn = console.warn
  console.warn = () => {} // realtime-js warns that the REST fallback is deprecated
  try {
    assert.equal(await sender.channel('room-2-fallback').send(msg('fb', { via: 'batch' })), 'ok')
    await until(() => sub.got.length >= 1, { what: 'the fallback message' })
    assert.deepEqual(sub.got, [msg('fb', { via: 'batch' })])
  } finally {
    console.warn = warn
    await closeClients(sub.c, sender)
  }
})

it('POST /api/broadcast and /realtime/v1/api/broadcast (batch) → 202, each message to its own topic, in order', async () => {
  const a = await sbSubscriber('room-2a')
  const b = await sbSubscriber('room-2b')
  try {
    for (const prefix of ['/api', '/realtime/v1/api']) {
      const r = await post(`${prefix}/broadcast?apikey=${ANON_KEY}&vsn=2.0.0`, {
        messages: [
          { topic: 'room-2a', event: 'e1', payload: { prefix, i: 1 } },
          { topic: 'room-2b', event: 'e2', payload: { prefix, i: 2 } },
          { topic: 'room-2a', event: 'e3', payload: { prefix, i: 3 }, private: false },
        ],
      })
      assert.equal(r.status, 202, `${prefix}/broadcast answered ${r.status} ${r.text}`)
    }
    await until(() => a.got.length >= 4 && b.got.length >= 2, { what: 'all batch messages' })
    await sleep(100)
    assert.deepEqual(a.got, [
      msg('e1', { prefix: '/api', i: 1 }),
      msg('e3', { prefix: '/api', i: 3 }),
      msg('e1', { prefix: '/realtime/v1/api', i: 1 }),
      msg('e3', { prefix: '/realtime/v1/api', i: 3 }),
    ])
    assert.deepEqual(b.got, [msg('e2', { prefix: '/api', i: 2 }), msg('e2', { prefix: '/realtime/v1/api', i: 2 })])
  } finally {
    await closeClients(a.c, b.c)
  }
})

it('POST /api/broadcast/{topic}/events/{event} and the /realtime/v1 form (single) → 202 and delivered', async () => {
  const s = await sbSubscriber('room 2/single')
  try {
    const topic = encodeURIComponent('room 2/single')
    for (const [prefix, ev] of [['/api', 'one'], ['/realtime/v1/api', 'two']]) {
      const r = await post(`${prefix}/broadcast/${topic}/events/${ev}?apikey=${ANON_KEY}`, { ev })
      assert.equal(r.status, 202, `${prefix} single endpoint answered ${r.status} ${r.text}`)
    }
    await until(() => s.got.length >= 2, { what: 'both single-endpoint messages' })
    assert.deepEqual(s.got, [msg('one', { ev: 'one' }), msg('two', { ev: 'two' })])
  } finally {
    await closeClients(s.c)
  }
})

it('REST errors: no credentials → 401; a body that is not a batch → 4xx; nothing is delivered', async () => {
  const s = await sbSubscriber('room-2-err')
  try {
    const noAuth = await fetch(`${gw.url}/api/broadcast`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages: [{ topic: 'room-2-err', event: 'x', payload: {} }] }),
    })
    assert.equal(noAuth.status, 401, await noAuth.text())
    const bad = await post('/api/broadcast', { nope: true })
    assert.ok(bad.status >= 400 && bad.status < 500, `malformed batch answered ${bad.status}`)
    await sleep(200)
    assert.deepEqual(s.got, [])
  } finally {
    await closeClients(s.c)
  }
})
