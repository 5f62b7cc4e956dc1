// Flow control for Postgres Changes (issue 9, check 1): bursts reach every subscriber that
// keeps reading, exactly once and in order, on the default CLIENT_BACKLOG.
//
// - `INSERT … SELECT` of 100,000 ~1 KB rows: a raw V2 subscriber and a supabase-js subscriber
//   (each reading as fast as this Node process can) receive all 100,000, ids 1..100,000 in order.
//   A third subscriber (raw V2) stops reading: after CHANGES_LAG_GRACE_MS without progress it is
//   cut, and once resumed it gets what was already on its way, then the lag notice (`system`,
//   "<n> messages were dropped…", n = exactly what it missed) and `phx_error` (ref = join_ref).
// - `COPY … FROM STDIN` (psql) of 20,000 rows: the same, with the stalled subscriber a
//   supabase-js client, which gets the `system` message, CHANNEL_ERROR, and rejoins by itself.
// - Broadcast from the database, 20,000 `realtime.send` in one statement: the same durable-log
//   path (paced, budgeted, stall cut), to supabase-js readers on vsn 2.0.0 (binary frames) and
//   1.0.0 (JSON text), and a stalled supabase-js subscriber.
//
// Readers "keep reading" the way real ones do: each stops reading for HICCUP_MS (well under the
// grace) at a few points of the burst, as a busy event loop or a GC pause would. A gateway that
// drops when a backlog fills loses frames there however fast or slow the machine is.
//
// Why these cannot pass by luck, whatever the machine's speed:
// - The gateway runs with CHANGES_BUFFER_BYTES=8 MiB (its read-ahead budget); each statement's
//   frames are ≥ 20 MB, so the stalled subscriber exhausts the budget and the readers can only
//   finish if the stalled one is cut (it "does not slow them" beyond the grace).
// - The cut is observed (metric `realtime_postgres_changes_stalled_connections_total`) no earlier than the grace after
//   the subscriber stopped reading — a lower bound, which holds on any machine.
// - RSS: the stalled subscriber misses ≥ 90 MB of frames; a gateway that queued them would grow
//   by that much. Bound: the 8 MiB budget + ingest's batches in flight (≤ 6 of 1000 rows, ~7 MB
//   here: being read, 2 in ingest's channel, 1 held and 1 queued by the database-broadcast split,
//   1 being routed) + writers' in-hand chunks (64 KiB each) + allocator slack (glibc's per-thread arenas)
//   < RSS_GROWTH_MIB. Measured: ~20 MiB growth (~16 MiB with MALLOC_ARENA_MAX=1).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { join } from 'node:path'
import { startChangesEnv, rawPgSubscribe, waitLive, closeSbClients } from '../lib/changes-env.mjs'
import { rssSampler, withLog } from '../lib/gateway.mjs'
import { PG_BIN } from '../lib/postgres.mjs'
import { sbClient, subscribe, wsOf } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'

const GRACE_MS = 5000 // the default, set explicitly
const HICCUP_MS = 2000 // readers pause this long (well under the grace) a few times
const BUFFER_BYTES = 8 * 1024 * 1024
const RSS_GROWTH_MIB = 64
const PAD = 'p'.repeat(1000)
// realtime-js reconnects when a heartbeat reply takes over 25 s to be *processed*. Behind that
// reply sit the frames already in the kernel's socket buffers (here up to 4 MiB send + 32 MiB
// receive), which a reader starved of CPU on a loaded 2-core box can take longer than that to
// parse. That is the client's choice, not a gateway drop, and it would make the test depend on
// machine speed, so these clients heartbeat every 10 minutes.
const SB_OPTIONS = { heartbeatIntervalMs: 600_000 }

let env
const sockets = []
const sbs = []

