// Check 3 of issue 2: Presence with real supabase-js 2.119.0 — track, sync,
// join with the other's payload, leave when a client disconnects — plus the
// raw presence_diff wire shape (unique phx_refs, generated key).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { withLog } from '../lib/gateway.mjs'
import { startTarget } from '../lib/target.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sbClient, subscribe, closeClients } from '../lib/supabase.mjs'
import { until } from '../lib/util.mjs'

let gw
before(async () => {
  gw = await startTarget({ name: 'presence' })
})
after(async () => {
  await gw?.stop()
})
const it = (name, fn) => test(name, withLog(() => gw, fn))

/** A supabase-js client on `room` with presence key `key`, recording presence events. */
async function member(room, key, vsn) {
  const c = sbClient(gw, { vsn })
  const events = []
  const ch = c
    .channel(room, { config: { presence: { key } } })
    .on('presence', { event: 'sync' }, () => events.push({ event: 'sync' }))
    .on('presence', { event: 'join' }, (e) => events.push({ event: 'join', key: e.key, newPresences: e.newPresences }))
    .on('presence', { event: 'leave' }, (e) => events.push({ event: 'leave', key: e.key, leftPresences: e.leftPresences }))
  await subscribe(ch)
  return { c, ch, events }
}

const strip = (p) => {
  assert.equal(typeof p.presence_ref, 'string', `presence_ref missing in ${JSON.stringify(p)}`)
  const { presence_ref, ...rest } = p
  return rest
}

for (const vsn of ['2.0.0', '1.0.0']) {
  it(`vsn ${vsn}: A and B track; each sees sync and the other's join; B disconnects → A sees leave`, async () => {
    const room = `room-3-${vsn}`
    const A = await member(room, 'alice', vsn)
    const B = await member(room, 'bob', vsn)
    try {
      assert.equal(await A.ch.track({ user: 'alice', n: 1 }), 'ok')
      assert.equal(await B.ch.track({ user: 'bob', n: 2 }), 'ok')

      const joinOf = (m, key) => m.events.find((e) => e.event === 'join' && e.key === key)
      await until(() => joinOf(A, 'bob') && joinOf(B, 'alice'), { what: 'each member to see the other join' })
      assert.deepEqual(joinOf(A, 'bob').newPresences.map(strip), [{ user: 'bob', n: 2 }])
      assert.deepEqual(joinOf(B, 'alice').newPresences.map(strip), [{ user: 'alice', n: 1 }])
      assert.ok(A.events.some((e) => e.event === 'sync'), 'A saw no sync')
      assert.ok(B.events.some((e) => e.event === 'sync'), 'B saw no sync')

      for (const m of [A, B]) {
        await until(() => Object.keys(m.ch.presenceState()).length === 2, { what: 'two keys in presenceState' })
        const state = m.ch.presenceState()
        assert.deepEqual(Object.keys(state).sort(), ['alice', 'bob'])
        assert.deepEqual(state.alice.map(strip), [{ user: 'alice', n: 1 }])
        assert.deepEqual(state.bob.map(strip), [{ user: 'bob', n: 2 }])
      }
      const refs = [A, B].flatMap((m) => Object.values(m.ch.presenceState()).flat().map((p) => p.presence_ref))
      assert.equal(new Set(refs).size, 2, `both members must see the same two, distinct presence_refs: ${refs}`)

      // B goes away without leaving: its socket closes.
      B.c.realtime.disconnect()
      await until(() => A.events.find((e) => e.event === 'leave'), { what: 'A to see B leave' })
      const leave = A.events.find((e) => e.event === 'leave')
      assert.equal(leave.key, 'bob')
      assert.deepEqual(leave.leftPresences.map(strip), [{ user: 'bob', n: 2 }])
      await until(() => Object.keys(A.ch.presenceState()).length === 1, { what: 'bob gone from presenceState' })
      assert.deepEqual(Object.keys(A.ch.presenceState()), ['alice'])
    } finally {
      await closeClients(A.c, B.c)
    }
  })
}

it('raw V2: track → ok; presence_diff to every subscriber with a generated key for an empty one; update carries phx_ref_prev; untrack → leave', async () => {
  const topic = 'realtime:room-3-raw'
  const cfg = (key) => ({ config: { broadcast: { self: false, ack: false }, presence: { key, enabled: true }, postgres_changes: [], private: false } })
  const a = await RawClient.connect(gw, { vsn: '2.0.0' })
  const b = await RawClient.connect(gw, { vsn: '2.0.0' })
  try {
    const { joinRef: ja } = await a.join(topic, cfg(''))
    await b.join(topic, cfg('bee'))
    await a.next((m) => m.event === 'presence_state')
    await b.next((m) => m.event === 'presence_state')

    const t1 = a.push(topic, 'presence', { type: 'presence', event: 'track', payload: { v: 1 } }, { joinRef: ja })
    assert.deepEqual((await a.reply(topic, t1)).frame, [ja, t1, topic, 'phx_reply', { status: 'ok', response: {} }])

    const diffs = []
    for (const c of [a, b]) {
      const d = await c.next((m) => m.event === 'presence_diff', { what: 'presence_diff' })
      assert.equal(d.join_ref, null)
      assert.equal(d.ref, null)
      diffs.push(d.payload)
    }
    assert.deepEqual(diffs[0], diffs[1], 'both subscribers (tracker included) get the same diff')
    const [key] = Object.keys(diffs[0].joins)
    assert.match(key, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'an empty presence key becomes a UUID')
    assert.deepEqual(diffs[0].leaves, {})
    const [meta1] = diffs[0].joins[key].metas
    assert.equal(typeof meta1.phx_ref, 'string')
    assert.deepEqual({ ...meta1, phx_ref: undefined }, { v: 1, phx_ref: undefined })

    // A changed payload: the new meta carries phx_ref_prev = the old phx_ref.
    const t2 = a.push(topic, 'presence', { type: 'presence', event: 'TRACK', payload: { v: 2 } }, { joinRef: ja })
    assert.equal((await a.reply(topic, t2)).payload.status, 'ok')
    const upd = await b.next((m) => m.event === 'presence_diff', { what: 'update diff' })
    const newMeta = upd.payload.joins[key]?.metas?.[0]
    assert.ok(newMeta, `update diff must re-join ${key}: ${upd.raw}`)
    assert.equal(newMeta.v, 2)
    assert.equal(newMeta.phx_ref_prev, meta1.phx_ref)
    assert.notEqual(newMeta.phx_ref, meta1.phx_ref)

    const t3 = a.push(topic, 'presence', { type: 'presence', event: 'untrack' }, { joinRef: ja })
    assert.equal((await a.reply(topic, t3)).payload.status, 'ok')
    const gone = await b.next((m) => m.event === 'presence_diff' && Object.keys(m.payload.leaves).length > 0, { what: 'leave diff' })
    assert.deepEqual(Object.keys(gone.payload.leaves), [key])
    assert.deepEqual(gone.payload.joins, {})
    assert.equal(gone.payload.leaves[key].metas[0].v, 2)
  } finally {
    a.terminate()
    b.terminate()
  }
})
