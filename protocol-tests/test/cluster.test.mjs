// Check 1 of issue 12: the Broadcast (self/ack, V1/V2, binary, REST) and
// Presence (sync/join/leave, update with phx_ref_prev) test files, unchanged,
// against three gateways joined over a real nats-server behind a real nginx
// with the shipped deploy/nginx/realtime.conf (lib/target.mjs). nginx's
// least_conn puts clients a test opens one after the other on different
// replicas, so each publisher/subscriber pair crosses replicas; the last test
// checks that every replica did receive from the others.
//
// nats-server and nginx come from Debian (scripts/install-deps.sh); without
// them the file is skipped with the reason.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { natsMissing } from '../lib/nats.mjs'
import { nginxMissing } from '../lib/nginx.mjs'
import { startTarget } from '../lib/target.mjs'

const missing = natsMissing() ?? nginxMissing()
if (missing) {
  test.skip(`cluster reruns of broadcast/presence/rest: ${missing}`, () => {})
} else {
  process.env.REALTIME_TOPOLOGY = 'cluster'
  // Held for the whole process, so the three files share one cluster and the
  // check below still sees it.
  const cluster = await startTarget({ name: 'cluster' })
  after(() => cluster.stop())
  await import('./broadcast.test.mjs')
  await import('./presence.test.mjs')
  await import('./rest.test.mjs')

  test('every replica delivered messages published on another replica', async () => {
    for (const gw of cluster.gateways) {
      const received = await gw.metric('realtime_cluster_received_total')
      assert.ok(received > 0, `${gw.name} received nothing from the other replicas`)
    }
  })
}