before(async () => {
  env = await startChangesEnv({
    name: 'changes-burst',
    setupSql: `create table burst (id int primary key, pad text not null);
               create table copied (id int primary key, pad text not null);`,
    // The defaults under test: CLIENT_BACKLOG (1024) and LAG_POLICY (error) are not overridden.
    // WRITE_TIMEOUT_MS and IDLE_TIMEOUT_MS are raised: the stalled subscriber stays paused until
    // the readers are done, which on a slow machine can pass the default 30 s write timeout, and
    // the supabase-js clients heartbeat rarely (see SB_OPTIONS).
    gatewayEnv: {
      CHANGES_LAG_GRACE_MS: String(GRACE_MS),
      CHANGES_BUFFER_BYTES: String(BUFFER_BYTES),
      WRITE_TIMEOUT_MS: '600000',
      IDLE_TIMEOUT_MS: '600000',
    },
  })
  await env.db.query(`select realtime_gateway.enable('public.burst')`)
  await env.db.query(`select realtime_gateway.enable('public.copied')`)
  await waitLive(env.gw, 'burst')
  await waitLive(env.gw, 'copied')
})

after(async () => {
  for (const s of sockets) s.terminate()
  await closeSbClients(sbs)
  if (env) await env.stop()
})

const gwOf = () => env?.gw

/** Checks that ids arrive as 1, 2, 3, … (each exactly once, in order). */
function sequence(label) {
  const s = { label, count: 0, last: 0, errors: [], ids: null }
  s.next = (id) => {
    if (id !== s.last + 1 && s.errors.length < 5) s.errors.push(`${label}: id ${id} after ${s.last}`)
    s.last = id
    s.count++
  }
  return s
}

/** Pauses a reader's socket for HICCUP_MS when it reaches each of `at` rows. */
function hiccups(socket, seq, at) {
  const points = new Set(at)
  return () => {
    if (!points.has(seq.count)) return
    socket().pause()
    setTimeout(() => socket().resume(), HICCUP_MS)
  }
}

/** A raw V2 subscriber to INSERTs on `table`; non-change frames go to `control`. */
async function rawSubscriber(table, label, { hiccupAt = [] } = {}) {
  const seq = sequence(label)
  let hiccup = () => {}
  const control = []
  const badRows = []
  const sub = await rawPgSubscribe(env.gw, `realtime:${label}`, [{ event: 'INSERT', schema: 'public', table }], {
    collect: false,
    onChange: (p) => {
      const r = p.data?.record
      if (!r || r.pad !== PAD) badRows.push(JSON.stringify(p).slice(0, 200))
      seq.next(r?.id)
      hiccup()
    },
  })
  hiccup = hiccups(() => sub.client.ws._socket, seq, hiccupAt)
  sockets.push(sub.client)
  // Heartbeats, as realtime-js sends them: a long run must not meet the idle timeout.
  sub.client.keepAlive()
  assert.equal(sub.system.payload.message, 'Subscribed to PostgreSQL')
  const hook = sub.client.onMessage
  sub.client.onMessage = (m) => {
    hook(m)
    if (m.event !== 'postgres_changes' && m.topic !== 'phoenix') control.push({ m, afterCount: seq.count })
  }
  return { ...sub, seq, control, badRows }
}

/** A supabase-js subscriber to INSERTs on `table`. */
async function sbSubscriber(table, label, { hiccupAt = [] } = {}) {
  const client = sbClient(env.gw, SB_OPTIONS)
  sbs.push(client)
  const seq = sequence(label)
  const system = []
  const badRows = []
  const hiccup = hiccups(() => wsOf(client)._socket, seq, hiccupAt)
  const ch = client
    .channel(label)
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table }, (p) => {
      if (p.new?.pad !== PAD) badRows.push(JSON.stringify(p).slice(0, 200))
      seq.next(p.new?.id)
      hiccup()
    })
    .on('system', {}, (p) => system.push({ p, afterCount: seq.count }))
  const sub = await subscribe(ch)
  await until(() => system.length >= 1, { what: `"Subscribed to PostgreSQL" on ${label}` })
  assert.equal(system[0].p.message, 'Subscribed to PostgreSQL')
  system.length = 0
  return { client, ch, seq, system, badRows, ...sub }
}

