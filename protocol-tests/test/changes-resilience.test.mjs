// Nothing lost (issue 3, check 5): changes committed while the gateway's listener
// connection is down (pg_terminate_backend, Postgres restart) are delivered after it comes
// back, exactly once, each writer's rows in commit order; a transaction that took its
// sequence values early but commits late is not skipped.
//
// Subscribers are a raw V2 client (supabase-js-style config binding) and a raw V1 client
// (wscat-style topic), both on the default CLIENT_BACKLOG. A lag drop would arrive as a
// `system` error + phx_error and fail the test with that frame in the message.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startChangesEnv, rawPgSubscribe, waitLive, isPgSystem } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sleep, until } from '../lib/util.mjs'

let env
const sockets = []

const SETUP = `
create table events (
  id bigserial primary key,
  writer int not null,
  seq int not null,
  note text,
  unique (writer, seq)
);
`

before(async () => {
  env = await startChangesEnv({ name: 'changes-resilience', setupSql: SETUP })
  await env.db.query(`select realtime_gateway.enable('public.events')`)
  await waitLive(env.gw, 'events')
  await env.listenerPid()
})

after(async () => {
  for (const s of sockets) s.close()
  if (env) await env.stop()
})

const gwOf = () => env?.gw

/**
 * Two subscribers on public.events. `rows[name]` collects [writer, seq] of every INSERT in
 * arrival order; `other[name]` every non-event frame after the subscription (system, phx_error...).
 */
async function subscribers(tag) {
  const rows = { v2: [], v1: [] }
  const other = { v2: [], v1: [] }
  const v2 = await rawPgSubscribe(env.gw, `realtime:res-${tag}`, [{ event: 'INSERT', schema: 'public', table: 'events' }], {
    collect: false,
    onChange: (p) => rows.v2.push([p.data.record.writer, p.data.record.seq]),
  })
  sockets.push(v2.client)
  assert.equal(v2.system.payload.message, 'Subscribed to PostgreSQL')
  const hook2 = v2.client.onMessage
  v2.client.onMessage = (m) => {
    hook2(m)
    if (m.event !== 'postgres_changes' && m.topic !== 'phoenix') other.v2.push(m.raw)
  }

  const v1 = await RawClient.connect(env.gw, { vsn: '1.0.0' })
  sockets.push(v1)
  v1.push('realtime:public:events', 'phx_join', {}, { ref: '1' })
  const reply = await v1.reply('realtime:public:events', '1')
  assert.equal(reply.payload.status, 'ok')
  const sys = await v1.next(isPgSystem, { timeoutMs: 10000, what: 'system on realtime:public:events' })
  assert.equal(sys.payload.message, 'Subscribed to PostgreSQL')
  v1.collect = false
  // Heartbeats, as realtime-js sends them: on a loaded machine a scenario outlasts the 60 s idle timeout.
  v1.keepAlive()
  v2.client.keepAlive()
  v1.inbox.length = 0
  v1.onMessage = (m) => {
    if (m.topic === 'phoenix') return
    if (m.event === 'postgres_changes' && m.payload.type === 'INSERT') rows.v1.push([m.payload.record.writer, m.payload.record.seq])
    else other.v1.push(m.raw)
  }
  return { rows, other, close: () => (v2.client.close(), v1.close()) }
}

/**
 * Checks that `rows` holds, per writer, seq 0..n-1 exactly once and in order, where n is
 * `perWriter` (a number, or a Map writer → count).
 */
