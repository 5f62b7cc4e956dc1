// Row level security for Postgres Changes (issue 7, checks 1–5), through the real
// supabase-js 2.119.0 client with real HS256 JWTs against a real PostgreSQL:
//  1. RLS matrix: 3,000 random INSERT/UPDATE/DELETE on `notes` (policy user_id = auth.uid(),
//     `secret` revoked): users A, B, C each receive exactly their rows' events in commit
//     order (UPDATE judged on the new row, DELETE on the old one, with the primary key only),
//     `secret` appears in no frame, anon receives nothing, service_role receives every event;
//     leaks, losses and duplicates counted: all 0.
//  2. A policy that raises for one subscriber's claims ((auth.jwt()->>'team')::int with team
//     "abc"): that subscriber gets one system error naming the table and nothing else; the
//     others receive every one of their team's events (counted).
//  3. access_token refresh (setAuth) to another user's token switches which rows the channel
//     receives from the next change on.
//  4. A filter on a revoked column is refused with Realtime's system error; the join succeeds.
//  5. realtime:* with the anon key on a database where every table has RLS receives only what
//     anon may select.
// "Done" is always proved by a marker the subscriber can see, committed after everything
// else (each channel's changes arrive in commit order), never by waiting a fixed time.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { startChangesEnv, closeSbClients, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { ANON_KEY, signHS256 } from '../lib/jwt.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sbClient, subscribe, wsOf } from '../lib/supabase.mjs'
import { until } from '../lib/util.mjs'

let env
const clients = []
const gwOf = () => env?.gw

const SECRET = 'TOP-SECRET-VALUE'

const SETUP = `
create publication supabase_realtime;
create table notes (id bigint primary key, user_id uuid not null, body text, secret text);
alter table notes enable row level security;
revoke select on notes from authenticated, service_role;
grant select (id, user_id, body) on notes to authenticated, service_role;

create table boards (id bigint primary key, team int not null, body text);
alter table boards enable row level security;

create table posts (id bigint primary key, published boolean not null, title text, draft_notes text);
alter table posts enable row level security;
create policy published on posts for select to anon using (published);
revoke select on posts from anon;
grant select (id, published, title) on posts to anon;

create table markers (id bigint primary key, label text);
alter table markers enable row level security;
create policy everyone on markers for select using (true);

alter publication supabase_realtime add table notes, boards, posts, markers;
`

// After the gateway started: its migration provides auth.uid() / auth.jwt() (this plain
// PostgreSQL has no Supabase auth schema).
const POLICIES = `
create policy own on notes for select to authenticated using (user_id = auth.uid());
create policy team on boards for select using (team = (auth.jwt() ->> 'team')::int);
`

before(async () => {
  env = await startChangesEnv({ name: 'changes-rls', setupSql: SETUP })
  await env.db.query(POLICIES)
  for (const t of ['notes', 'boards', 'posts', 'markers']) await waitLive(env.gw, t)
})

after(async () => {
  await closeSbClients(clients)
  if (env) await env.stop()
})

const EXP = 4102444800 // 2100
const userToken = (sub, extra = {}) =>
  signHS256({ role: 'authenticated', sub, aud: 'authenticated', iat: Math.floor(Date.now() / 1000), exp: EXP, ...extra })
const SERVICE_KEY = signHS256({ role: 'service_role', iss: 'supabase-demo', iat: Math.floor(Date.now() / 1000), exp: EXP })

/**
 * A supabase-js client acting as `token`, with channels on `bindings` (name → binding).
 * Records every postgres_changes payload and system message per channel, and every raw
 * text frame the socket received (to scan for secrets).
 */
async function client(token, bindings) {
  const sb = sbClient(env.gw)
  clients.push(sb)
  if (token) await sb.realtime.setAuth(token)
  const raw = []
  const channels = {}
  for (const [name, binding] of Object.entries(bindings)) {
    const events = []
    const system = []
    const ch = sb
      .channel(name)
      .on('postgres_changes', binding, (p) => events.push(p))
      .on('system', {}, (p) => system.push(p))
    const sub = await subscribe(ch, { timeoutMs: 10000 })
    channels[name] = { ch, events, system, sub }
    if (!raw.hooked) {
      wsOf(sb).on('message', (m) => raw.push(String(m)))
      raw.hooked = true
    }
  }
  for (const c of Object.values(channels)) {
    await until(() => c.system.length >= 1, { timeoutMs: 10000, what: `the first system message on ${c.ch.topic}` })
  }
  return { sb, raw, channels }
}

