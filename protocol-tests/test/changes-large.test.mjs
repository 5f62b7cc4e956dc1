// Large rows and bulk statements (issue 3, check 4): rows above the 8000-byte NOTIFY
// limit (20 KB, 900 KB) arrive intact; a row above MAX_RECORD_BYTES (1 MiB) arrives with
// errors ["Error 413: Payload Too Large", "columns left out: ..."]; the writer's
// transaction never fails; `INSERT ... SELECT generate_series(1,100000)` arrives complete
// (every id exactly once) at a raw V2 subscriber while the gateway's RSS stays bounded.
//
// The gateway runs with the default CLIENT_BACKLOG: flow control (issue 9) paces Postgres Changes
// to what the client reads, so nothing is dropped however fast the gateway is. A drop would show
// up as a `system` error / phx_error and missing ids, and fail the test.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { startChangesEnv, rawPgSubscribe, waitLive } from '../lib/changes-env.mjs'
import { withLog } from '../lib/gateway.mjs'
import { sleep, until } from '../lib/util.mjs'

let env
const sockets = []
const RSS_LIMIT_MB = 300
const BULK = 100000

before(async () => {
  env = await startChangesEnv({
    name: 'changes-large',
    setupSql: `create table docs (id int primary key, body text, n int);
               create table bulk (id int primary key, label text, n int);`,
  })
  await env.db.query(`select realtime_gateway.enable('public.docs')`)
  await env.db.query(`select realtime_gateway.enable('public.bulk')`)
  await waitLive(env.gw, 'docs')
  await waitLive(env.gw, 'bulk')
})

after(async () => {
  for (const s of sockets) s.close()
  if (env) await env.stop()
})

const gwOf = () => env?.gw

test(
  '20 KB and 900 KB rows arrive intact (INSERT, UPDATE with both images); a 1.1 MB row carries Error 413',
  withLog(gwOf, async () => {
    const events = []
    const sub = await rawPgSubscribe(env.gw, 'realtime:docs', [{ event: '*', schema: 'public', table: 'docs' }], {
      onChange: (p) => events.push(p),
    })
    sockets.push(sub.client)
    assert.equal(sub.system.payload.message, 'Subscribed to PostgreSQL')

    const body20k = randomBytes(10 * 1024).toString('hex') // 20480 chars, incompressible
    const body900k = randomBytes(675 * 1024).toString('base64') // 921600 chars
    const body1100k = randomBytes(825 * 1024).toString('base64') // 1126400 chars > 1 MiB
    // Each statement must succeed: the capture trigger never fails the writer.
    await env.db.query(`insert into docs values (1, $1, 1)`, [body20k])
    await env.db.query(`insert into docs values (2, $1, 2)`, [body900k])
    await env.db.query(`update docs set n = 22 where id = 2`)
    await env.db.query(`insert into docs values (3, $1, 3)`, [body1100k])
    // Several large rows in one transaction.
    await env.db.query('begin')
    for (let i = 10; i < 15; i++) await env.db.query(`insert into docs values ($1, $2, $1)`, [i, body20k + i])
    await env.db.query('commit')
    const { rows } = await env.db.query(`select count(*)::int as n from docs`)
    assert.equal(rows[0].n, 8, 'every write committed')

    await until(() => events.length >= 9, { timeoutMs: 20000, what: `9 events on docs (have ${events.length})` })
    await sleep(300)
    assert.equal(events.length, 9)
    const d = events.map((e) => e.data)
    assert.deepEqual(
      d.map((x) => [x.type, (x.record ?? x.old_record).id]),
      [['INSERT', 1], ['INSERT', 2], ['UPDATE', 2], ['INSERT', 3], ['INSERT', 10], ['INSERT', 11], ['INSERT', 12], ['INSERT', 13], ['INSERT', 14]],
    )
    assert.deepEqual(d[0].record, { id: 1, body: body20k, n: 1 })
    assert.equal(d[0].errors, null)
    assert.ok(d[1].record.body === body900k, `900 KB body intact (got ${d[1].record.body?.length} chars)`)
    assert.deepEqual(d[1].record, { id: 2, body: body900k, n: 2 })
    assert.equal(d[1].errors, null)
    assert.deepEqual(d[2].record, { id: 2, body: body900k, n: 22 })
    assert.deepEqual(d[2].old_record, { id: 2, body: body900k, n: 2 })
    assert.equal(d[2].errors, null)
    assert.deepEqual(d[3].errors, ['Error 413: Payload Too Large', 'columns left out: body'])
    assert.deepEqual(d[3].record, { id: 3, n: 3 })
    assert.deepEqual(d[3].columns, [
      { name: 'id', type: 'int4' },
      { name: 'body', type: 'text' },
      { name: 'n', type: 'int4' },
    ])
    for (let i = 0; i < 5; i++) {
      assert.deepEqual(d[4 + i].record, { id: 10 + i, body: body20k + (10 + i), n: 10 + i })
      assert.equal(d[4 + i].errors, null)
    }
    assert.deepEqual(sub.client.inbox.filter((m) => m.event !== 'postgres_changes').map((m) => m.raw), [], 'no system/phx_error frames')
  }),
)