function checkDelivery(name, rows, writers, perWriterOrMap) {
  const byWriter = new Map()
  for (const [w, s] of rows) {
    if (!byWriter.has(w)) byWriter.set(w, [])
    byWriter.get(w).push(s)
  }
  const problems = []
  for (const w of writers) {
    const perWriter = typeof perWriterOrMap === 'number' ? perWriterOrMap : perWriterOrMap.get(w)
    const seqs = byWriter.get(w) ?? []
    const seen = new Set()
    let dups = 0
    let outOfOrder = 0
    let firstOutOfOrder = null
    for (let i = 0; i < seqs.length; i++) {
      if (seen.has(seqs[i])) dups++
      seen.add(seqs[i])
      if (i > 0 && seqs[i] <= seqs[i - 1] && outOfOrder++ === 0) firstOutOfOrder = `${seqs[i - 1]} then ${seqs[i]}`
    }
    const missing = []
    for (let s = 0; s < perWriter; s++) if (!seen.has(s)) missing.push(s)
    if (dups || outOfOrder || missing.length || seqs.length !== perWriter) {
      problems.push(
        `${name} writer ${w}: received ${seqs.length}/${perWriter}, duplicates ${dups}, out of order ${outOfOrder}` +
          `${firstOutOfOrder ? ` (first: ${firstOutOfOrder})` : ''}, missing ${missing.length}${missing.length ? ` (first: ${missing.slice(0, 5).join(',')})` : ''}`,
      )
    }
  }
  const extra = [...byWriter.keys()].filter((w) => !writers.includes(w))
  if (extra.length) problems.push(`${name}: rows from unexpected writers ${extra.join(',')}`)
  return problems
}

/**
 * Runs `writers` concurrent writers, each inserting seq 0..perWriter-1 (and on while
 * `keepGoing()` holds) in single-row autocommit transactions; `written` has each
 * writer's final count once `done` resolves. `onProgress(total)` is polled by the caller via the returned
 * `progress()`. With `retry`, connection errors reconnect and retry the same seq
 * (idempotent through on conflict do nothing), so a restart does not stop them.
 */
function runWriters({ writers, perWriter, retry = false, keepGoing = () => false }) {
  let inserted = 0
  let retries = 0
  const written = new Map()
  const one = async (w) => {
    let c = await env.pg.connect(env.dbName, { applicationName: `writer-${w}` })
    let s = 0
    try {
      while (s < perWriter || keepGoing()) {
        try {
          await c.query(`insert into events (writer, seq, note) values ($1, $2, $3) on conflict (writer, seq) do nothing`, [w, s, `w${w}s${s}`])
          s++
          inserted++
        } catch (e) {
          if (!retry) throw new Error(`writer ${w} seq ${s}: ${e.message}`)
          retries++
          await c.end().catch(() => {})
          for (;;) {
            await sleep(50)
            try {
              c = await env.pg.connect(env.dbName, { applicationName: `writer-${w}` })
              break
            } catch {}
          }
        }
      }
    } finally {
      written.set(w, s)
      await c.end().catch(() => {})
    }
  }
  const done = Promise.all(writers.map(one))
  return { done, progress: () => inserted, retries: () => retries, written }
}

async function waitDelivered(subs, total, run, timeoutMs = 60000) {
  await until(
    () => (subs.rows.v2.length >= total && subs.rows.v1.length >= total) || subs.other.v2.length || subs.other.v1.length,
    { timeoutMs, every: 100, what: `${total} rows at both subscribers (v2 ${subs.rows.v2.length}, v1 ${subs.rows.v1.length})` },
  ).catch(async (e) => {
    // Lost, or stalled? Which rows are missing, what the listener is doing, and
    // whether one more commit (a wake-up) brings them.
    const writers = [...run.written.keys()]
    const before = checkDelivery('v2', subs.rows.v2, writers, run.written)
    const listener = await env.pg
      .query('postgres', `select state, wait_event_type, wait_event, left(query, 60) as query from pg_stat_activity where application_name = 'realtime_gateway_listener' and datname = $1`, [env.dbName])
      .then((r) => JSON.stringify(r.rows))
      .catch((x) => x.message)
    await env.db.query(`insert into events (writer, seq) values (-1, 0)`).catch(() => {})
    await sleep(5000)
    const after = checkDelivery('v2', subs.rows.v2.filter(([w]) => w !== -1), writers, run.written)
    throw new Error(
      `${e.message}; other frames: ${JSON.stringify(subs.other)}; missing at the time-out: ${before.join(' | ')}; ` +
        `listener: ${listener}; 5 s after one more commit: ${after.length ? after.join(' | ') : 'all delivered (a stall, not a loss)'}`,
    )
  })
  await sleep(500) // duplicates would arrive now
}

