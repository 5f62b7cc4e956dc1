// Postgres Changes through the real supabase-js 2.119.0 client (issue 3, checks 1 and 6):
// INSERT/UPDATE/DELETE arrive as supabase-js builds them (eventType/new/old, typed values),
// the channel reaches SUBSCRIBED with the "Subscribed to PostgreSQL" system message and no
// binding mismatch, a binding on a table that is not enabled gets a system error (not
// silence), and tables enabled through the supabase_realtime publication or REST stream.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, closeSbClients, rawPgSubscribe, waitLive } from '../lib/changes-env.mjs'
import { RawClient } from '../lib/raw.mjs'
import { withLog } from '../lib/gateway.mjs'
import { signHS256 } from '../lib/jwt.mjs'
import { sbClient, subscribe } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'

let env
const clients = []

const SETUP = `
create publication supabase_realtime;
create table orders (
  id bigint primary key,
  status text not null,
  total numeric(10,2),
  qty int,
  paid boolean,
  meta jsonb,
  tags text[],
  scores int[],
  created_at timestamptz,
  note text
);
create table secure (id int primary key, secret text, n int);
alter table secure enable row level security;
create policy anyone on secure for select using (true);
create table not_enabled (id int primary key, v text);
create table t2 (id int primary key, v text);
create table t3 (id int primary key, v text);
create table fresh0 (id int primary key, v text);
create table fresh1 (id int primary key, v text);
create table fresh2 (id int primary key, v text);
create table fresh3 (id int primary key, v text);
create table fresh4 (id int primary key, v text);
create table fresh5 (id int primary key, v text);
create table fresh6 (id int primary key, v text);
create table fresh7 (id int primary key, v text);

`

before(async () => {
  env = await startChangesEnv({ name: 'changes-supabase', setupSql: SETUP })
  await env.db.query(`select realtime_gateway.enable('public.orders')`)
  await env.db.query(`select realtime_gateway.enable('public.secure')`)
  // enable() has committed, but the gateway learns of it asynchronously (see the
  // "subscribe right after enabling" test); wait for that here so the other tests do not race.
  await waitLive(env.gw, 'orders')
  await waitLive(env.gw, 'secure')
})

after(async () => {
  await closeSbClients(clients)
  if (env) await env.stop()
})

const gwOf = () => env?.gw

const SUBSCRIBED_MSG = (channel) => ({
  channel,
  extension: 'postgres_changes',
  message: 'Subscribed to PostgreSQL',
  status: 'ok',
})

const COMMIT_TS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/

/** A supabase-js channel with one postgres_changes binding (plus a system listener); waits for SUBSCRIBED. */
async function pgChannel(name, binding) {
  const sb = sbClient(env.gw)
  clients.push(sb)
  const events = []
  const system = []
  const ch = sb
    .channel(name)
    .on('postgres_changes', binding, (p) => events.push(p))
    .on('system', {}, (p) => system.push(p))
  const sub = await subscribe(ch, { timeoutMs: 10000 })
  return { sb, ch, events, system, sub }
}

test(
  'supabase-js receives INSERT, UPDATE, DELETE with typed new/old; SUBSCRIBED + "Subscribed to PostgreSQL"',
  withLog(gwOf, async () => {
    const { events, system, sub } = await pgChannel('orders-all', { event: '*', schema: 'public', table: 'orders' })
    await until(() => system.length >= 1, { timeoutMs: 10000, what: 'a system message on orders-all' })
    assert.deepEqual(system[0], SUBSCRIBED_MSG('orders-all'))

    const before = Date.now()
    await env.db.query(
      `insert into orders values
        (1, 'paid', 12.5, 3, true, '{"a":{"b":[1,2,null]},"s":"x","f":1.25}', '{red,"blue green"}', '{1,2,3}',
         '2024-01-02 03:04:05.123456+00', 'héllo "quoted" \\ line')`,
    )
    await env.db.query(`update orders set status = 'shipped', paid = false, note = null, qty = qty + 1 where id = 1`)
    await env.db.query(`delete from orders where id = 1`)
    await until(() => events.length >= 3, { timeoutMs: 10000, what: '3 postgres_changes callbacks' })
    await sleep(300) // nothing more may follow
    const after = Date.now()

    const row1 = {
      id: 1,
      status: 'paid',
      total: 12.5,
      qty: 3,
      paid: true,
      meta: { a: { b: [1, 2, null] }, s: 'x', f: 1.25 },
      tags: ['red', 'blue green'],
      scores: [1, 2, 3],
      created_at: '2024-01-02T03:04:05.123456+00:00',
      note: 'héllo "quoted" \\ line',
    }
    const row2 = { ...row1, status: 'shipped', paid: false, note: null, qty: 4 }

    assert.equal(events.length, 3, `exactly 3 callbacks, got ${JSON.stringify(events)}`)
    assert.deepEqual(events.map((e) => e.eventType), ['INSERT', 'UPDATE', 'DELETE'])
    const strip = ({ commit_timestamp, ...rest }) => rest
    assert.deepEqual(strip(events[0]), { schema: 'public', table: 'orders', eventType: 'INSERT', new: row1, old: {}, errors: null })
    assert.deepEqual(strip(events[1]), { schema: 'public', table: 'orders', eventType: 'UPDATE', new: row2, old: row1, errors: null })
    assert.deepEqual(strip(events[2]), { schema: 'public', table: 'orders', eventType: 'DELETE', new: {}, old: row2, errors: null })
    let prev = 0
    for (const e of events) {
      assert.match(e.commit_timestamp, COMMIT_TS)
      const t = Date.parse(e.commit_timestamp)
      assert.ok(t >= before - 2000 && t <= after + 2000, `commit_timestamp ${e.commit_timestamp} not near now`)
      assert.ok(t >= prev, 'commit timestamps in commit order')
      prev = t
    }
    assert.deepEqual(system, [SUBSCRIBED_MSG('orders-all')], 'exactly one system message')
    assert.deepEqual(sub.statuses, ['SUBSCRIBED'], 'no CHANNEL_ERROR / CLOSED')
  }),
)