test(
  `INSERT ... SELECT generate_series of ${BULK} rows arrives complete, exactly once, with bounded gateway RSS`,
  withLog(gwOf, async () => {
    const seen = new Uint8Array(BULK + 1)
    let count = 0
    let dup = 0
    let bad = 0
    const others = []
    const sub = await rawPgSubscribe(env.gw, 'realtime:bulk', [{ event: 'INSERT', schema: 'public', table: 'bulk' }], {
      collect: false,
      onChange: (p) => {
        const r = p.data?.record
        if (!r || p.data.type !== 'INSERT' || r.label !== `row ${r.id}` || r.n !== r.id * 2) bad++
        else if (seen[r.id]++) dup++
        count++
      },
    })
    sockets.push(sub.client)
    // Delivery is paced by this reader, so on a slow machine the test can outlast the idle timeout.
    sub.client.keepAlive()
    const prevHook = sub.client.onMessage
    sub.client.onMessage = (m) => {
      prevHook(m)
      if (m.event !== 'postgres_changes' && m.topic !== 'phoenix') others.push(m.raw ?? '<binary>')
    }
    assert.equal(sub.system.payload.message, 'Subscribed to PostgreSQL')

    const rssStart = env.gw.rssKiB()
    let rssMax = rssStart
    const sampler = setInterval(() => {
      try {
        rssMax = Math.max(rssMax, env.gw.rssKiB())
      } catch {}
    }, 100)
    const t0 = Date.now()
    let insertMs
    try {
      const r = await env.db.query(`insert into bulk (id, label, n) select i, 'row ' || i, i * 2 from generate_series(1, ${BULK}) i`)
      insertMs = Date.now() - t0
      assert.equal(r.rowCount, BULK, 'the bulk insert committed every row')
      await until(() => count >= BULK || others.length > 0, { timeoutMs: 90000, every: 100, what: `${BULK} events (have ${count})` })
      await sleep(500)
    } finally {
      clearInterval(sampler)
    }
    const deliverMs = Date.now() - t0
    let missing = 0
    let firstMissing = null
    for (let i = 1; i <= BULK; i++) {
      if (!seen[i]) {
        missing++
        firstMissing ??= i
      }
    }
    console.log(
      `# bulk: insert ${insertMs} ms, all delivered after ${deliverMs} ms; gateway RSS ${Math.round(rssStart / 1024)} MB → max ${Math.round(rssMax / 1024)} MB`,
    )
    assert.deepEqual(others.slice(0, 5), [], 'no system / phx_error frames (lag drops) on the bulk channel')
    assert.deepEqual({ count, missing, firstMissing, dup, bad }, { count: BULK, missing: 0, firstMissing: null, dup: 0, bad: 0 })
    assert.ok(rssMax / 1024 < RSS_LIMIT_MB, `gateway RSS peaked at ${Math.round(rssMax / 1024)} MB (limit ${RSS_LIMIT_MB} MB)`)
  }),
)
