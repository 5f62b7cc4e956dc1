// Check 6 of issue 2: a subscriber that stops reading while 100k broadcasts flow.
// - the other subscribers (raw V2 and supabase-js) receive all 100k, in order, no gap;
// - the gateway's RSS stays bounded (see BOUNDS below);
// - the paused ones, once resumed, get the `system` notice then `phx_error`
//   (ref = join_ref); supabase-js then rejoins on its own;
// - realtime_client_lagged_frames_total counts the drops.
// A second test does the same with LAG_POLICY=skip: drops counted, no notice, channel kept.
//
// Nothing here depends on how fast the machine is: the publisher never has more than
// WINDOW + BATCH frames outstanding towards a fast subscriber (fewer than its backlog, so
// a slow test process cannot make the gateway drop its frames), and the paused clients
// stay paused for as long as publishing takes, so every time-based cut that would end
// a long pause is moved out of the way (see PAUSE_SAFE); drains end on a marker (a
// heartbeat reply queued behind everything sent before it), not on a quiet period.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { rssSampler, startGateway, withLog } from '../lib/gateway.mjs'
import { RawClient } from '../lib/raw.mjs'
import { ANON_KEY } from '../lib/jwt.mjs'
import { sbClient, subscribe, closeClients, wsOf } from '../lib/supabase.mjs'
import { until, sleep } from '../lib/util.mjs'

const TOPIC = 'lag-room'
const FULL = `realtime:${TOPIC}`
const BATCH = 250 // messages per REST batch request
const PAD = 'x'.repeat(1000) // ~1 KB per message: 100k of them are ~100 MB of frames
// The gateway's default per-client backlog (CLIENT_BACKLOG), which these gateways use.
const BACKLOG = 1024
// Before each batch the publisher waits until the *fast* subscribers have received all
// but WINDOW of what was published, so at most WINDOW + BATCH frames are ever on their
// way to a fast subscriber: half its backlog, however slowly this process reads (it
// shares one Node thread with every client). A gateway that stalled everyone behind the
// paused reader, or queued the paused reader's frames without bound, still fails: the
// fast subscribers would stop progressing, or the RSS bound below would break.
const WINDOW = 250
if (WINDOW + BATCH > BACKLOG / 2) throw new Error('WINDOW + BATCH must stay well under the backlog')
// The paused clients stay paused while publishing runs, which takes as long as the
// machine needs: the gateway's idle timeout (they send nothing) and write-stall cut
// (their sockets accept nothing) are set beyond any test run here, and the paused
// supabase-js client's own heartbeat timeout likewise (PAUSED_SB). Those cuts have
// nothing to do with the lag policy under test.
const PAUSE_SAFE = { IDLE_TIMEOUT_MS: '3600000', WRITE_TIMEOUT_MS: '3600000' }
const PAUSED_SB = { heartbeatIntervalMs: 3_600_000 }
// RSS bounds. The paused subscribers miss ~95k frames of ~1.1 KB each: a gateway
// that queued them without bound would grow by ≥ 100 MB (≥ 200 MB if per client).
// With a bounded backlog (1024 frames × 4 sockets ≈ 5 MB) plus request buffers
// and allocator slack, growth stays far below 64 MB.
const BOUNDS = { growthKiB: 64 * 1024, absoluteKiB: 200 * 1024 }

