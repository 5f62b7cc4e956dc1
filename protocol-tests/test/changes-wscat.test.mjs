// wscat-style Postgres Changes (issue 3, check 3; README "wscat walk-through"): raw V1
// frames, a phx_join WITHOUT a config payload on realtime:<schema>:<table>,
// realtime:<schema>, realtime:<schema>:<table>:<filter> or realtime:* subscribes to those
// changes; the reply is {status:"ok",response:{}}; events are `postgres_changes` frames whose
// payload is the bare data object, in commit order. A join WITH a config and no
// postgres_changes subscribes to nothing, whatever the topic is called.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sleep, until } from '../lib/util.mjs'

let env
const sockets = []

const SETUP = `
create table orders (id bigint primary key, status text, total numeric, created_at timestamptz default '2024-05-06T07:08:09.5+02');
create table items (id int primary key, name text);
create schema app;
create table app.things (id int primary key, label text);
-- Outside public, the anon key reads what the schema owner grants (as on Supabase).
grant usage on schema app to anon;
grant select on app.things to anon;
`

before(async () => {
  env = await startChangesEnv({ name: 'changes-wscat', setupSql: SETUP })
  for (const t of ['public.orders', 'public.items', 'app.things']) await env.db.query(`select realtime_gateway.enable($1)`, [t])
  await waitLive(env.gw, 'orders')
  await waitLive(env.gw, 'items')
  await waitLive(env.gw, 'things', { schema: 'app' })
})

after(async () => {
  for (const s of sockets) s.close()
  if (env) await env.stop()
})

const gwOf = () => env?.gw

const ORDER_COLUMNS = [
  { name: 'id', type: 'int8' },
  { name: 'status', type: 'text' },
  { name: 'total', type: 'numeric' },
  { name: 'created_at', type: 'timestamptz' },
]
const TS = '2024-05-06T05:08:09.5+00:00'
const o1 = { id: 1, status: 'new', total: 9.99, created_at: TS }
const o2 = { id: 2, status: 'new', total: 100, created_at: TS }
const o1b = { ...o1, status: 'paid' }
const orderInsert1 = { schema: 'public', table: 'orders', type: 'INSERT', columns: ORDER_COLUMNS, record: o1, errors: null }
const orderInsert2 = { schema: 'public', table: 'orders', type: 'INSERT', columns: ORDER_COLUMNS, record: o2, errors: null }
const orderUpdate1 = { schema: 'public', table: 'orders', type: 'UPDATE', columns: ORDER_COLUMNS, record: o1b, old_record: o1, errors: null }
const orderDelete2 = { schema: 'public', table: 'orders', type: 'DELETE', columns: ORDER_COLUMNS, old_record: o2, errors: null }
const itemInsert = {
  schema: 'public',
  table: 'items',
  type: 'INSERT',
  columns: [
    { name: 'id', type: 'int4' },
    { name: 'name', type: 'text' },
  ],
  record: { id: 1, name: 'widget' },
  errors: null,
}
const thingInsert = {
  schema: 'app',
  table: 'things',
  type: 'INSERT',
  columns: [
    { name: 'id', type: 'int4' },
    { name: 'label', type: 'text' },
  ],
  record: { id: 1, label: 'x' },
  errors: null,
}

// The changes, in commit order.
const WRITES = [
  `insert into orders (id, status, total) values (1, 'new', 9.99)`,
  `insert into items values (1, 'widget')`,
  `insert into orders (id, status, total) values (2, 'new', 100)`,
  `insert into app.things values (1, 'x')`,
  `update orders set status = 'paid' where id = 1`,
  `delete from orders where id = 2`,
]

// topic → the data objects it must receive, in order
const TOPICS = [
  ['realtime:public:orders', [orderInsert1, orderInsert2, orderUpdate1, orderDelete2]],
  ['realtime:public', [orderInsert1, itemInsert, orderInsert2, orderUpdate1, orderDelete2]],
  ['realtime:public:orders:id=eq.1', [orderInsert1, orderUpdate1]],
  ['realtime:*', [orderInsert1, itemInsert, orderInsert2, thingInsert, orderUpdate1, orderDelete2]],
  ['realtime:app:things', [thingInsert]],
]

const COMMIT_TS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/

