// Issue 8, checks 3–5: private channels (Realtime Authorization) with policies on
// realtime.messages, Broadcast from the database (realtime.send, broadcast_changes)
// and replay — real supabase-js, real JWTs (HS256, API_JWT_SECRET), real PostgreSQL.
//
// One cluster and one gateway for the file. Supabase's API roles are created before
// the gateway starts (its migration grants them realtime.messages); the policies read
// `request.jwt.claims` as Supabase's auth.jwt() does:
//   SELECT (may read): the claim's `sub` is in public.readers;
//   INSERT (may write): `sub` is in public.writers.
// Users: A reads and writes, B reads only, C neither.
import { after, before, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { startChangesEnv, closeSbClients } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { ANON_KEY, signHS256 } from '../lib/jwt.mjs'
import { RawClient } from '../lib/raw.mjs'
import { subscribe } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'

const now = () => Math.floor(Date.now() / 1000)
const userToken = (sub, ttl = 3600) => signHS256({ role: 'authenticated', sub, iat: now(), exp: now() + ttl })

const ROLES = `
  do $$ begin
    create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls;
  exception when duplicate_object then null; end $$;`

const POLICIES = `
  create table public.readers (sub text primary key);
  create table public.writers (sub text primary key);
  insert into public.readers values ('user-a'), ('user-b');
  insert into public.writers values ('user-a');
  grant select on public.readers, public.writers to authenticated;
  create policy "readers read" on realtime.messages for select to authenticated
    using (exists (select 1 from public.readers r where r.sub = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
  create policy "writers write" on realtime.messages for insert to authenticated
    with check (exists (select 1 from public.writers w where w.sub = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
  create table public.items (id int primary key, v text);
  create function public.items_broadcast() returns trigger language plpgsql as $f$
  begin
    perform realtime.broadcast_changes('items-feed', tg_op, tg_op, tg_table_name, tg_table_schema, new, old);
    return null;
  end $f$;
  create trigger items_broadcast after insert or update or delete on public.items
    for each row execute function public.items_broadcast();`

let env
const clients = []

/**
 * A supabase-js client whose token is whatever `holder.token` is (third-party auth
 * style); the token is fetched before any join, as an app awaiting its session does.
 */
async function userClient(holder) {
  const c = createClient(env.gw.url, ANON_KEY, {
    accessToken: async () => holder.token,
    realtime: { transport: WebSocket },
  })
  clients.push(c)
  await c.realtime.setAuth()
  return c
}

/** Collects broadcast payloads of `event` on a channel. */
function collect(channel, event = '*') {
  const got = []
  channel.on('broadcast', { event }, (m) => got.push(m))
  return got
}

before(async () => {
  // The 10,000-message burst runs on the default CLIENT_BACKLOG: broadcasts from the database
  // are paced like Postgres Changes (lossless for a reader; changes-burst.test.mjs covers stalls).
  env = await startChangesEnv({ name: 'private', setupSql: ROLES })
  await env.db.query(POLICIES)
})

after(async () => {
  await closeSbClients(clients)
  await env?.stop()
})

describe('private channels (check 3)', () => {
  it('A reads and writes, B reads only, C is refused; REST 403 for B; revoking B then refreshing closes B', withLog(() => env?.gw, async () => {
      const a = { token: userToken('user-a') }
      const b = { token: userToken('user-b') }
      const c = { token: userToken('user-c') }
      const [ca, cb, cc] = await Promise.all([userClient(a), userClient(b), userClient(c)])
      const opts = { config: { private: true, broadcast: { self: true } } }

      const chA = ca.channel('room-p', opts)
      const gotA = collect(chA)
      await subscribe(chA)
      const chB = cb.channel('room-p', opts)
      const gotB = collect(chB)
      const bSystem = []
      chB.on('system', {}, (m) => bSystem.push(m))
      const bStatus = await subscribe(chB)

      // C may read nothing: the join is refused with upstream's reason.
      const chC = cc.channel('room-p', opts)
      await assert.rejects(subscribe(chC), /You do not have permissions to read from this Channel topic: room-p/)

      // B's send is dropped. Ordering proof: B then sends a marker on a public channel
      // A also listens to; A's socket receives frames in the order the gateway queued them.
      const syncA = ca.channel('sync', { config: { broadcast: { self: false } } })
      const markers = collect(syncA)
      await subscribe(syncA)
      const syncB = cb.channel('sync', { config: { broadcast: { self: false } } })
      await subscribe(syncB)
      await chB.send({ type: 'broadcast', event: 'msg', payload: { from: 'b' } })
      await syncB.send({ type: 'broadcast', event: 'marker', payload: {} })
      await until(() => markers.length === 1, { what: 'marker from B at A' })
      await chA.send({ type: 'broadcast', event: 'msg', payload: { from: 'a' } })
      await until(() => gotA.length >= 1 && gotB.length >= 1, { what: "A's message at A and B" })
      assert.deepEqual(gotA.map((m) => m.payload), [{ from: 'a' }])
      assert.deepEqual(gotB.map((m) => m.payload), [{ from: 'a' }])

      // REST: B's private send → 403 {"message":"Unauthorized"}; A's → 202 and delivered.
      const post = (token, body) =>
        fetch(`${env.gw.url}/api/broadcast/room-p/events/rest?private=true`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${token}`, apikey: ANON_KEY },
          body: JSON.stringify(body),
        })
      const rb = await post(b.token, { from: 'b-rest' })
      assert.equal(rb.status, 403)
      assert.deepEqual(await rb.json(), { message: 'Unauthorized' })
      const ra = await post(a.token, { from: 'a-rest' })
      assert.equal(ra.status, 202)
      await until(() => gotB.some((m) => m.payload?.from === 'a-rest'), { what: "A's REST message at B" })
      // Batch: B's private message is dropped, its public one goes through.
      const batch = await fetch(`${env.gw.url}/api/broadcast`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${b.token}`, apikey: ANON_KEY },
        body: JSON.stringify({
          messages: [
            { topic: 'room-p', event: 'msg', payload: { from: 'b-batch' }, private: true },
            { topic: 'sync', event: 'marker', payload: { n: 2 } },
          ],
        }),
      })
      assert.equal(batch.status, 202)
      await until(() => markers.length === 2, { what: 'second marker at A' })
      assert.ok(!gotA.some((m) => m.payload?.from === 'b-batch'), 'denied batch message was dropped')

      // Revoke B's read policy; a refreshed token re-evaluates it and closes B's channel.
      await env.db.query(`delete from public.readers where sub = 'user-b'`)
      b.token = userToken('user-b', 7200)
      await cb.realtime.setAuth()
      await bStatus.waitFor('CLOSED')
      assert.ok(
        bSystem.some((m) => /You no longer have permission to read from this Channel topic: room-p/.test(m.message)),
        JSON.stringify(bSystem),
      )
      // A, unaffected, still receives.
      await chA.send({ type: 'broadcast', event: 'msg', payload: { from: 'a2' } })
      await until(() => gotA.some((m) => m.payload?.from === 'a2'), { what: 'A still receives' })
  }))
})