test(
  '20k rows from 4 writers while the listener connection is killed 5 times: all delivered exactly once, in order per writer',
  withLog(gwOf, async () => {
    // Writers write at least PER rows each and keep going until the fifth kill is done,
    // so every kill lands mid-stream however fast or slow the machine is.
    const WRITERS = [1, 2, 3, 4]
    const PER = 5000
    const MIN_TOTAL = WRITERS.length * PER
    const subs = await subscribers('kill')
    const t0 = Date.now()
    let killing = true
    const run = runWriters({ writers: WRITERS, perWriter: PER, keepGoing: () => killing })
    const kills = []
    try {
      for (const frac of [0.1, 0.25, 0.4, 0.55, 0.7]) {
        await until(() => run.progress() >= frac * MIN_TOTAL, { timeoutMs: 60000, every: 10, what: `${frac * 100}% written` })
        const pidBefore = await env.listenerPid() // the listener is back (re-LISTENed) before each kill
        const at = run.progress()
        const n = await env.killListener()
        await env.listenerPid()
        kills.push({ at, pidBefore, terminated: n, writtenWhileDown: run.progress() - at })
      }
    } finally {
      killing = false
    }
    await run.done
    const TOTAL = [...run.written.values()].reduce((a, b) => a + b, 0)
    const writeMs = Date.now() - t0
    await waitDelivered(subs, TOTAL, run)
    console.log(`# kill test: wrote ${TOTAL} rows in ${writeMs} ms, delivered after ${Date.now() - t0} ms; kills at ${kills.map((k) => k.at).join(', ')} rows, rows committed before the listener was back: ${kills.map((k) => k.writtenWhileDown).join(', ')}`)
    subs.close()
    assert.deepEqual(
      kills.map((k) => k.terminated),
      [1, 1, 1, 1, 1],
      `each kill terminated the listener: ${JSON.stringify(kills)}`,
    )
    assert.equal(new Set(kills.map((k) => k.pidBefore)).size, 5, 'the listener reconnected (new backend) after every kill')
    assert.deepEqual({ v2: subs.other.v2, v1: subs.other.v1 }, { v2: [], v1: [] }, 'no system errors / phx_error')
    assert.deepEqual([...checkDelivery('v2', subs.rows.v2, WRITERS, run.written), ...checkDelivery('v1', subs.rows.v1, WRITERS, run.written)], [])
    assert.equal(subs.rows.v2.length, TOTAL)
    assert.equal(subs.rows.v1.length, TOTAL)
  }),
)

test(
  '4k rows from 4 writers across a Postgres restart (pg_ctl restart -m fast): all delivered exactly once, in order per writer',
  withLog(gwOf, async () => {
    const WRITERS = [11, 12, 13, 14]
    const PER = 1000
    const TOTAL = WRITERS.length * PER
    const subs = await subscribers('restart')
    const t0 = Date.now()
    const run = runWriters({ writers: WRITERS, perWriter: PER, retry: true })
    await until(() => run.progress() >= 0.3 * TOTAL, { timeoutMs: 60000, every: 10, what: '30% written' })
    const pidBefore = await env.listenerPid()
    const restartAt = run.progress()
    await env.pg.restart()
    const restartedAt = run.progress()
    const pidBack = await env.listenerPid()
    const writtenWhileDown = run.progress() - restartedAt
    // The test's own connection died with the restart: reconnect it for later tests.
    env.db = await env.pg.connect(env.dbName)
    await run.done
    const writeMs = Date.now() - t0
    const { rows } = await env.db.query(`select count(*)::int as n from events where writer = any($1)`, [WRITERS])
    assert.equal(rows[0].n, TOTAL, 'every row committed')
    await waitDelivered(subs, TOTAL, run)
    const pidAfter = await env.listenerPid()
    assert.equal(pidAfter, pidBack)
    console.log(
      `# restart test: restart at ${restartAt} rows, ${writtenWhileDown} rows committed after the restart before the listener was back, writers retried ${run.retries()} times, wrote ${TOTAL} in ${writeMs} ms, delivered after ${Date.now() - t0} ms`,
    )
    subs.close()
    assert.notEqual(pidAfter, pidBefore, 'a new listener connection after the restart')
    assert.ok(restartAt < TOTAL)
    assert.deepEqual({ v2: subs.other.v2, v1: subs.other.v1 }, { v2: [], v1: [] }, 'no system errors / phx_error')
    assert.deepEqual([...checkDelivery('v2', subs.rows.v2, WRITERS, PER), ...checkDelivery('v1', subs.rows.v1, WRITERS, PER)], [])
    assert.equal(subs.rows.v2.length, TOTAL)
    assert.equal(subs.rows.v1.length, TOTAL)
  }),
)