/** Runs statements in transactions of up to `per` statements each. */
async function runBatched(statements, per = 25) {
  for (let i = 0; i < statements.length; i += per) {
    await env.db.query(`begin; ${statements.slice(i, i + per).join('; ')}; commit`)
  }
}

test(
  'check 1: RLS matrix — 3,000 random ops, each user exactly their rows, anon nothing, service_role everything; 0 leaked, 0 lost, 0 duplicated',
  withLog(gwOf, async () => {
    const users = { A: randomUUID(), B: randomUUID(), C: randomUUID() }
    const notes = { event: '*', schema: 'public', table: 'notes' }
    const subs = {}
    for (const [u, sub] of Object.entries(users)) subs[u] = await client(userToken(sub), { [`notes-${u}`]: notes })
    subs.anon = await client(null, { 'notes-anon': notes, 'markers-anon': { event: '*', schema: 'public', table: 'markers' } })
    subs.service = await client(SERVICE_KEY, { 'notes-service': notes })

    // The ops, and what each subscriber must see, in commit order.
    let seed = 7
    const rand = (n) => {
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n
    }
    const names = Object.keys(users)
    const owner = new Map() // live rows: id → user
    const expected = { A: [], B: [], C: [], service: [] }
    const statements = []
    let nextId = 1
    for (let i = 0; i < 3000; i++) {
      const kind = owner.size < 20 ? 0 : rand(10) // mostly inserts while few rows exist
      if (kind < 4) {
        const id = nextId++
        const u = names[rand(3)]
        owner.set(id, u)
        statements.push(`insert into notes values (${id}, '${users[u]}', 'b${i}', '${SECRET}')`)
        expected[u].push(`INSERT ${id} b${i}`)
        expected.service.push(`INSERT ${id} b${i}`)
      } else if (kind < 8) {
        const ids = [...owner.keys()]
        const id = ids[rand(ids.length)]
        // One update in four hands the row to another user: judged on the new row.
        const u = rand(4) === 0 ? names[rand(3)] : owner.get(id)
        owner.set(id, u)
        statements.push(`update notes set body = 'b${i}', user_id = '${users[u]}', secret = '${SECRET}' where id = ${id}`)
        expected[u].push(`UPDATE ${id} b${i}`)
        expected.service.push(`UPDATE ${id} b${i}`)
      } else {
        const ids = [...owner.keys()]
        const id = ids[rand(ids.length)]
        const u = owner.get(id)
        owner.delete(id)
        statements.push(`delete from notes where id = ${id}`)
        expected[u].push(`DELETE ${id}`)
        expected.service.push(`DELETE ${id}`)
      }
    }
    await runBatched(statements)
    // Markers: each user's own row, then one row everyone may see on markers.
    for (const u of names) {
      await env.db.query(`insert into notes values ($1, $2, 'marker', null)`, [1_000_000 + names.indexOf(u), users[u]])
      expected[u].push(`INSERT ${1_000_000 + names.indexOf(u)} marker`)
    }
    await env.db.query(`insert into markers values (1, 'end of check 1')`)

    const got = (name) => subs[name].channels[Object.keys(subs[name].channels)[0]].events
    const label = (e) => (e.eventType === 'DELETE' ? `DELETE ${e.old.id}` : `${e.eventType} ${e.new.id} ${e.new.body}`)
    for (const u of names) {
      await until(() => got(u).some((e) => e.new?.body === 'marker'), { timeoutMs: 60000, what: `user ${u}'s marker` })
    }
    await until(() => subs.anon.channels['markers-anon'].events.length >= 1, { timeoutMs: 60000, what: "anon's marker" })
    await until(() => got('service').length >= expected.service.length + 3, {
      timeoutMs: 60000,
      what: `service_role's ${expected.service.length + 3} events (has ${got('service').length})`,
    })

    let leaked = 0
    let lost = 0
    let duplicated = 0
    for (const u of [...names, 'service']) {
      const want = expected[u]
      const have = got(u).map(label)
      if (u === 'service') want.push(...names.map((n) => `INSERT ${1_000_000 + names.indexOf(n)} marker`))
      const wantSet = new Map()
      for (const w of want) wantSet.set(w, (wantSet.get(w) ?? 0) + 1)
      const seen = new Map()
      for (const h of have) {
        seen.set(h, (seen.get(h) ?? 0) + 1)
        if (!wantSet.has(h)) leaked++
        else if (seen.get(h) > wantSet.get(h)) duplicated++
      }
      for (const [w, n] of wantSet) lost += Math.max(0, n - (seen.get(w) ?? 0))
      assert.deepEqual(have, want, `${u}: exactly their events, in commit order`)
    }
    const anonNotes = subs.anon.channels['notes-anon'].events.length
    assert.equal(anonNotes, 0, 'anon receives nothing from notes')
    assert.deepEqual({ leaked, lost, duplicated }, { leaked: 0, lost: 0, duplicated: 0 })
    assert.ok(expected.A.length > 500 && expected.B.length > 500 && expected.C.length > 500, 'every user had a real share')

    // DELETE carries the primary key only; no frame anywhere carries the revoked column.
    for (const u of [...names, 'service']) {
      for (const e of got(u).filter((e) => e.eventType === 'DELETE')) assert.deepEqual(Object.keys(e.old), ['id'])
      for (const e of got(u).filter((e) => e.eventType !== 'DELETE')) assert.ok(!('secret' in e.new))
    }
    for (const s of Object.values(subs)) {
      assert.ok(!s.raw.some((f) => f.includes(SECRET) || f.includes('"secret"')), 'secret never on the wire')
    }
  }),
)

