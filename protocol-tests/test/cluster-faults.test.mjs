// Checks 2 and 3 of issue 12: faults in a cluster of three gateways over a
// 3-node NATS cluster (gateway i's NATS_URL is node i; the nodes are routed to
// each other on loopback), behind nginx with the shipped config.
//
// - A NATS node is SIGKILLed while broadcasts flow: the gateway that used it
//   reconnects to a surviving node (discovered from the cluster); its
//   subscriber misses at most one contiguous run of messages and then
//   receives everything again in order; subscribers on the other gateways miss
//   nothing; no process dies.
// - A gateway is SIGKILLed: its clients' presences leave on the others within
//   15 s (CLUSTER_NODE_TIMEOUT_MS is 5 s by default), its clients reconnect
//   through nginx to the survivors and rejoin, and the clients that stayed
//   connected receive each other's broadcasts exactly once, in order.
//
// nats-server and nginx come from Debian (scripts/install-deps.sh); without
// them the file is skipped with the reason.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { withLog } from '../lib/gateway.mjs'
import { natsMissing, startNatsCluster } from '../lib/nats.mjs'
import { nginxMissing } from '../lib/nginx.mjs'
import { startCluster } from '../lib/target.mjs'
import { RawClient } from '../lib/raw.mjs'
import { sbClient, subscribe, closeClients, wsOf } from '../lib/supabase.mjs'
import { until, sleep } from '../lib/util.mjs'

const missing = natsMissing() ?? nginxMissing()
if (missing) test.skip(`cluster fault tests: ${missing}`, () => {})

let nats
let cl
before(async () => {
  if (missing) return
  nats = await startNatsCluster(3)
  cl = await startCluster({ name: 'faults', natsUrls: nats.urls })
})
after(async () => {
  await cl?.stop()
  await nats?.stop()
})
const alive = () => (cl ? cl.gateways.filter((g) => !g.killed) : [])
const it = (name, fn) => test(name, { skip: !!missing }, withLog(alive, fn))