test(
  'V1 joins without config on table / schema / filter / * topics receive INSERT, UPDATE, DELETE in order as bare data',
  withLog(gwOf, async () => {
    // One socket per topic, half with an explicit vsn=1.0.0 and half with no vsn (wscat).
    const subs = []
    let k = 0
    for (const [topic, expected] of TOPICS) {
      const c = await RawClient.connect(env.gw, { vsn: k++ % 2 ? '1.0.0' : null })
      sockets.push(c)
      c.push(topic, 'phx_join', {}, { ref: '1' })
      const reply = await c.reply(topic, '1')
      assert.deepEqual(reply.frame, { topic, event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: '1' }, `join reply on ${topic}`)
      const sys = await c.next((m) => m.event === 'system', { timeoutMs: 10000, what: `system on ${topic}` })
      assert.deepEqual(
        sys.frame,
        {
          topic,
          event: 'system',
          payload: { channel: topic.slice('realtime:'.length), extension: 'postgres_changes', message: 'Subscribed to PostgreSQL', status: 'ok' },
          ref: null,
        },
        `system message on ${topic}`,
      )
      subs.push({ c, topic, expected })
    }
    for (const w of WRITES) await env.db.query(w)
    for (const { c, topic, expected } of subs) {
      await until(() => c.inbox.length >= expected.length, { timeoutMs: 10000, what: `${expected.length} events on ${topic} (inbox ${c.dumpInbox()})` })
    }
    await sleep(400)
    for (const { c, topic, expected } of subs) {
      assert.equal(c.inbox.length, expected.length, `${topic}: ${c.dumpInbox(20)}`)
      let prev = 0
      c.inbox.forEach((m, i) => {
        assert.equal(m.proto, 1, `${topic}: V1 object frame`)
        assert.deepEqual(Object.keys(m.frame).sort(), ['event', 'payload', 'ref', 'topic'])
        assert.equal(m.frame.topic, topic)
        assert.equal(m.frame.event, 'postgres_changes', `${topic} frame ${i}: ${m.raw}`)
        assert.equal(m.frame.ref, null)
        const { commit_timestamp, ...data } = m.payload
        assert.match(commit_timestamp, COMMIT_TS)
        assert.ok(Date.parse(commit_timestamp) >= prev, 'commit order')
        prev = Date.parse(commit_timestamp)
        assert.deepEqual(data, expected[i], `${topic} event ${i}`)
      })
    }
  }),
)

test(
  'a join WITH a config and no postgres_changes subscribes to no table, whatever the topic is called',
  withLog(gwOf, async () => {
    const c = await RawClient.connect(env.gw, { vsn: '1.0.0' })
    sockets.push(c)
    for (const [i, topic] of ['realtime:public:items', 'realtime:*'].entries()) {
      const ref = String(10 + i)
      c.push(topic, 'phx_join', { config: { broadcast: { self: false }, presence: { key: '', enabled: false }, private: false } }, { ref, joinRef: ref })
      const reply = await c.reply(topic, ref)
      assert.equal(reply.payload.status, 'ok', reply.raw)
    }
    await env.db.query(`insert into items values (2, 'gadget')`)
    await sleep(700)
    assert.deepEqual(
      c.inbox.filter((m) => m.event === 'postgres_changes' || m.event === 'system').map((m) => m.raw),
      [],
    )
  }),
)

test(
  'a V1 join without config on a table that is not enabled: join ok, then a system error (not silence)',
  withLog(gwOf, async () => {
    await env.db.query(`create table if not exists quiet (id int primary key)`)
    const c = await RawClient.connect(env.gw, { vsn: null })
    sockets.push(c)
    const topic = 'realtime:public:quiet'
    c.push(topic, 'phx_join', {}, { ref: '1' })
    const reply = await c.reply(topic, '1')
    assert.deepEqual(reply.payload, { status: 'ok', response: {} })
    const sys = await c.next((m) => m.event === 'system', { timeoutMs: 10000, what: `system on ${topic}` })
    assert.equal(sys.payload.status, 'error', sys.raw)
    assert.equal(sys.payload.extension, 'postgres_changes')
    assert.match(sys.payload.message, /realtime_gateway\.enable\('public\.quiet'\)/)
  }),
)