test(
  'event filter: an INSERT-only and a DELETE-only binding on one channel each get their own events',
  withLog(gwOf, async () => {
    const sb = sbClient(env.gw)
    clients.push(sb)
    const ins = []
    const del = []
    const system = []
    const ch = sb
      .channel('orders-split')
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'orders' }, (p) => ins.push(p))
      .on('postgres_changes', { event: 'DELETE', schema: 'public', table: 'orders' }, (p) => del.push(p))
      .on('system', {}, (p) => system.push(p))
    const sub = await subscribe(ch, { timeoutMs: 10000 })
    await until(() => system.length >= 1, { timeoutMs: 10000, what: 'system message' })
    assert.deepEqual(system[0], SUBSCRIBED_MSG('orders-split'))
    await env.db.query(`insert into orders (id, status) values (10, 'new')`)
    await env.db.query(`update orders set status = 'paid' where id = 10`)
    await env.db.query(`delete from orders where id = 10`)
    await until(() => del.length >= 1, { timeoutMs: 10000, what: 'the DELETE callback' })
    await sleep(300)
    assert.deepEqual(ins.map((e) => [e.eventType, e.new.id, e.new.status]), [['INSERT', 10, 'new']])
    assert.deepEqual(del.map((e) => [e.eventType, e.old.id, e.old.status]), [['DELETE', 10, 'paid']])
    assert.deepEqual(sub.statuses, ['SUBSCRIBED'])
  }),
)

test(
  'a table with RLS enabled: DELETE old carries only the primary key, UPDATE old the full row',
  withLog(gwOf, async () => {
    const { events, sub } = await pgChannel('secure', { event: '*', schema: 'public', table: 'secure' })
    await env.db.query(`insert into secure values (7, 's3cret', 1)`)
    await env.db.query(`update secure set n = 2 where id = 7`)
    await env.db.query(`delete from secure where id = 7`)
    await until(() => events.length >= 3, { timeoutMs: 10000, what: '3 callbacks on secure' })
    assert.deepEqual(
      events.map((e) => [e.eventType, e.new, e.old]),
      [
        ['INSERT', { id: 7, secret: 's3cret', n: 1 }, {}],
        ['UPDATE', { id: 7, secret: 's3cret', n: 2 }, { id: 7, secret: 's3cret', n: 1 }],
        ['DELETE', {}, { id: 7 }],
      ],
    )
    assert.deepEqual(sub.statuses, ['SUBSCRIBED'])
  }),
)

test(
  'a binding on a table that is not enabled gets a system error, not silence (join still SUBSCRIBED)',
  withLog(gwOf, async () => {
    for (const [name, table] of [
      ['off-table', 'not_enabled'],
      ['missing-table', 'no_such_table'],
    ]) {
      const { events, system, sub } = await pgChannel(name, { event: '*', schema: 'public', table })
      await until(() => system.length >= 1, { timeoutMs: 10000, what: `a system message on ${name}` })
      if (table === 'not_enabled') await env.db.query(`insert into not_enabled values (1, 'x')`)
      await sleep(700)
      assert.equal(system.length, 1, `exactly one system message on ${name}: ${JSON.stringify(system)}`)
      const m = system[0]
      assert.deepEqual(
        { channel: m.channel, extension: m.extension, status: m.status },
        { channel: name, extension: 'postgres_changes', status: 'error' },
        `system error on ${name}: ${JSON.stringify(m)}`,
      )
      assert.match(m.message, /enable/i, 'the message says how to enable the table')
      assert.ok(m.message.includes(`public.${table}`), `the message names public.${table}: ${m.message}`)
      assert.notEqual(m.message, 'Subscribed to PostgreSQL')
      assert.deepEqual(events, [], 'no events for a table that is not enabled')
      assert.deepEqual(sub.statuses, ['SUBSCRIBED'], 'the join itself succeeds')
    }
  }),
)