describe('Broadcast from the database (check 4)', () => {
  it('realtime.send: delivered once after COMMIT, never after ROLLBACK; 10,000 in one transaction complete and in order', withLog(() => env?.gw, async () => {
      const holder = { token: ANON_KEY }
      const c = await userClient(holder)
      const ch = c.channel('room-7')
      const got = collect(ch)
      await subscribe(ch)

      await env.db.query('begin')
      await env.db.query(`select realtime.send('{"x":1}', 'ev', 'room-7', false)`)
      await sleep(300) // not delivered before the commit (nothing to deliver yet)
      assert.equal(got.length, 0, 'nothing before COMMIT')
      await env.db.query('commit')
      await env.db.query(`begin; select realtime.send('{"x":"rolled back"}', 'ev', 'room-7', false); rollback`)
      await env.db.query(`select realtime.send('{"x":2}', 'ev', 'room-7', false)`)
      await until(() => got.length >= 2, { what: 'two committed sends' })
      assert.deepEqual(got.map((m) => m.payload.x), [1, 2], 'committed sends once each, the rolled back one never')
      const first = got[0]
      assert.equal(first.type, 'broadcast')
      assert.equal(first.event, 'ev')
      assert.match(first.meta.id, /^[0-9a-f-]{36}$/)
      assert.equal(first.payload.id, first.meta.id, 'realtime.send adds the message id to the payload')

      got.length = 0
      await env.db.query(
        `select realtime.send(jsonb_build_object('n', g), 'bulk', 'room-7', false) from generate_series(1, 10000) g`,
      )
      await until(() => got.length >= 10000, { timeoutMs: 60000, what: '10,000 sends' })
      await sleep(200)
      assert.equal(got.length, 10000)
      got.forEach((m, i) => assert.equal(m.payload.n, i + 1))
  }))

  it('a trigger calling realtime.broadcast_changes delivers INSERT/UPDATE/DELETE shaped like upstream (private topic)', withLog(() => env?.gw, async () => {
      const a = { token: userToken('user-a') }
      const c = await userClient(a)
      const ch = c.channel('items-feed', { config: { private: true } })
      const got = collect(ch)
      await subscribe(ch)
      await env.db.query(`insert into public.items values (1, 'one')`)
      await env.db.query(`update public.items set v = 'uno' where id = 1`)
      await env.db.query(`delete from public.items where id = 1`)
      await until(() => got.length >= 3, { what: 'three row broadcasts' })
      assert.deepEqual(
        got.map((m) => m.event),
        ['INSERT', 'UPDATE', 'DELETE'],
      )
      const strip = ({ id, ...rest }) => rest
      assert.deepEqual(strip(got[0].payload), {
        old_record: null,
        record: { id: 1, v: 'one' },
        operation: 'INSERT',
        table: 'items',
        schema: 'public',
      })
      assert.deepEqual(strip(got[1].payload), {
        old_record: { id: 1, v: 'one' },
        record: { id: 1, v: 'uno' },
        operation: 'UPDATE',
        table: 'items',
        schema: 'public',
      })
      assert.deepEqual(strip(got[2].payload), {
        old_record: { id: 1, v: 'uno' },
        record: null,
        operation: 'DELETE',
        table: 'items',
        schema: 'public',
      })
      for (const m of got) assert.equal(m.payload.id, m.meta.id)
  }))
})