const headers = { apikey: ANON_KEY, authorization: `Bearer ${ANON_KEY}`, 'content-type': 'application/json' }
const cfg = { config: { broadcast: { self: false, ack: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } }

/** Sequence number of a broadcast frame (JSON text or kind-4 binary) as seen by a raw client. */
const seqOf = (m) => (m.kind === 'binary' ? m.payload?.n : m.payload?.payload?.n)

/** Posts messages [from, to] (1-based, inclusive) in one batch; asserts 202. */
async function publish(gw, from, to) {
  const messages = []
  for (let n = from; n <= to; n++) messages.push({ topic: TOPIC, event: 'seq', payload: { n, pad: PAD } })
  const r = await fetch(`${gw.url}/api/broadcast`, { method: 'POST', headers, body: JSON.stringify({ messages }) })
  const text = await r.text()
  assert.equal(r.status, 202, `batch ${from}..${to} answered ${r.status} ${text}`)
}

/** A sequence checker: next(n) must be called with 1, 2, 3, ... */
function inOrder(label) {
  const s = { label, count: 0, last: 0, errors: [] }
  s.next = (n) => {
    if (n !== s.last + 1 && s.errors.length < 5) s.errors.push(`${label}: got ${n} after ${s.last}`)
    s.last = n
    s.count++
  }
  return s
}

/** A raw V2 subscriber that does not keep frames, only checks them. */
async function rawSubscriber(gw, label, { strictOrder }) {
  const c = await RawClient.connect(gw, { vsn: '2.0.0', collect: false })
  const seq = inOrder(label)
  const seen = [] // for the slow one: every sequence number, to check monotonicity
  const control = [] // non-broadcast frames (system, phx_error, ...), in arrival order, with the count before them
  c.onMessage = (m) => {
    if (m.event === 'broadcast' && m.topic === FULL) {
      const n = seqOf(m)
      if (strictOrder) seq.next(n)
      else {
        seen.push(n)
        seq.count++
      }
    } else control.push({ m, afterCount: seq.count })
  }
  c.collect = true // collect until joined, for the join reply
  try {
    const { joinRef } = await c.join(FULL, cfg, { timeoutMs: 30_000 })
    c.collect = false
    control.length = 0 // the join reply
    return { c, seq, seen, control, joinRef }
  } catch (e) {
    c.terminate()
    throw e
  }
}

async function sbSubscriber(gw, label, { strictOrder, realtime = {} }) {
  const client = sbClient(gw, realtime)
  const seq = inOrder(label)
  const seen = []
  const system = []
  const ch = client
    .channel(TOPIC)
    .on('broadcast', { event: 'seq' }, (m) => {
      if (strictOrder) seq.next(m.payload.n)
      else {
        seen.push(m.payload.n)
        seq.count++
      }
    })
    .on('system', {}, (p) => system.push({ p, afterCount: seq.count }))
  try {
    const sub = await subscribe(ch)
    return { client, ch, seq, seen, system, ...sub }
  } catch (e) {
    await closeClients(client)
    throw e
  }
}

/**
 * Sends a heartbeat on a raw subscriber and waits for its reply. The reply is queued
 * behind every frame already queued for that socket, so once it arrives the socket
 * has received everything sent to it before the heartbeat.
 */
async function drained(sub, what) {
  const ref = sub.c.push('phoenix', 'heartbeat', {})
  await until(() => sub.control.some((x) => x.m.event === 'phx_reply' && x.m.topic === 'phoenix' && x.m.ref === ref), {
    timeoutMs: 120_000,
    what: () => `the heartbeat reply on ${what} (received ${sub.seq.count})`,
  })
  const i = sub.control.findIndex((x) => x.m.topic === 'phoenix' && x.m.ref === ref)
  sub.control.splice(i, 1)
}

const strictlyIncreasing = (xs) => xs.every((x, i) => i === 0 || x > xs[i - 1])

/** Publishes 1..total in batches, staying at most WINDOW ahead of the fast subscribers. */
async function publishAll(gw, total, fast) {
  for (let from = 1; from <= total; from += BATCH) {
    await until(() => fast.every((s) => s.count >= from - 1 - WINDOW), {
      timeoutMs: 60_000,
      every: 5,
      what: () => `fast subscribers to reach ${from - 1 - WINDOW} (at ${fast.map((s) => `${s.label}=${s.count}`).join(', ')})`,
    })
    await publish(gw, from, Math.min(total, from + BATCH - 1))
  }
}

let gw
let gwSkip
before(async () => {
  ;[gw, gwSkip] = await Promise.all([
    // The defaults under test: CLIENT_BACKLOG 1024, LAG_POLICY error.
    startGateway({ name: 'lag', env: { CLIENT_BACKLOG: null, LAG_POLICY: null, ...PAUSE_SAFE } }),
    startGateway({ name: 'lag-skip', env: { CLIENT_BACKLOG: null, LAG_POLICY: 'skip', ...PAUSE_SAFE } }),
  ])
})
after(async () => {
  await Promise.all([gw?.stop(), gwSkip?.stop()])
})

test('100k broadcasts with a paused subscriber: others get all in order, memory bounded, laggard gets system + phx_error, drops counted', { timeout: 600_000 }, withLog(() => gw, async () => {
  const TOTAL = 100_000
  // Everything opened is closed in `finally`, whatever fails (a leftover client or
  // timer would keep this file's process alive).
  let fastRaw, fastSb, slowRaw, slowSb, rss
  try {
    fastRaw = await rawSubscriber(gw, 'fast raw V2', { strictOrder: true })
    fastSb = await sbSubscriber(gw, 'fast supabase-js', { strictOrder: true })
    slowRaw = await rawSubscriber(gw, 'paused raw V2', { strictOrder: false })
    slowSb = await sbSubscriber(gw, 'paused supabase-js', { strictOrder: false, realtime: PAUSED_SB })
    assert.equal(await gw.metric('realtime_client_lagged_frames_total') ?? 0, 0, 'no drops before the test')
    slowRaw.c.pause()
    wsOf(slowSb.client)._socket.pause()

    const baseline = gw.rssKiB()
    rss = rssSampler(gw)
    const t0 = Date.now()
    await publishAll(gw, TOTAL, [fastRaw.seq, fastSb.seq])
    await until(() => fastRaw.seq.count >= TOTAL && fastSb.seq.count >= TOTAL, {
      timeoutMs: 120_000,
      what: () => `all ${TOTAL} at the fast subscribers (raw ${fastRaw.seq.count}, supabase-js ${fastSb.seq.count})`,
    })
    const elapsed = Date.now() - t0
    const peak = rss.stop()
    console.log(`# lag: ${TOTAL} broadcasts delivered to the fast subscribers in ${elapsed} ms; RSS baseline ${baseline} KiB, peak ${peak} KiB`)

    // Other subscribers: everything, in order, no gap, never told to rejoin.
    assert.deepEqual([...fastRaw.seq.errors, ...fastSb.seq.errors], [], 'fast subscribers saw a gap or reordering')
    assert.equal(fastRaw.seq.count, TOTAL)
    assert.equal(fastSb.seq.count, TOTAL)
    assert.deepEqual(fastRaw.control.map((x) => x.m.raw), [], 'the fast raw subscriber got control frames')
    assert.deepEqual(fastSb.statuses, ['SUBSCRIBED'])

    // Memory stayed bounded.
    assert.ok(peak - baseline < BOUNDS.growthKiB, `RSS grew by ${peak - baseline} KiB (baseline ${baseline}, peak ${peak}); bound ${BOUNDS.growthKiB}`)
    assert.ok(peak < BOUNDS.absoluteKiB, `RSS peak ${peak} KiB over ${BOUNDS.absoluteKiB}`)

    // Drops were counted while the laggards were still paused.
    const dropsBeforeResume = await gw.metric('realtime_client_lagged_frames_total')
    assert.ok(dropsBeforeResume > 0, `realtime_client_lagged_frames_total = ${dropsBeforeResume}`)

    // Resume: the paused raw client drains what was queued, then gets the notice and phx_error.
    slowRaw.c.resume()
    wsOf(slowSb.client)._socket.resume()
    await until(() => slowRaw.control.some((x) => x.m.event === 'phx_error'), { timeoutMs: 120_000, what: 'phx_error on the paused raw client' })
    // Nothing may follow on that channel: everything queued after the phx_error would
    // arrive before this heartbeat's reply.
    await drained(slowRaw, 'the paused raw client')
    const ctl = slowRaw.control.map((x) => x.m)
    assert.deepEqual(ctl.map((m) => m.event), ['system', 'phx_error'], `control frames: ${ctl.map((m) => m.raw).join(' ')}`)
    const [sys, err] = ctl
    const received = slowRaw.seq.count
    assert.ok(received < TOTAL, 'the paused subscriber received everything: nothing was dropped')
    assert.ok(strictlyIncreasing(slowRaw.seen), 'the paused subscriber got frames out of order or twice')
    assert.equal(slowRaw.control[0].afterCount, received, 'broadcast frames arrived after the system notice')
    const expectedMessage = /^(\d+) messages were dropped because the client could not keep up/
    assert.match(sys.payload?.message ?? '', expectedMessage, sys.raw)
    assert.deepEqual(sys.frame, [slowRaw.joinRef, null, FULL, 'system', { extension: 'system', status: 'error', message: sys.payload.message, channel: TOPIC }])
    assert.equal(err.join_ref, slowRaw.joinRef, `phx_error join_ref: ${err.raw}`)
    assert.equal(err.ref, slowRaw.joinRef, `phx_error ref must equal the join_ref or realtime-js ignores it: ${err.raw}`)
    assert.equal(err.topic, FULL)
    assert.equal(typeof err.payload, 'object')
    const reportedRaw = Number(expectedMessage.exec(sys.payload.message)[1])
    assert.equal(reportedRaw, TOTAL - received, `the notice says ${reportedRaw} dropped, but the client received ${received} of ${TOTAL} (missed ${TOTAL - received})`)

    // supabase-js: system message to .on('system'), CHANNEL_ERROR, then its own rejoin
    // (after its 1 s rejoin back-off; polled, so a rejoin that came early is seen too).
    await until(() => slowSb.statuses.slice(1).includes('SUBSCRIBED'), {
      timeoutMs: 60_000,
      what: () => `the paused supabase-js channel to rejoin (statuses: ${slowSb.statuses.join(' → ')})`,
    })
    assert.equal(slowSb.statuses[0], 'SUBSCRIBED')
    assert.match(slowSb.statuses[1] ?? '', /^CHANNEL_ERROR/, `statuses: ${slowSb.statuses.join(' → ')}`)
    assert.equal(slowSb.statuses.at(-1), 'SUBSCRIBED')
    assert.equal(slowSb.system.length, 1, `system messages: ${JSON.stringify(slowSb.system.map((s) => s.p))}`)
    const sbSys = slowSb.system[0]
    assert.equal(sbSys.p.status, 'error')
    assert.equal(sbSys.p.extension, 'system')
    assert.equal(sbSys.p.channel, TOPIC)
    assert.match(sbSys.p.message, expectedMessage)
    const sbReceived = slowSb.seq.count
    assert.ok(sbReceived < TOTAL)
    assert.ok(strictlyIncreasing(slowSb.seen), 'the paused supabase-js subscriber got frames out of order or twice')
    assert.equal(Number(expectedMessage.exec(sbSys.p.message)[1]), TOTAL - sbReceived, `supabase-js notice: ${sbSys.p.message}; it received ${sbReceived}`)

    // The counter: every frame the two paused subscribers missed.
    const drops = await gw.metric('realtime_client_lagged_frames_total')
    assert.equal(drops, (TOTAL - received) + (TOTAL - sbReceived), `metric ${drops}; missed: raw ${TOTAL - received}, supabase-js ${TOTAL - sbReceived}`)

    // After the error the raw channel is gone (it did not rejoin); the rejoined supabase-js one works.
    await publish(gw, TOTAL + 1, TOTAL + 1)
    await until(() => fastRaw.seq.count === TOTAL + 1 && fastSb.seq.count === TOTAL + 1 && slowSb.seen.at(-1) === TOTAL + 1, {
      timeoutMs: 60_000,
      what: 'message 100001 at the fast subscribers and the rejoined supabase-js one',
    })
    // Had 100001 been sent to the errored channel, it would come before this reply.
    await drained(slowRaw, 'the errored raw client')
    assert.ok(!slowRaw.seen.includes(TOTAL + 1), 'the errored raw channel still received broadcasts after phx_error')
    assert.deepEqual(slowRaw.control.slice(2).map((x) => x.m.raw), [], 'frames on the errored raw channel after phx_error')
  } finally {
    rss?.stop()
    for (const s of [fastRaw, slowRaw]) s?.c.terminate()
    await closeClients(fastSb?.client, slowSb?.client)
  }
}))

test('LAG_POLICY=skip: drops are counted, no notice, the paused channel keeps receiving afterwards', { timeout: 300_000 }, withLog(() => gwSkip, async () => {
  const TOTAL = 20_000
  let fast, slow
  try {
    fast = await rawSubscriber(gwSkip, 'fast raw V2', { strictOrder: true })
    slow = await rawSubscriber(gwSkip, 'paused raw V2', { strictOrder: false })
    slow.c.pause()
    await publishAll(gwSkip, TOTAL, [fast.seq])
    await until(() => fast.seq.count >= TOTAL, { timeoutMs: 120_000, what: 'all messages at the fast subscriber' })
    assert.deepEqual(fast.seq.errors, [])
    const drops = await gwSkip.metric('realtime_client_lagged_frames_total')
    assert.ok(drops > 0, `realtime_client_lagged_frames_total = ${drops}`)

    // Every broadcast was handed out before its 202, so the heartbeat reply queues
    // behind all that reached the paused client's backlog: it has them all after it.
    slow.c.resume()
    await drained(slow, 'the paused raw client')
    assert.deepEqual(slow.control.map((x) => x.m.raw), [], 'LAG_POLICY=skip must not send system/phx_error')
    assert.ok(slow.seq.count < TOTAL, 'nothing was dropped')
    assert.ok(strictlyIncreasing(slow.seen), 'out of order or duplicated frames')
    assert.equal(drops, TOTAL - slow.seq.count, `metric ${drops}, but the paused client missed ${TOTAL - slow.seq.count}`)

    await publish(gwSkip, TOTAL + 1, TOTAL + 1)
    await until(() => slow.seen.at(-1) === TOTAL + 1, { timeoutMs: 60_000, what: 'the skipped channel to keep receiving' })
  } finally {
    fast?.c.terminate()
    slow?.c.terminate()
  }
}))