/** A supabase-js subscriber to the `bulk` broadcasts of `topic` (from realtime.send). */
async function sbBroadcastSubscriber(topic, label, { hiccupAt = [], vsn } = {}) {
  const client = sbClient(env.gw, vsn ? { ...SB_OPTIONS, vsn } : SB_OPTIONS)
  sbs.push(client)
  const seq = sequence(label)
  const system = []
  const badRows = []
  const hiccup = hiccups(() => wsOf(client)._socket, seq, hiccupAt)
  const ch = client
    .channel(topic)
    .on('broadcast', { event: 'bulk' }, (m) => {
      if (m.payload?.pad !== PAD) badRows.push(JSON.stringify(m).slice(0, 200))
      seq.next(m.payload?.n)
      hiccup()
    })
    .on('system', {}, (p) => system.push({ p, afterCount: seq.count }))
  const sub = await subscribe(ch)
  return { client, ch, seq, system, badRows, ...sub }
}

/** Waits until every reader has `total` rows, failing at once if one gets a control frame. */
async function readersDone(readers, total, what) {
  const counts = () => readers.map((r) => `${r.seq.label}=${r.seq.count}`).join(', ')
  await until(
    () => {
      for (const r of readers) {
        const ctl = r.control?.[0]?.m.raw ?? r.system?.[0]?.p
        if (ctl) throw new Error(`${r.seq.label} got a control frame during the burst: ${JSON.stringify(ctl)}`)
        if (r.statuses && r.statuses.length !== 1) throw new Error(`${r.seq.label} statuses: ${r.statuses.join(' → ')}`)
      }
      return readers.every((r) => r.seq.count >= total)
    },
    { timeoutMs: 180_000, every: 50, what },
  ).catch((e) => {
    throw new Error(`${e.message} (now: ${counts()})`)
  })
}

function assertComplete(readers, total) {
  for (const r of readers) {
    assert.deepEqual(r.seq.errors, [], `${r.seq.label}: gaps, duplicates or reordering`)
    assert.deepEqual(r.badRows.slice(0, 3), [], `${r.seq.label}: rows not intact`)
    assert.equal(r.seq.count, total, `${r.seq.label}: every row exactly once`)
    assert.equal(r.seq.last, total)
  }
}

/** Waits for the gateway to cut a stalled connection; returns when it saw it (ms since epoch). */
async function cutObserved(before) {
  await until(async () => ((await env.gw.metric('realtime_postgres_changes_stalled_connections_total')) ?? 0) > before, {
    timeoutMs: 60_000,
    every: 100,
    what: 'realtime_postgres_changes_stalled_connections_total to increase (the stalled subscriber cut after the grace)',
  })
  return Date.now()
}

const DROPPED = /^(\d+) messages were dropped because the client could not keep up/

/**
 * Resumes a stalled supabase-js subscriber and checks how it was cut: one `system` notice on
 * `channel` counting exactly what it missed of `total`, after what was already on its way,
 * in order; then CHANNEL_ERROR and a rejoin by realtime-js itself.
 */
async function resumeStalledSb(stalled, channel, total) {
  wsOf(stalled.client)._socket.resume()
  await stalled.waitFor('SUBSCRIBED', 30_000)
  assert.match(stalled.statuses[1] ?? '', /^CHANNEL_ERROR/, `statuses: ${stalled.statuses.join(' → ')}`)
  assert.equal(stalled.statuses.at(-1), 'SUBSCRIBED')
  const notices = stalled.system.filter((x) => x.p.status === 'error')
  assert.equal(notices.length, 1, `system messages: ${JSON.stringify(stalled.system.map((x) => x.p))}`)
  assert.equal(notices[0].p.channel, channel)
  const received = notices[0].afterCount
  assert.deepEqual(stalled.seq.errors, [], 'the stalled subscriber got messages out of order or twice')
  assert.ok(received < total, 'the stalled subscriber received everything: it was never cut')
  assert.equal(Number(DROPPED.exec(notices[0].p.message)?.[1]), total - received, `notice "${notices[0].p.message}", received ${received}`)
}

