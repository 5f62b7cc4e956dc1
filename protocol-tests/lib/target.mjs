// What a Broadcast/Presence/REST test file talks to: one gateway (the default),
// or — with REALTIME_TOPOLOGY=cluster, which test/cluster.test.mjs sets before
// importing those files — three gateways joined over a real nats-server,
// behind a real nginx running the shipped deploy/nginx/realtime.conf with the
// three replicas as its upstream servers.
//
//   const gw = await startTarget({ name: 'broadcast' })
//   gw.url, gw.wsUrl(path)       what clients use (nginx's address in a cluster)
//   await gw.stop()
//
// The shipped upstream balances with `least_conn`: a client connecting while
// others are connected goes to a replica with fewer connections, so two
// clients a test opens one after the other are on different replicas. The
// cluster is shared by every file imported into one process (stopped when the
// last one stops), and `crossReplica()` sums what the replicas received from
// each other (`realtime_cluster_received_total`).
import { startGateway } from './gateway.mjs'
import { startNats } from './nats.mjs'
import { startNginx } from './nginx.mjs'

/** Whether the test files run against a cluster. */
export const clustered = () => process.env.REALTIME_TOPOLOGY === 'cluster'

let shared = null
let users = 0

/** One gateway, or the shared cluster (see the file header). */
export async function startTarget({ name, env = {} } = {}) {
  if (!clustered()) return startGateway({ name, env })
  users++
  shared ??= startCluster({ name: 'cluster' })
  const cluster = await shared
  // Object.create keeps the facade's getters live (a spread would freeze them).
  return Object.assign(Object.create(cluster.facade), {
    async stop() {
      if (--users === 0) {
        shared = null
        await cluster.stop()
      }
    },
  })
}

/**
 * Three gateways with NATS_URL (and `env`) behind nginx. Returns the parts and
 * a facade that looks like one gateway to the test files (`withLog` included).
 */
export async function startCluster({ name = 'cluster', env = {}, replicas = 3, natsUrls } = {}) {
  const nats = natsUrls ? null : await startNats()
  const urlFor = (i) => (natsUrls ? natsUrls[i % natsUrls.length] : nats.url)
  const gateways = []
  for (let i = 0; i < replicas; i++) {
    gateways.push(await startGateway({ name: `${name}-${i + 1}`, env: { NATS_URL: urlFor(i), ...env } }))
  }
  // Every replica hears the others' heartbeats before clients come (generous: a busy box).
  const deadline = Date.now() + 30000
  for (const gw of gateways) {
    while ((await gw.metric('realtime_cluster_peers')) !== replicas - 1) {
      if (Date.now() > deadline) throw new Error(`${gw.name} does not see its ${replicas - 1} peers; log:\n${gw.logTail()}`)
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  const ngx = await startNginx({ name: `${name}-nginx`, upstream: gateways.map((g) => `127.0.0.1:${g.port}`) })
  const parts = [...gateways, ngx]
  const facade = {
    name,
    url: ngx.url,
    port: ngx.port,
    wsUrl: ngx.wsUrl,
    gateways,
    nginx: ngx,
    nats,
    get alive() {
      return gateways.every((g) => g.alive) && ngx.alive
    },
    get exit() {
      return gateways.map((g) => g.exit)
    },
    get logPath() {
      return parts.map((p) => p.logPath).join(', ')
    },
    logTail: (lines = 30) => parts.map((p) => `=== ${p.logPath}\n${p.logTail(lines)}`).join('\n'),
    /** Messages the replicas received from each other, summed. */
    async crossReplica() {
      let sum = 0
      for (const g of gateways) sum += (await g.metric('realtime_cluster_received_total')) ?? 0
      return sum
    },
  }
  return {
    facade,
    gateways,
    nginx: ngx,
    nats,
    async stop() {
      await ngx.stop()
      const errors = []
      for (const g of gateways) await g.stop().catch((e) => errors.push(e))
      await nats?.stop()
      if (errors.length) throw errors[0]
    },
  }
}