describe('replay (check 5)', () => {
  it('a private channel joining with replay gets the stored messages first, marked replayed; public channels are refused', withLog(() => env?.gw, async () => {
      const since = Date.now() - 1000
      for (let i = 1; i <= 3; i++) await env.db.query(`select realtime.send($1, 'stored', 'room-r', true)`, [{ n: i }])
      const a = { token: userToken('user-a') }
      const c = await userClient(a)
      const ch = c.channel('room-r', { config: { private: true, broadcast: { replay: { since, limit: 10 } } } })
      const got = collect(ch)
      await subscribe(ch)
      await until(() => got.length >= 3, { what: 'three replayed messages' })
      await env.db.query(`select realtime.send('{"n":4}', 'stored', 'room-r', true)`)
      await until(() => got.length >= 4, { what: 'the live message' })
      assert.deepEqual(got.map((m) => m.payload.n), [1, 2, 3, 4])
      assert.deepEqual(got.map((m) => m.meta.replayed === true), [true, true, true, false])

      // realtime-js refuses replay on a public channel before sending; a raw client gets
      // the gateway's answer.
      const raw = await RawClient.connect(env.gw, { vsn: '1.0.0' })
      try {
        const { reply } = await raw.join('realtime:room-r-public', { config: { broadcast: { replay: { since, limit: 10 } } } })
        assert.equal(reply.payload.status, 'error')
        assert.equal(reply.payload.response.reason, 'UnableToReplayMessages: Replay is not allowed for public channels')
      } finally {
        raw.close()
      }
  }))
})

describe('what a token cannot do on private channels (security review)', () => {
  it('role "none" (PostgreSQL: back to the session user) is refused, never run as the gateway; the public twin of a private topic sees none of its messages', withLog(() => env?.gw, async () => {
      // A validly signed token whose role is the keyword `none`: set_config('role', 'none')
      // would make the policy check run as the gateway's own (superuser) database user.
      const none = signHS256({ role: 'none', sub: 'user-a', iat: now(), exp: now() + 3600 })
      const raw = await RawClient.connect(env.gw)
      const twin = await RawClient.connect(env.gw)
      try {
        const { reply } = await raw.join('realtime:room-p', { config: { private: true }, access_token: none })
        assert.equal(reply.payload.status, 'error', JSON.stringify(reply.payload))
        assert.match(reply.payload.response.reason, /^InvalidJWTToken: /)
        const rest = await fetch(`${env.gw.url}/api/broadcast/room-p/events/x?private=true`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${none}` },
          body: '{}',
        })
        assert.equal(rest.status, 401)

        // C (no read policy) joins the PUBLIC room-p: private broadcasts of room-p
        // (socket, REST, database, replay) never reach it; a public marker does.
        const { reply: ok } = await twin.join('realtime:room-p', { config: { broadcast: { self: false } }, access_token: userToken('user-c') })
        assert.equal(ok.payload.status, 'ok')
        const a = { token: userToken('user-a') }
        const ca = await userClient(a)
        const chA = ca.channel('room-p', { config: { private: true } })
        await subscribe(chA)
        await chA.send({ type: 'broadcast', event: 'secret', payload: { via: 'socket' } })
        const r = await fetch(`${env.gw.url}/api/broadcast`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${a.token}` },
          body: JSON.stringify({ messages: [{ topic: 'room-p', event: 'secret', payload: { via: 'batch' }, private: true }] }),
        })
        assert.equal(r.status, 202)
        await env.db.query(`select realtime.send('{"via":"db"}', 'secret', 'room-p', true)`)
        await env.db.query(`select realtime.send('{"via":"marker"}', 'marker', 'room-p', false)`)
        const marker = await twin.next((m) => m.event === 'broadcast', { what: 'the public marker' })
        assert.equal(marker.userEvent ?? marker.payload?.event, 'marker', 'the first broadcast the public twin gets is the marker')
        await twin.expectNone((m) => m.event === 'broadcast', 200, 'private message on the public twin')
      } finally {
        raw.close()
        twin.close()
      }
  }))
})