test(
  'INSERT … SELECT of 100,000 rows: raw and supabase-js readers get all, in order; a stalled subscriber is cut after the grace and told; RSS bounded',
  { timeout: 300_000 },
  withLog(gwOf, async () => {
    const TOTAL = 100_000
    const raw = await rawSubscriber('burst', 'burst-raw', { hiccupAt: [10_000, 50_000, 90_000] })
    const sb = await sbSubscriber('burst', 'burst-sb', { hiccupAt: [30_000, 70_000] })
    const stalled = await rawSubscriber('burst', 'burst-stalled')
    const cutsBefore = (await env.gw.metric('realtime_postgres_changes_stalled_connections_total')) ?? 0

    // It stops reading, not talking: its heartbeats keep it from the idle timeout.
    stalled.client.pause()
    const pausedAt = Date.now()
    const baseline = env.gw.rssKiB()
    const rss = rssSampler(env.gw)
    try {
      const r = await env.db.query(`insert into burst (id, pad) select i, $1 from generate_series(1, ${TOTAL}) i`, [PAD])
      assert.equal(r.rowCount, TOTAL)
      await readersDone([raw, sb], TOTAL, `all ${TOTAL} rows at both readers`)
      const cutAt = await cutObserved(cutsBefore)
      const peak = rss.stop()
      console.log(`# burst: RSS baseline ${baseline} KiB, peak ${peak} KiB; cut observed ${cutAt - pausedAt} ms after the pause`)

      assertComplete([raw, sb], TOTAL)
      assert.deepEqual(raw.control.map((x) => x.m.raw), [], 'the raw reader got control frames')
      assert.deepEqual(sb.statuses, ['SUBSCRIBED'])
      assert.ok(cutAt - pausedAt >= GRACE_MS, `cut observed ${cutAt - pausedAt} ms after the pause, before the ${GRACE_MS} ms grace`)
      assert.ok(peak - baseline < RSS_GROWTH_MIB * 1024, `gateway RSS grew by ${peak - baseline} KiB (baseline ${baseline}, peak ${peak}); bound ${RSS_GROWTH_MIB} MiB`)
    } finally {
      rss.stop()
    }

    // Resumed: what was on its way, in order, then the notice and phx_error, counting exactly what it missed.
    stalled.client.resume()
    await until(() => stalled.control.some((x) => x.m.event === 'phx_error'), { timeoutMs: 30_000, what: 'phx_error on the stalled subscriber' })
    await sleep(300)
    const ctl = stalled.control.map((x) => x.m)
    assert.deepEqual(ctl.map((m) => m.event), ['system', 'phx_error'], `control frames: ${ctl.map((m) => m.raw).join(' ')}`)
    const [sys, err] = ctl
    const received = stalled.seq.count
    assert.deepEqual(stalled.seq.errors, [], 'the stalled subscriber got rows out of order or twice')
    assert.ok(received < TOTAL, 'the stalled subscriber received everything: it was never cut')
    assert.equal(stalled.control.find((x) => x.m === sys).afterCount, received, 'rows arrived after the notice')
    assert.deepEqual(sys.frame, [
      stalled.joinRef,
      null,
      'realtime:burst-stalled',
      'system',
      { extension: 'system', status: 'error', message: sys.payload.message, channel: 'burst-stalled' },
    ])
    assert.equal(Number(DROPPED.exec(sys.payload.message)?.[1]), TOTAL - received, `notice "${sys.payload.message}", received ${received}`)
    assert.equal(err.ref, stalled.joinRef, `phx_error ref must be the join_ref: ${err.raw}`)
    assert.equal(err.join_ref, stalled.joinRef)
  }),
)

/** `COPY <table> (id, pad) FROM STDIN` through psql, rows 1..n. */
async function psqlCopy(table, n) {
  const child = spawn(join(PG_BIN, 'psql'), [env.dbUrl, '-v', 'ON_ERROR_STOP=1', '-c', `copy ${table} (id, pad) from stdin`], {
    stdio: ['pipe', 'pipe', 'pipe'],
  })
  let out = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (out += d))
  const done = new Promise((res) => child.on('close', res))
  const chunk = []
  for (let i = 1; i <= n; i++) {
    chunk.push(`${i}\t${PAD}\n`)
    if (chunk.length === 1000 || i === n) {
      if (!child.stdin.write(chunk.join(''))) await new Promise((r) => child.stdin.once('drain', r))
      chunk.length = 0
    }
  }
  child.stdin.end('\\.\n')
  const code = await done
  assert.equal(code, 0, `psql COPY failed: ${out}`)
  assert.match(out, new RegExp(`COPY ${n}`))
}