test(
  'check 2: a policy that raises for one subscriber errors that subscriber only (one system error); the others receive every event',
  withLog(gwOf, async () => {
    const boards = { event: '*', schema: 'public', table: 'boards' }
    const good = [
      ['x', 1],
      ['y', 1],
      ['z', 2],
    ]
    const subs = {}
    for (const [n, team] of good) subs[n] = await client(userToken(randomUUID(), { team: String(team) }), { [`boards-${n}`]: boards })
    const bad = await client(userToken(randomUUID(), { team: 'abc' }), {
      'boards-bad': boards,
      'markers-bad': { event: 'INSERT', schema: 'public', table: 'markers' },
    })
    const statements = []
    for (let i = 1; i <= 300; i++) statements.push(`insert into boards values (${i}, ${1 + (i % 2)}, 'b${i}')`)
    await runBatched(statements, 10)
    await env.db.query(`insert into boards values (1001, 1, 'end'), (1002, 2, 'end')`)
    const ev = (n) => Object.values(subs[n].channels)[0].events
    for (const [n] of good) await until(() => ev(n).some((e) => e.new.body === 'end'), { timeoutMs: 30000, what: `${n}'s end marker` })
    for (const [n, team] of good) {
      const ids = ev(n).map((e) => e.new.id)
      const want = [...Array.from({ length: 300 }, (_, k) => k + 1).filter((i) => 1 + (i % 2) === team), team === 1 ? 1001 : 1002]
      assert.deepEqual(ids, want, `${n} (team ${team}) receives every one of its team's events`)
    }
    // A marker on the raising subscriber's socket, committed last: everything before it has arrived.
    await env.db.query(`insert into markers values (2, 'end of check 2')`)
    await until(() => bad.channels['markers-bad'].events.length >= 1, { timeoutMs: 30000, what: 'the marker on the raising subscriber' })
    const b = bad.channels['boards-bad']
    assert.equal(b.events.length, 0, 'the raising subscriber receives no rows')
    const errors = b.system.filter((s) => s.status === 'error')
    assert.equal(errors.length, 1, `one system error per episode: ${JSON.stringify(b.system)}`)
    assert.equal(errors[0].extension, 'postgres_changes')
    assert.match(errors[0].message, /public\.boards/)
    assert.match(errors[0].message, /invalid input syntax for type integer/)
    assert.deepEqual(b.sub.statuses, ['SUBSCRIBED'])
  }),
)