test(
  'publication compatibility: alter publication supabase_realtime add table t2 enables it; drop table disables it',
  withLog(gwOf, async () => {
    await env.db.query(`alter publication supabase_realtime add table t2`)
    // The periodic publication sync picks it up (every second; later on a busy machine).
    await waitLive(env.gw, 't2')
    const { events, system, sub } = await pgChannel('t2', { event: '*', schema: 'public', table: 't2' })
    await until(() => system.length >= 1, { timeoutMs: 10000, what: 'system message on t2' })
    assert.deepEqual(system, [SUBSCRIBED_MSG('t2')])
    await env.db.query(`insert into t2 values (1, 'one')`)
    await env.db.query(`update t2 set v = 'uno' where id = 1`)
    await until(() => events.length >= 2, { timeoutMs: 10000, what: '2 events on t2' })
    assert.deepEqual(
      events.map((e) => [e.eventType, e.new, e.old]),
      [
        ['INSERT', { id: 1, v: 'one' }, {}],
        ['UPDATE', { id: 1, v: 'uno' }, { id: 1, v: 'one' }],
      ],
    )
    assert.deepEqual(sub.statuses, ['SUBSCRIBED'])

    await env.db.query(`alter publication supabase_realtime drop table t2`)
    await waitLive(env.gw, 't2', { status: 'error' })
    const later = await pgChannel('t2-after-drop', { event: '*', schema: 'public', table: 't2' })
    await until(() => later.system.length >= 1, { timeoutMs: 10000, what: 'system message on t2-after-drop' })
    assert.equal(later.system[0].status, 'error', `t2 removed from the publication is disabled: ${JSON.stringify(later.system[0])}`)
    await env.db.query(`insert into t2 values (2, 'two')`)
    await sleep(500)
    assert.deepEqual(later.events, [])
  }),
)

test(
  'REST POST /api/realtime/tables/public.t3 (service_role) enables the table for a later subscriber',
  withLog(gwOf, async () => {
    const token = signHS256({ iss: 'supabase-demo', role: 'service_role', exp: 4102444800 })
    const r = await fetch(`${env.gw.url}/api/realtime/tables/public.t3`, { method: 'POST', headers: { authorization: `Bearer ${token}` } })
    const body = await r.json()
    assert.equal(r.status, 200, JSON.stringify(body))
    assert.deepEqual(body, { schema: 'public', table: 't3', enabled: true })
    await waitLive(env.gw, 't3') // the immediate case is the "subscribe right after enabling" test
    const { events, system } = await pgChannel('t3', { event: 'INSERT', schema: 'public', table: 't3' })
    await until(() => system.length >= 1, { timeoutMs: 10000, what: 'system message on t3' })
    assert.deepEqual(system, [SUBSCRIBED_MSG('t3')])
    await env.db.query(`insert into t3 values (5, 'five')`)
    await until(() => events.length >= 1, { timeoutMs: 10000, what: 'INSERT on t3' })
    assert.deepEqual(events[0].new, { id: 5, v: 'five' })

    const unknown = await fetch(`${env.gw.url}/api/realtime/tables/public.no_such_table`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}` },
    })
    assert.equal(unknown.status, 404, `unknown table: ${await unknown.text()}`)
  }),
)

test(
  'subscribe right after enabling (SQL enable() committed / REST POST answered 200): "Subscribed", not "not enabled"',
  withLog(gwOf, async () => {
    const token = signHS256({ iss: 'supabase-demo', role: 'service_role', exp: 4102444800 })
    const c = await RawClient.connect(env.gw, { vsn: '2.0.0' })
    const got = []
    try {
      for (let i = 0; i < 8; i++) {
        const table = `fresh${i}`
        const how = i % 2 === 0 ? 'sql' : 'rest'
        if (how === 'sql') await env.db.query(`select realtime_gateway.enable('public.${table}')`)
        else {
          const r = await fetch(`${env.gw.url}/api/realtime/tables/public.${table}`, { method: 'POST', headers: { authorization: `Bearer ${token}` } })
          assert.equal(r.status, 200, await r.text())
        }
        const s = await rawPgSubscribe(env.gw, `realtime:${table}`, [{ event: '*', schema: 'public', table }], { client: c })
        got.push(`${how} ${table}: ${s.system.payload.status} ${s.system.payload.message.slice(0, 60)}`)
      }
    } finally {
      c.close()
    }
    const expected = got.map((g) => g.replace(/: .*/, ': ok Subscribed to PostgreSQL'))
    assert.deepEqual(got, expected)
  }),
)