test(
  'COPY of 20,000 rows: raw and supabase-js readers get all, in order; a stalled supabase-js subscriber gets the notice, CHANNEL_ERROR, and rejoins',
  { timeout: 300_000 },
  withLog(gwOf, async () => {
    const TOTAL = 20_000
    const raw = await rawSubscriber('copied', 'copy-raw', { hiccupAt: [5_000] })
    const sb = await sbSubscriber('copied', 'copy-sb', { hiccupAt: [10_000] })
    const stalled = await sbSubscriber('copied', 'copy-stalled')
    const cutsBefore = (await env.gw.metric('realtime_postgres_changes_stalled_connections_total')) ?? 0

    wsOf(stalled.client)._socket.pause()
    const pausedAt = Date.now()
    await psqlCopy('copied', TOTAL)
    await readersDone([raw, sb], TOTAL, `all ${TOTAL} copied rows at both readers`)
    const cutAt = await cutObserved(cutsBefore)
    assertComplete([raw, sb], TOTAL)
    assert.deepEqual(raw.control.map((x) => x.m.raw), [])
    assert.deepEqual(sb.statuses, ['SUBSCRIBED'])
    assert.ok(cutAt - pausedAt >= GRACE_MS, `cut observed ${cutAt - pausedAt} ms after the pause, before the ${GRACE_MS} ms grace`)

    await resumeStalledSb(stalled, 'copy-stalled', TOTAL)
    assert.ok(stalled.system.some((s) => s.p.message === 'Subscribed to PostgreSQL'), 'the rejoined channel is live again')

    // The rejoined channel receives new rows.
    await env.db.query(`insert into copied (id, pad) values (${TOTAL + 1}, $1)`, [PAD])
    await until(() => stalled.seq.last === TOTAL + 1 && raw.seq.last === TOTAL + 1, { what: 'row 20001 at the rejoined subscriber' })
  }),
)

test(
  'realtime.send of 20,000 messages in one statement: supabase-js readers (vsn 2 and 1) get all, in order; a stalled subscriber gets the notice, CHANNEL_ERROR, and rejoins',
  { timeout: 300_000 },
  withLog(gwOf, async () => {
    const TOTAL = 20_000
    const sendAll = (from, to) =>
      env.db.query(
        `select realtime.send(jsonb_build_object('n', g, 'pad', $1::text), 'bulk', 'db-burst', false) from generate_series(${from}, ${to}) g`,
        [PAD],
      )
    const v2 = await sbBroadcastSubscriber('db-burst', 'db-v2', { hiccupAt: [5_000, 15_000] })
    const v1 = await sbBroadcastSubscriber('db-burst', 'db-v1', { hiccupAt: [10_000], vsn: '1.0.0' })
    const stalled = await sbBroadcastSubscriber('db-burst', 'db-stalled')
    const cutsBefore = (await env.gw.metric('realtime_postgres_changes_stalled_connections_total')) ?? 0

    wsOf(stalled.client)._socket.pause()
    const pausedAt = Date.now()
    const r = await sendAll(1, TOTAL)
    assert.equal(r.rowCount, TOTAL)
    await readersDone([v2, v1], TOTAL, `all ${TOTAL} database broadcasts at both readers`)
    const cutAt = await cutObserved(cutsBefore)
    assertComplete([v2, v1], TOTAL)
    assert.deepEqual(v2.statuses, ['SUBSCRIBED'])
    assert.deepEqual(v1.statuses, ['SUBSCRIBED'])
    assert.ok(cutAt - pausedAt >= GRACE_MS, `cut observed ${cutAt - pausedAt} ms after the pause, before the ${GRACE_MS} ms grace`)

    await resumeStalledSb(stalled, 'db-burst', TOTAL)

    // The rejoined channel receives new messages.
    await sendAll(TOTAL + 1, TOTAL + 1)
    await until(() => stalled.seq.last === TOTAL + 1 && v2.seq.last === TOTAL + 1, { what: 'message 20001 at the rejoined subscriber' })
  }),
)
