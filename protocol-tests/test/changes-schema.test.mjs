// Schema changes while subscribed (issue 9, check 4 and the TRUNCATE part of check 3),
// through the gateway binary with raw-frame and supabase-js 2.119.0 subscribers:
// TRUNCATE → a `system` message to that table's subscribers only, in order with the
// changes around it; ADD/DROP/RENAME COLUMN take effect from the next change on (a filter
// on a dropped or renamed column never matches again, no phantom NULLs); a renamed table
// keeps routing (by oid) and is reported under its new name; a dropped table sends its
// subscribers a `system` error. Upstream (WAL + walrus) never delivers TRUNCATE and goes
// silent on a dropped table; these messages are this gateway's (PROTOCOL.md, README).
//
// Absence is shown load-independently: a later positive marker on the same channel
// (changes of one channel arrive in commit order) must arrive first.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, closeSbClients, rawPgSubscribe, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { sbClient, subscribe } from '../lib/supabase.mjs'
import { until } from '../lib/util.mjs'

let env
const clients = []
const raws = []

const TABLES = ['trunc', 'trunc_other', 'shape', 'ren', 'ren_alter', 'gone', 'gone_other']
const SETUP = `
create table trunc (id int primary key, v text);
create table trunc_other (id int primary key, v text);
create table shape (id int primary key, a text, b text, c text);
create table ren (id int primary key, v text);
create table ren_alter (id int primary key, v text);
create table gone (id int primary key, v text);
create table gone_other (id int primary key, v text);
`

before(async () => {
  env = await startChangesEnv({ name: 'changes-schema', setupSql: SETUP })
  for (const t of TABLES) await env.db.query(`select realtime_gateway.enable($1)`, [`public.${t}`])
  await Promise.all(TABLES.map((t) => waitLive(env.gw, t)))
})

after(async () => {
  for (const c of raws) c.close()
  await closeSbClients(clients)
  if (env) await env.stop()
})

const gwOf = () => env?.gw
const TS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/

/**
 * A raw V2 subscriber: `frames()` are the postgres_changes and system frames on its topic
 * after "Subscribed to PostgreSQL", as [kind, payload]; `ids[i]` is binding i's id.
 */
async function rawSub(name, bindings) {
  const topic = `realtime:${name}`
  const s = await rawPgSubscribe(env.gw, topic, bindings)
  raws.push(s.client)
  assert.deepEqual([s.system.payload.status, s.system.payload.message], ['ok', 'Subscribed to PostgreSQL'], `${name} subscribed`)
  const ids = s.reply.payload.response.postgres_changes.map((b) => b.id)
  const frames = () =>
    s.client.log
      .filter((m) => m.topic === topic && (m.event === 'postgres_changes' || m.event === 'system') && m !== s.system)
      .map((m) => [m.event === 'system' ? 'system' : 'change', m.payload])
  const changes = () => frames().filter(([k]) => k === 'change').map(([, p]) => p)
  const rowIds = () => changes().map((p) => (p.data.record ?? p.data.old_record).id)
  return { name, topic, ids, frames, changes, rowIds }
}

/** Waits until `sub` has received the change of row `id` (by any binding). */
const waitRow = (sub, id) => until(() => sub.rowIds().includes(id), { what: `row ${id} at ${sub.name} (have ${JSON.stringify(sub.rowIds())})` })

const sysMsg = (sub) => sub.frames().filter(([k]) => k === 'system').map(([, p]) => p)

