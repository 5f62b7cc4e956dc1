// Postgres Changes filters (issue 3, check 2; PROTOCOL.md §5), table-driven, through
// supabase-js 2.119.0. A fixed set of rows is inserted, updated and deleted; every
// binding must receive exactly the rows that match (by id set), both when all bindings
// share one channel and when each binding has its own channel. Each expectation is
// also checked against PostgreSQL itself evaluating the equivalent WHERE clause.
// Bad filters: the join succeeds and a `system` error explains the problem.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, closeSbClients, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { sbClient, subscribe } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'

let env
const clients = []

const SETUP = `
create table orders (id bigint primary key, status text, total numeric, created_at timestamptz);
`

// The rows: numbers chosen so that text comparison would give different answers than
// numeric comparison (7.5 vs 10, 100 vs 7.5), and timestamps so that string comparison
// of the filter value would differ from comparing instants.
const ROWS = [
  [1, 'paid', 5, '2024-01-01T00:00:00Z'],
  [2, 'shipped', 15, '2024-06-01T00:00:00Z'],
  [3, 'pending', 10, '2024-03-01T00:00:00Z'],
  [4, 'paid', 20, '2025-01-01T00:00:00Z'],
  [5, 'cancelled', 7.5, '2023-12-31T00:00:00Z'],
  [6, 'paid', 10.5, '2024-02-15T00:30:00Z'],
  [7, 'shipped', 3, '2024-02-14T23:30:00Z'],
  [8, null, 100, '2024-02-15T00:00:00Z'],
  [9, 'Paid', 50, null],
]

// filter → [expected INSERT ids, equivalent SQL (the oracle)]
const CASES = [
  ['id=eq.1', [1], `id = 1`],
  ['id=neq.1', [2, 3, 4, 5, 6, 7, 8, 9], `id <> 1`],
  ['id=lt.3', [1, 2], `id < 3`],
  ['id=lte.3', [1, 2, 3], `id <= 3`],
  ['status=in.(paid,shipped)', [1, 2, 4, 6, 7], `status in ('paid','shipped')`],
  ['total=gt.10', [2, 4, 6, 8, 9], `total > 10`],
  ['total=gte.10', [2, 3, 4, 6, 8, 9], `total >= 10`],
  ['total=lt.7.5', [1, 7], `total < 7.5`],
  ['status=not.eq.paid', [2, 3, 5, 7, 9], `not (status = 'paid')`],
  ['status=not.in.(paid,shipped)', [3, 5, 9], `not (status in ('paid','shipped'))`],
  ['total=gt.5,status=eq.paid', [4, 6], `total > 5 and status = 'paid'`],
  ['created_at=gt.2024-02-15T01:00:00+01:00', [2, 3, 4, 6], `created_at > '2024-02-15T00:00:00Z'`],
  ['created_at=lte.2024-02-15T00:00:00Z', [1, 5, 7, 8], `created_at <= '2024-02-15T00:00:00Z'`],
  ['status=is.null', [8], `status is null`],
  ['status=ilike.PAID', [1, 4, 6, 9], `status ilike 'PAID'`],
  ['status=like.%ip%', [2, 7], `status like '%ip%'`],
  ['status=isdistinct.paid', [2, 3, 5, 7, 8, 9], `status is distinct from 'paid'`],
  // Issue 10: upstream's regular-expression operators, LIKE's `_` and negation, typed `in`.
  ['status=match.^p', [1, 3, 4, 6], `status ~ '^p'`],
  ['status=imatch.^p', [1, 3, 4, 6, 9], `status ~* '^p'`],
  ['status=not.match.ed$', [1, 3, 4, 6, 9], `not (status ~ 'ed$')`],
  ['status=like.pa_d', [1, 4, 6], `status like 'pa_d'`],
  ['status=not.like.p%', [2, 5, 7, 9], `not (status like 'p%')`],
  ['total=in.(5,7.5,100)', [1, 5, 8], `total in (5, 7.5, 100)`],
  ['status=not.is.null', [1, 2, 3, 4, 5, 6, 7, 9], `status is not null`],
]

// Event-specific bindings: [event, filter, expected ids, SQL oracle or null]
// UPDATEs (ids 3, 5 → paid; id 1 total+1) are filtered on the new row; DELETEs on the
// full old row (this gateway keeps it; PROTOCOL.md §5).
const EVENT_CASES = [
  ['UPDATE', 'status=eq.paid', [1, 3, 5]],
  ['DELETE', 'status=eq.paid', [1, 3, 4, 5, 6]],
  ['INSERT', 'id=eq.1', [1]],
  ['DELETE', 'id=in.(2,8)', [2, 8]],
]