const cfg = { config: { broadcast: { self: false, ack: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } }

/** The `seq`s of the broadcasts a raw client received on `topic`, in arrival order. */
const seqs = (c, topic) => c.log.filter((m) => m.event === 'broadcast' && m.topic === topic).map((m) => m.payload.payload.seq)

it('a NATS node dies while broadcasts flow: one bounded gap on the gateway that used it, none elsewhere, nothing crashes', async () => {
  const topic = 'realtime:faults-flow'
  const [g1, g2, g3] = cl.gateways
  // One subscriber on each gateway; the publisher on gateway 2 (NATS node 2).
  const subs = await Promise.all([g1, g2, g3].map((g) => RawClient.connect(g)))
  const pub = await RawClient.connect(g2)
  try {
    for (const s of subs) await s.join(topic, cfg)
    const { joinRef } = await pub.join(topic, cfg)
    let seq = 0
    const send = () => pub.push(topic, 'broadcast', { type: 'broadcast', event: 'm', payload: { seq: seq++ } }, { joinRef })
    // Publish on a timer until told to stop (the checks below wait on counts, not time).
    let running = true
    const publisher = (async () => {
      while (running) {
        send()
        await sleep(5)
      }
    })()
    try {
      await until(() => subs.every((s) => seqs(s, topic).length >= 50), { what: 'every subscriber to receive 50 messages' })
      await nats.servers[0].kill()
      const killedAt = seq
      // Gateway 1 must come back: its subscriber receives 100 messages sent after the kill.
      await until(() => seqs(subs[0], topic).filter((n) => n > killedAt).length >= 100, {
        what: 'the subscriber on the gateway whose NATS node died to receive again',
        timeoutMs: 60000,
      })
    } finally {
      running = false
      await publisher
    }
    const last = seq - 1
    await until(() => subs.every((s) => seqs(s, topic).at(-1) === last), { what: 'the last message everywhere' })

    for (const [i, s] of subs.entries()) {
      const got = seqs(s, topic)
      assert.deepEqual(got, [...got].sort((a, b) => a - b), `subscriber ${i + 1}: out of order`)
      assert.equal(new Set(got).size, got.length, `subscriber ${i + 1}: duplicates`)
      const missed = []
      for (let n = got[0], j = 0; n <= last; n++) {
        if (got[j] === n) j++
        else missed.push(n)
      }
      if (i === 0) {
        // The gap is one contiguous run (the reconnect), nothing missed after it.
        const contiguous = missed.every((n, k) => k === 0 || n === missed[k - 1] + 1)
        assert.ok(contiguous, `subscriber 1 missed more than one run: ${missed}`)
        console.log(`# NATS node kill: gateway 1's subscriber missed ${missed.length} of ${last + 1} messages (5 ms apart)`)
      } else {
        assert.deepEqual(missed, [], `subscriber ${i + 1} (NATS node alive) lost messages`)
      }
    }
    await until(async () => (await g1.metric('realtime_cluster_connected')) === 1, { what: 'gateway 1 reconnected to NATS' })
    assert.ok(cl.gateways.every((g) => g.alive), 'a gateway died')
  } finally {
    for (const c of [...subs, pub]) c.terminate()
  }
})

it('a gateway is SIGKILLed: its presences leave elsewhere within 15 s, its clients rejoin via nginx, the others lose nothing and get no duplicate', async () => {
  const room = 'faults-kill'
  const members = []
  try {
    for (let i = 1; i <= 6; i++) {
      const name = `m${i}`
      const client = sbClient({ url: cl.nginx.url })
      const m = { name, client, got: [], leaves: [], closed: false }
      m.ch = client
        .channel(room, { config: { broadcast: { self: false }, presence: { key: name } } })
        .on('broadcast', { event: 'm' }, (e) => m.got.push(e.payload))
        .on('presence', { event: 'leave' }, (e) => m.leaves.push({ at: Date.now(), refs: e.leftPresences.map((p) => p.presence_ref) }))
      m.sub = await subscribe(m.ch)
      wsOf(client).once('close', () => (m.closed = true))
      assert.equal(await m.ch.track({ name }), 'ok')
      members.push(m)
    }
    // least_conn spread the six sockets two per replica.
    for (const g of cl.gateways) {
      await until(async () => (await g.metric('realtime_connections_connected')) === 2, { what: `${g.name} to hold 2 of the 6 sockets` })
    }
    await until(() => members.every((m) => Object.keys(m.ch.presenceState()).length === 6), { what: 'six members in every presenceState' })
    const refOf = Object.fromEntries(members.map((m) => [m.name, m.ch.presenceState()[m.name][0].presence_ref]))

    const victim = cl.gateways[2]
    const killedAt = Date.now()
    victim.killed = true
    await victim.kill()
    await until(() => members.filter((m) => m.closed).length === 2, { what: 'the victim\'s two clients to see their socket close' })
    const moved = members.filter((m) => m.closed)
    const stayed = members.filter((m) => !m.closed)

    // The clients that stayed broadcast to each other meanwhile: exactly once each, in order.
    const N = 40
    for (let k = 0; k < N; k++) {
      for (const m of stayed) m.ch.send({ type: 'broadcast', event: 'm', payload: { from: m.name, k } })
      await sleep(10)
    }

    // The victim's presences leave on every survivor's clients within 15 s.
    for (const m of stayed) {
      for (const v of moved) {
        await until(() => m.leaves.some((l) => l.refs.includes(refOf[v.name])), {
          what: `${m.name} to see ${v.name}'s presence leave`,
          timeoutMs: Math.max(1000, killedAt + 15000 - Date.now()),
        })
      }
    }
    const leftAfter = Math.max(...stayed.flatMap((m) => m.leaves.filter((l) => moved.some((v) => l.refs.includes(refOf[v.name]))).map((l) => l.at - killedAt)))
    console.log(`# gateway kill: presences left on the survivors ${leftAfter} ms after the SIGKILL`)

    for (const m of stayed) {
      for (const other of stayed.filter((o) => o !== m)) {
        const ks = m.got.filter((p) => p.from === other.name).map((p) => p.k)
        await until(() => m.got.filter((p) => p.from === other.name).length >= N, { what: `${m.name} to get ${N} from ${other.name} (has ${ks.length})` })
        assert.deepEqual(
          m.got.filter((p) => p.from === other.name).map((p) => p.k),
          [...Array(N).keys()],
          `${m.name} from ${other.name}: a loss, duplicate or reordering`,
        )
      }
    }

    // The victim's clients reconnect (nginx routes them to a survivor), rejoin, track again.
    for (const v of moved) {
      await until(() => v.ch.state === 'joined' && wsOf(v.client)?.readyState === 1, { what: `${v.name} to rejoin`, timeoutMs: 60000 })
      assert.equal(await v.ch.track({ name: v.name, again: true }), 'ok')
    }
    await until(
      () => members.every((m) => {
        const s = m.ch.presenceState()
        return Object.keys(s).length === 6 && Object.values(s).every((metas) => metas.length === 1)
      }),
      { what: 'every member to see six members, one meta each' },
    )
    // A rejoined client's broadcast reaches everyone once.
    const from = moved[0]
    from.ch.send({ type: 'broadcast', event: 'm', payload: { from: from.name, k: 'back' } })
    for (const m of members.filter((m) => m !== from)) {
      await until(() => m.got.some((p) => p.from === from.name && p.k === 'back'), { what: `${m.name} to hear ${from.name} again` })
    }
    await sleep(200)
    for (const m of members.filter((m) => m !== from)) {
      assert.equal(m.got.filter((p) => p.from === from.name && p.k === 'back').length, 1, `${m.name}: duplicate`)
    }
  } finally {
    await closeClients(...members.map((m) => m.client))
  }
})