test(
  'TRUNCATE: every subscriber of the table gets the system message in order, others nothing, later changes still arrive',
  withLog(gwOf, async () => {
    const all = await rawSub('trunc-all', [{ event: '*', schema: 'public', table: 'trunc' }])
    // Whatever its event and filter, a binding on the table is told.
    const filtered = await rawSub('trunc-filtered', [{ event: 'INSERT', schema: 'public', table: 'trunc', filter: 'id=eq.2' }])
    const other = await rawSub('trunc-other', [{ event: '*', schema: 'public', table: 'trunc_other' }])
    const sb = sbClient(env.gw)
    clients.push(sb)
    const sbSeen = []
    const sbCh = sb
      .channel('trunc-sb')
      .on('postgres_changes', { event: '*', schema: 'public', table: 'trunc' }, (p) => sbSeen.push(['change', p.eventType, p.new?.id]))
      .on('system', {}, (p) => sbSeen.push(['system', p]))
    const sbSub = await subscribe(sbCh)
    await until(() => sbSeen.length >= 1, { what: 'supabase-js Subscribed to PostgreSQL' })

    await env.db.query(`insert into trunc values (1, 'x')`)
    await env.db.query(`truncate trunc`)
    await env.db.query(`insert into trunc values (2, 'y')`)
    await env.db.query(`insert into trunc_other values (10, 'marker')`)
    await waitRow(all, 2)
    await waitRow(filtered, 2)
    await waitRow(other, 10)
    await until(() => sbSeen.some(([k, , id]) => k === 'change' && id === 2), { what: 'row 2 at supabase-js' })

    const checkTruncate = (p, channel) => {
      assert.deepEqual(Object.keys(p).sort(), ['channel', 'extension', 'message', 'status'])
      assert.equal(p.extension, 'postgres_changes')
      assert.equal(p.status, 'ok')
      assert.equal(p.channel, channel)
      const m = /^Table public\.trunc was truncated \(TRUNCATE at (.+)\): every row was deleted$/.exec(p.message)
      assert.ok(m, `truncate message: ${p.message}`)
      assert.match(m[1], TS)
    }
    const fa = all.frames()
    assert.deepEqual(fa.map(([k, p]) => (k === 'change' ? `${p.data.type} ${p.data.record.id}` : 'system')), ['INSERT 1', 'system', 'INSERT 2'])
    checkTruncate(fa[1][1], 'trunc-all')
    const ff = filtered.frames()
    assert.deepEqual(ff.map(([k, p]) => (k === 'change' ? `${p.data.type} ${p.data.record.id}` : 'system')), ['system', 'INSERT 2'])
    checkTruncate(ff[0][1], 'trunc-filtered')
    // The other table's subscriber: its marker, nothing about trunc.
    assert.deepEqual(other.frames().map(([k, p]) => (k === 'change' ? `${p.data.table} ${p.data.record.id}` : `system ${p.message}`)), ['trunc_other 10'])
    // supabase-js hands the system message to `.on('system')`, between the two INSERTs.
    const order = sbSeen.slice(1).map(([k, a, b]) => (k === 'change' ? `${a} ${b}` : 'system'))
    assert.deepEqual(order, ['INSERT 1', 'system', 'INSERT 2'])
    checkTruncate(sbSeen.find(([k], i) => i > 0 && k === 'system')[1], 'trunc-sb')
    assert.deepEqual(sbSub.statuses, ['SUBSCRIBED'])
  }),
)

test(
  'ADD/DROP/RENAME COLUMN: columns and record follow; filters on a dropped or renamed column never match again',
  withLog(gwOf, async () => {
    const all = await rawSub('shape-all', [{ event: '*', schema: 'public', table: 'shape' }])
    // Each filtered binding shares its channel with a marker binding (id=eq.99).
    const marker = { event: 'INSERT', schema: 'public', table: 'shape', filter: 'id=eq.99' }
    const onB = await rawSub('shape-b', [{ event: 'INSERT', schema: 'public', table: 'shape', filter: 'b=eq.x' }, marker])
    const bNull = await rawSub('shape-bnull', [{ event: 'INSERT', schema: 'public', table: 'shape', filter: 'b=is.null' }, marker])
    const onC = await rawSub('shape-c', [{ event: 'INSERT', schema: 'public', table: 'shape', filter: 'c=eq.y' }, marker])

    const cols = (p) => p.data.columns.map((c) => `${c.name}:${c.type}`)
    await env.db.query(`insert into shape values (1, 'a', 'x', 'y')`)
    await waitRow(all, 1)
    await waitRow(onB, 1)
    await waitRow(onC, 1)
    assert.deepEqual(cols(all.changes()[0]), ['id:int4', 'a:text', 'b:text', 'c:text'])

    await env.db.query(`alter table shape add column n int`)
    await env.db.query(`insert into shape values (2, 'a', 'x', 'y', 5)`)
    await waitRow(all, 2)
    const p2 = all.changes().find((p) => p.data.record.id === 2)
    assert.deepEqual(cols(p2), ['id:int4', 'a:text', 'b:text', 'c:text', 'n:int4'])
    assert.deepEqual(p2.data.record, { id: 2, a: 'a', b: 'x', c: 'y', n: 5 })

    await env.db.query(`alter table shape drop column b`)
    await env.db.query(`insert into shape values (3, 'a', 'y', 6)`)
    // Row 3 routed (to every channel in one pass) before `c` is renamed.
    await waitRow(all, 3)
    await env.db.query(`alter table shape rename column c to c2`)
    await env.db.query(`insert into shape values (4, 'a', 'y', 7)`)
    await env.db.query(`insert into shape values (99, 'a', 'y', 8)`)
    for (const s of [all, onB, bNull, onC]) await waitRow(s, 99)

    const byId = (id) => all.changes().find((p) => p.data.record.id === id)
    assert.deepEqual(cols(byId(3)), ['id:int4', 'a:text', 'c:text', 'n:int4'])
    assert.deepEqual(byId(3).data.record, { id: 3, a: 'a', c: 'y', n: 6 })
    assert.deepEqual(cols(byId(4)), ['id:int4', 'a:text', 'c2:text', 'n:int4'])
    assert.deepEqual(byId(4).data.record, { id: 4, a: 'a', c2: 'y', n: 7 })
    assert.deepEqual(all.rowIds(), [1, 2, 3, 4, 99])

    // Before its column went, a filter matched (b: rows 1, 2; c: rows 1, 2, 3); afterwards
    // only the marker arrives (b=is.null must not match rows 3/4/99, whose image has no `b`).
    assert.deepEqual(onB.rowIds(), [1, 2, 99])
    assert.deepEqual(bNull.rowIds(), [99])
    assert.deepEqual(onC.rowIds(), [1, 2, 3, 99])
    for (const s of [onB, bNull, onC]) {
      const got = s.changes().map((p) => `${p.data.record.id}:${p.ids.join(',')}`)
      const [f, m] = s.ids
      const want = { 'shape-b': [1, 2], 'shape-bnull': [], 'shape-c': [1, 2, 3] }[s.name].map((id) => `${id}:${f}`).concat([`99:${m}`])
      assert.deepEqual(got, want, `${s.name}: rows and the bindings they matched`)
      // The gateway may also (once it reloads the column privileges) refuse the binding
      // whose column is gone; nothing else.
      const col = s === onC ? 'c' : 'b'
      for (const p of sysMsg(s)) {
        assert.equal(p.status, 'error', `${s.name}: ${JSON.stringify(p)}`)
        assert.match(p.message, new RegExp(`Exception: invalid column for filter ${col}$`))
      }
    }
  }),
)