test(
  'check 3: an access_token refresh to another user switches which rows the channel receives from the next change on',
  withLog(gwOf, async () => {
    const a = randomUUID()
    const b = randomUUID()
    const s = await client(userToken(a), { 'notes-switch': { event: 'INSERT', schema: 'public', table: 'notes' } })
    const events = s.channels['notes-switch'].events
    await env.db.query(`insert into notes values (2000001, $1, 'a1', null), (2000002, $2, 'b1', null)`, [a, b])
    await until(() => events.length >= 1, { timeoutMs: 10000, what: "A's row" })

    await s.sb.realtime.setAuth(userToken(b)) // pushes access_token on the joined channel
    // The refresh has no reply: rows of B prove it applied (those before it are judged as A).
    let n = 0
    await until(
      async () => {
        await env.db.query(`insert into notes values ($1, $2, 'probe', null)`, [2100000 + n++, b])
        return events.some((e) => e.new.body === 'probe')
      },
      { timeoutMs: 15000, every: 100, what: 'the refreshed token to apply' },
    )
    await env.db.query(`insert into notes values (2000003, $1, 'a2', null), (2000004, $2, 'b2', null), (2000005, $1, 'a3', null), (2000006, $2, 'b3', null)`, [a, b])
    await until(() => events.some((e) => e.new.body === 'b3'), { timeoutMs: 10000, what: "B's last row" })
    const bodies = events.map((e) => e.new.body).filter((x) => x !== 'probe')
    assert.deepEqual(bodies, ['a1', 'b2', 'b3'], 'A’s row before the refresh, exactly B’s rows after it')
  }),
)

test(
  'check 4: a filter on a revoked column is refused with a system error; the join succeeds',
  withLog(gwOf, async () => {
    const s = await client(userToken(randomUUID()), {
      'notes-secret-filter': { event: '*', schema: 'public', table: 'notes', filter: `secret=eq.${SECRET}` },
    })
    const c = s.channels['notes-secret-filter']
    assert.deepEqual(c.sub.statuses, ['SUBSCRIBED'])
    assert.equal(c.system[0].status, 'error')
    assert.equal(
      c.system[0].message,
      `Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [event: *, schema: public, table: notes, filters: [secret=eq.${SECRET}]]. Exception: invalid column for filter secret`,
    )
  }),
)

test(
  'check 5: realtime:* with the anon key on an all-RLS database receives only what anon may select',
  withLog(gwOf, async () => {
    const c = await RawClient.connect(env.gw, { vsn: '1.0.0', apikey: ANON_KEY })
    try {
      const frames = []
      c.onMessage = (m) => {
        if (m.topic === 'realtime:*' && m.event === 'postgres_changes') frames.push(m.payload)
      }
      await c.join('realtime:*', {})
      await c.next((m) => m.topic === 'realtime:*' && m.event === 'system', { timeoutMs: 10000, what: 'subscribed' })
      const someone = randomUUID()
      await env.db.query(`begin;
        insert into notes values (3000001, '${someone}', 'private', '${SECRET}');
        insert into boards values (3001, 1, 'team only');
        insert into posts values (1, true, 'hello', 'draft: do not show'), (2, false, 'unpublished', 'x');
        update posts set title = 'hello again' where id = 1;
        update posts set published = true, title = 'now public' where id = 2;
        delete from notes where id = 3000001;
        commit`)
      await env.db.query(`insert into markers values (5, 'end of check 5')`)
      await until(() => frames.some((f) => f.table === 'markers' && f.record?.id === 5), { timeoutMs: 15000, what: 'the marker' })
      const seen = frames.map((f) => `${f.table} ${f.type} ${JSON.stringify(f.type === 'DELETE' ? f.old_record : f.record)}`)
      assert.deepEqual(seen, [
        'posts INSERT {"id":1,"published":true,"title":"hello"}',
        'posts UPDATE {"id":1,"published":true,"title":"hello again"}',
        'posts UPDATE {"id":2,"published":true,"title":"now public"}',
        'markers INSERT {"id":5,"label":"end of check 5"}',
      ])
      assert.ok(!frames.some((f) => JSON.stringify(f).includes('draft')), 'a revoked column never shows')
      // Post 2 became visible by this UPDATE: its old row was not, so only its key shows.
      assert.deepEqual(frames[2].old_record, { id: 2 })
      assert.deepEqual(frames[1].old_record, { id: 1, published: true, title: 'hello' })
    } finally {
      c.close()
    }
  }),
)