before(async () => {
  env = await startChangesEnv({ name: 'changes-filters', setupSql: SETUP })
  await env.db.query(`select realtime_gateway.enable('public.orders')`)
  await waitLive(env.gw, 'orders')
})

after(async () => {
  await closeSbClients(clients)
  if (env) await env.stop()
})

const gwOf = () => env?.gw

test('the expected id sets agree with PostgreSQL evaluating the same conditions', async () => {
  const db = await env.pg.connect(env.dbName)
  try {
    await db.query(`create temp table oracle (like orders)`)
    for (const r of ROWS) await db.query(`insert into oracle values ($1, $2, $3, $4)`, r)
    for (const [filter, expected, sql] of CASES) {
      const { rows } = await db.query(`select id from oracle where ${sql} order by id`)
      assert.deepEqual(rows.map((r) => Number(r.id)), expected, `oracle for ${filter}`)
    }
  } finally {
    await db.end()
  }
})

test(
  'each filter delivers exactly the matching rows (one channel with all bindings, and one channel per binding)',
  withLog(gwOf, async () => {
    const sb = sbClient(env.gw)
    clients.push(sb)
    const bindings = [
      ...CASES.map(([filter]) => ({ key: `* ${filter}`, b: { event: '*', schema: 'public', table: 'orders', filter } })),
      ...EVENT_CASES.map(([event, filter]) => ({ key: `${event} ${filter}`, b: { event, schema: 'public', table: 'orders', filter } })),
    ]
    // got[mode][key] = [[eventType, id], ...]
    const got = { shared: {}, own: {} }
    const all = []
    const system = { shared: [], own: {} }

    let shared = sb.channel('filters-shared')
    for (const { key, b } of bindings) {
      got.shared[key] = []
      shared = shared.on('postgres_changes', b, (p) => got.shared[key].push([p.eventType, (p.eventType === 'DELETE' ? p.old : p.new).id]))
    }
    shared = shared
      .on('postgres_changes', { event: '*', schema: 'public', table: 'orders' }, (p) => all.push(p))
      .on('system', {}, (p) => system.shared.push(p))
    const subs = [await subscribe(shared, { timeoutMs: 10000 })]

    let i = 0
    for (const { key, b } of bindings) {
      got.own[key] = []
      system.own[key] = []
      const ch = sb
        .channel(`filters-own-${i++}`)
        .on('postgres_changes', b, (p) => got.own[key].push([p.eventType, (p.eventType === 'DELETE' ? p.old : p.new).id]))
        .on('system', {}, (p) => system.own[key].push(p))
      subs.push(await subscribe(ch, { timeoutMs: 10000 }))
    }
    await until(() => system.shared.length >= 1 && Object.values(system.own).every((s) => s.length >= 1), {
      timeoutMs: 10000,
      what: 'a system message on every channel',
    })
    assert.deepEqual(
      system.shared.map((m) => [m.status, m.message]),
      [['ok', 'Subscribed to PostgreSQL']],
    )
    for (const [key, msgs] of Object.entries(system.own)) {
      assert.deepEqual(msgs.map((m) => [m.status, m.message]), [['ok', 'Subscribed to PostgreSQL']], `system on the channel for ${key}`)
    }

    for (const r of ROWS) await env.db.query(`insert into orders values ($1, $2, $3, $4)`, r)
    await env.db.query(`update orders set status = 'paid' where id in (3, 5)`)
    await env.db.query(`update orders set total = total + 1 where id = 1`)
    await env.db.query(`delete from orders`)
    const total = ROWS.length + 3 + ROWS.length
    await until(() => all.length >= total, { timeoutMs: 15000, what: `${total} events on the catch-all binding (have ${all.length})` })
    await sleep(500)
    assert.equal(all.length, total)

    const ids = (list, type) => list.filter(([t]) => t === type).map(([, id]) => id).sort((a, b) => a - b)
    const failures = []
    for (const mode of ['shared', 'own']) {
      for (const [filter, expected] of CASES) {
        const list = got[mode][`* ${filter}`]
        const actual = ids(list, 'INSERT')
        if (JSON.stringify(actual) !== JSON.stringify(expected)) failures.push(`${mode} * ${filter}: INSERT ids ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`)
      }
      for (const [event, filter, expected] of EVENT_CASES) {
        const list = got[mode][`${event} ${filter}`]
        const others = list.filter(([t]) => t !== event)
        if (others.length) failures.push(`${mode} ${event} ${filter}: received other events ${JSON.stringify(others)}`)
        const actual = ids(list, event)
        if (JSON.stringify(actual) !== JSON.stringify(expected)) failures.push(`${mode} ${event} ${filter}: ids ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`)
      }
    }
    assert.deepEqual(failures, [])
    for (const s of subs) assert.deepEqual(s.statuses, ['SUBSCRIBED'])
  }),
)