test(
  'RENAME TABLE: bindings keep receiving (routed by oid); changes are reported under the new name',
  withLog(gwOf, async () => {
    const sub = await rawSub('ren-all', [{ event: '*', schema: 'public', table: 'ren' }])
    const filtered = await rawSub('ren-filtered', [{ event: 'INSERT', schema: 'public', table: 'ren', filter: 'v=eq.keep' }])
    await env.db.query(`insert into ren values (1, 'keep')`)
    await waitRow(sub, 1)
    await env.db.query(`alter table ren rename to ren_new`)
    await env.db.query(`insert into ren_new values (2, 'keep')`)
    await waitRow(sub, 2)
    await waitRow(filtered, 2)
    // The gateway has seen the rename once a binding on the new name goes live.
    await waitLive(env.gw, 'ren_new')
    await env.db.query(`insert into ren_new values (3, 'keep'), (4, 'drop'), (5, 'keep')`)
    await waitRow(sub, 5)
    await waitRow(filtered, 5)
    const names = sub.changes().map((p) => `${p.data.table} ${p.data.record.id}`)
    assert.equal(names[0], 'ren 1')
    // Row 2 may be read before the gateway's once-a-second table refresh saw the rename.
    assert.ok(['ren 2', 'ren_new 2'].includes(names[1]), names[1])
    assert.deepEqual(names.slice(2), ['ren_new 3', 'ren_new 4', 'ren_new 5'])
    assert.deepEqual(filtered.rowIds(), [1, 2, 3, 5])
    assert.deepEqual(sysMsg(sub), [])
    assert.deepEqual(sysMsg(filtered), [])

    // Rename and change the columns, then write at once: the change is read with the
    // table's new description (new name) before the table refresh moved the bindings
    // (lost before routing went by oid). One transaction, so no refresh can fall between.
    const alt = await rawSub('ren-alter', [{ event: '*', schema: 'public', table: 'ren_alter' }])
    await env.db.query(`begin; alter table ren_alter rename to ren_altered; alter table ren_altered add column w int; commit`)
    await env.db.query(`insert into ren_altered values (1, 'v', 9)`)
    await waitRow(alt, 1)
    const p = alt.changes()[0]
    assert.equal(p.data.table, 'ren_altered')
    assert.deepEqual(p.data.record, { id: 1, v: 'v', w: 9 })
  }),
)

test(
  'DROP TABLE: its subscribers get the dropped-table system error, others nothing',
  withLog(gwOf, async () => {
    const sub = await rawSub('gone-all', [{ event: '*', schema: 'public', table: 'gone' }])
    const other = await rawSub('gone-other', [{ event: '*', schema: 'public', table: 'gone_other' }])
    const sb = sbClient(env.gw)
    clients.push(sb)
    const sbSys = []
    const sbCh = sb
      .channel('gone-sb')
      .on('postgres_changes', { event: '*', schema: 'public', table: 'gone' }, () => {})
      .on('system', {}, (p) => sbSys.push(p))
    await subscribe(sbCh)
    await until(() => sbSys.length >= 1, { what: 'supabase-js Subscribed to PostgreSQL' })

    await env.db.query(`insert into gone values (1, 'x')`)
    await waitRow(sub, 1)
    await env.db.query(`drop table gone`)
    const message = 'Table public.gone was dropped: no more changes will arrive for it'
    await until(() => sysMsg(sub).length >= 1 && sbSys.length >= 2, { what: 'the dropped-table message' })
    assert.deepEqual(sysMsg(sub), [{ extension: 'postgres_changes', status: 'error', message, channel: 'gone-all' }])
    assert.deepEqual(sbSys.slice(1), [{ extension: 'postgres_changes', status: 'error', message, channel: 'gone-sb' }])
    // The other table's channel: the marker written after the drop was seen, and no message.
    await env.db.query(`insert into gone_other values (10, 'marker')`)
    await waitRow(other, 10)
    assert.deepEqual(other.frames().map(([k]) => k), ['change'])
    assert.deepEqual(sub.frames().map(([k]) => k), ['change', 'system'])
  }),
)