test(
  'a transaction that inserted early but commits after later transactions is delivered (listener up, and listener down)',
  withLog(gwOf, async () => {
    const subs = await subscribers('late')
    const fast = await env.pg.connect(env.dbName, { applicationName: 'fast-writer' })
    const admin = await env.pg.connect('postgres', { applicationName: 'admin' })
    let w = 20
    try {
      // Scenario A: the listener stays connected.
      // Scenario B: the listener is killed and cannot reconnect (allow_connections false)
      //             while the late transaction commits.
      for (const scenario of ['listener up', 'listener down']) {
        const lateW = w++
        const fastW = w++
        const slow = await env.pg.connect(env.dbName, { applicationName: 'slow-writer' })
        await slow.query('begin')
        const { rows } = await slow.query(`insert into events (writer, seq) values ($1, 0) returning id`, [lateW])
        const slowId = Number(rows[0].id)
        for (let s = 0; s < 10; s++) await fast.query(`insert into events (writer, seq) values ($1, $2)`, [fastW, s])
        await until(() => subs.rows.v2.filter(([x]) => x === fastW).length === 10 && subs.rows.v1.filter(([x]) => x === fastW).length === 10, {
          timeoutMs: 10000,
          what: `${scenario}: the 10 fast rows (ids above ${slowId}) delivered`,
        })
        if (scenario === 'listener down') {
          await admin.query(`alter database "${env.dbName}" allow_connections false`)
          try {
            assert.equal(await env.killListener(), 1, 'listener terminated')
            await slow.query('commit')
            for (let s = 10; s < 20; s++) await fast.query(`insert into events (writer, seq) values ($1, $2)`, [fastW, s])
            await sleep(1000)
            const still = await admin.query(`select count(*)::int as n from pg_stat_activity where application_name = 'realtime_gateway_listener' and datname = $1`, [env.dbName])
            assert.equal(still.rows[0].n, 0, 'the listener could not reconnect while connections were refused')
          } finally {
            await admin.query(`alter database "${env.dbName}" allow_connections true`)
          }
        } else {
          await slow.query('commit')
          for (let s = 10; s < 20; s++) await fast.query(`insert into events (writer, seq) values ($1, $2)`, [fastW, s])
        }
        await slow.end()
        await until(
          () => subs.other.v2.length || subs.other.v1.length || (subs.rows.v2.filter(([x]) => x === fastW).length >= 20 && subs.rows.v1.filter(([x]) => x === fastW).length >= 20),
          { timeoutMs: 30000, every: 100, what: `${scenario}: the 10 later fast rows` },
        )
        await sleep(1000)
        const late = { v2: subs.rows.v2.filter(([x]) => x === lateW).length, v1: subs.rows.v1.filter(([x]) => x === lateW).length }
        assert.deepEqual(late, { v2: 1, v1: 1 }, `${scenario}: the late-committing row (id ${slowId}, below the ids already delivered) arrives exactly once`)
        assert.deepEqual(
          [...checkDelivery('v2', subs.rows.v2.filter(([x]) => x === fastW), [fastW], 20), ...checkDelivery('v1', subs.rows.v1.filter(([x]) => x === fastW), [fastW], 20)],
          [],
        )
      }
      assert.deepEqual({ v2: subs.other.v2, v1: subs.other.v1 }, { v2: [], v1: [] }, 'no system errors / phx_error')
    } finally {
      subs.close()
      await fast.end().catch(() => {})
      await admin.end().catch(() => {})
    }
  }),
)