/** Upstream's wording for a subscription its database-side check refused. */
const exception = (filter, detail) =>
  `Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [event: *, schema: public, table: orders, filters: [${filter}]]. Exception: ${detail}`

test(
  'bad filters: the join succeeds (SUBSCRIBED) and a system error explains the filter',
  withLog(gwOf, async () => {
    const sb = sbClient(env.gw)
    clients.push(sb)
    const cases = [
      ['status=foo.bar', (m) => assert.equal(m, 'Error parsing `filter` params: ["foo", "bar"]')],
      ['nosuchcol=eq.1', (m) => assert.match(m, /invalid column for filter nosuchcol/)],
      ['status=in.paid', (m) => assert.match(m, /^Error parsing `filter` params: .*`in` filter value must be wrapped by parentheses/)],
      // Issue 10: checked at join against the column's type, with upstream's messages
      // (a value that can never match is an error, not a silent subscription).
      ['id=eq.abc', (m) => assert.equal(m, exception('id=eq.abc', 'invalid input syntax for type bigint: "abc"'))],
      ['id=in.(1,2,x)', (m) => assert.equal(m, exception('id=in.(1,2,x)', 'invalid input syntax for type bigint: "x"'))],
      ['total=like.1%', (m) => assert.equal(m, exception('total=like.1%', 'operator like requires a text-compatible column type, got numeric'))],
      ['id=is.true', (m) => assert.equal(m, exception('id=is.true', 'is true filter requires a boolean column, got bigint'))],
      ['status=match.(', (m) => assert.match(m, /\. Exception: invalid regular expression for match filter: invalid regular expression: .+$/)],
      [`id=in.(${Array.from({ length: 101 }, (_, i) => i).join(',')})`, (m) => assert.match(m, /\. Exception: too many values for `in` filter\. Maximum 100$/)],
    ]
    let n = 0
    for (const [filter, check] of cases) {
      const system = []
      const events = []
      const ch = sb
        .channel(`bad-${n++}`)
        .on('postgres_changes', { event: '*', schema: 'public', table: 'orders', filter }, (p) => events.push(p))
        .on('system', {}, (p) => system.push(p))
      const sub = await subscribe(ch, { timeoutMs: 10000 })
      await until(() => system.length >= 1, { timeoutMs: 10000, what: `system message for ${filter}` })
      await env.db.query(`insert into orders values (100 + $1, 'paid', 1, now())`, [n])
      await sleep(400)
      assert.equal(system.length, 1, `one system message for ${filter}: ${JSON.stringify(system)}`)
      assert.equal(system[0].status, 'error', `${filter}: ${JSON.stringify(system[0])}`)
      assert.equal(system[0].extension, 'postgres_changes')
      check(system[0].message)
      assert.deepEqual(events, [], `no events for the bad filter ${filter}`)
      assert.deepEqual(sub.statuses, ['SUBSCRIBED'], `join for ${filter} still succeeds`)
    }
  }),
)

test(
  'SQL metacharacters in filter values, columns and table names are plain names and values',
  withLog(gwOf, async () => {
    const sb = sbClient(env.gw)
    clients.push(sb)
    const got = { quote: [], like: [] }
    const system = []
    const ch = sb
      .channel('sql-meta')
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'orders', filter: `status=eq.x'; drop table orders; --` }, (p) => got.quote.push(p.new.id))
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'orders', filter: `status=like.%'; drop table%` }, (p) => got.like.push(p.new.id))
      .on('system', {}, (p) => system.push(p))
    await subscribe(ch)
    await until(() => system.length >= 1, { what: 'the subscription' })
    assert.deepEqual(system.map((m) => [m.status, m.message]), [['ok', 'Subscribed to PostgreSQL']])
    const bad = []
    const ch2 = sb
      .channel('sql-meta-bad')
      .on('postgres_changes', { event: '*', schema: 'public', table: 'orders; drop table orders' }, () => {})
      .on('postgres_changes', { event: '*', schema: 'public', table: 'orders', filter: `"id; drop table orders"=eq.1` }, () => {})
      .on('system', {}, (p) => bad.push(p))
    await subscribe(ch2)
    await until(() => bad.length >= 1, { what: 'the refusal' })
    assert.equal(bad[0].status, 'error')
    await env.db.query(`insert into orders values (301, $1, 1, now()), (302, 'plain', 1, now())`, [`x'; drop table orders; --`])
    await until(() => got.quote.length >= 1 && got.like.length >= 1, { what: 'the quoted rows' })
    await sleep(300)
    assert.deepEqual(got, { quote: [301], like: [301] })
    const { rows } = await env.db.query(`select count(*)::int as n from orders where id in (301, 302)`)
    assert.equal(rows[0].n, 2, 'the table is intact')
    await env.db.query(`delete from orders where id in (301, 302)`)
  }),
)
