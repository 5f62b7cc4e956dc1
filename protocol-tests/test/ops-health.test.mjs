// Health, readiness, logging and the drain delay, on the real binary (issue 11, check 1).
//
// - Supabase's self-hosted compose healthcheck for its `realtime` service
//   (fixtures/supabase-compose-realtime-healthcheck.txt, verbatim: curl --head
//   with the anon key to localhost:4000/api/tenants/realtime-dev/health) exits 0
//   against the gateway on port 4000 with API_JWT_SECRET set, and fails with a
//   key signed by another secret.
// - `realtime-gateway healthcheck` (the image's HEALTHCHECK) exits 0 / 1.
// - LOG_LEVEL with Supabase's level names (RUST_LOG unset); LOG_FORMAT=json
//   lines carry the connection span (conn_id, peer, sub).
// - SIGTERM with DRAIN_DELAY_MS: the socket closed with 1001 when the delay is
//   over, exit 0.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { promisify } from 'node:util'
import { GATEWAY_BIN, startGateway, freePort } from '../lib/gateway.mjs'
import { ANON_KEY, signHS256 } from '../lib/jwt.mjs'
import { RawClient } from '../lib/raw.mjs'
import { until, withTimeout } from '../lib/util.mjs'

const execFileP = promisify(execFile)
const COMPOSE_HEALTHCHECK = readFileSync(new URL('../fixtures/supabase-compose-realtime-healthcheck.txt', import.meta.url), 'utf8').trim()

/** Exit code of `sh -c cmd` with `env` added. */
async function sh(cmd, env) {
  try {
    await execFileP('sh', ['-c', cmd], { env: { ...process.env, ...env }, timeout: 20000 })
    return 0
  } catch (e) {
    return typeof e.code === 'number' ? e.code : -1
  }
}

/** Whether 127.0.0.1:4000 can be bound (the compose command names that port). */
function port4000Free() {
  return new Promise((res) => {
    const srv = createServer()
    srv.once('error', () => res(false))
    srv.listen(4000, '127.0.0.1', () => srv.close(() => res(true)))
  })
}

const curlMissing = existsSync('/usr/bin/curl') ? null : 'curl not installed'

test("Supabase's compose healthcheck command, verbatim, exits 0 against the gateway", { skip: curlMissing ?? false }, async (t) => {
  if (!(await port4000Free())) {
    t.skip('port 4000 is taken on this machine; the compose command names it')
    return
  }
  assert.match(COMPOSE_HEALTHCHECK, /^curl .*--head .*localhost:4000\/api\/tenants\/realtime-dev\/health$/)
  // The harness sets API_JWT_SECRET, so the token is verified as upstream does.
  const gw = await startGateway({ name: 'ops-compose-health', port: 4000, env: { LOG_LEVEL: 'info', RUST_LOG: null } })
  try {
    assert.equal(await sh(COMPOSE_HEALTHCHECK, { ANON_KEY }), 0)
    const forged = signHS256({ role: 'anon', exp: 4102444800 }, 'some-other-secret-that-is-at-least-32-characters')
    assert.notEqual(await sh(COMPOSE_HEALTHCHECK, { ANON_KEY: forged }), 0, 'a key signed with another secret must fail (403)')
    const r = await fetch(`${gw.url}/api/tenants/realtime-dev/health`, { headers: { authorization: `Bearer ${ANON_KEY}` } })
    const body = await r.json()
    assert.equal(r.status, 200)
    assert.equal(body.data.healthy, true, JSON.stringify(body))
  } finally {
    await gw.stop()
  }
})

test('`realtime-gateway healthcheck` exits 0 against a serving gateway and 1 when none listens', async () => {
  const gw = await startGateway({ name: 'ops-healthcheck' })
  try {
    const env = { ...process.env, PORT: String(gw.port), BIND_ADDR: '127.0.0.1' }
    // A generous probe timeout (default 3 s): a busy machine may answer slowly.
    await execFileP(GATEWAY_BIN, ['healthcheck', '--timeout-ms', '20000'], { env })
    await execFileP(GATEWAY_BIN, ['healthcheck', '--path', '/readyz', '--timeout-ms', '20000'], { env })
    const port = await freePort()
    await assert.rejects(
      execFileP(GATEWAY_BIN, ['healthcheck'], { env: { ...env, PORT: String(port) } }),
      (e) => e.code === 1 && /unhealthy: cannot connect/.test(e.stderr),
    )
    await assert.rejects(
      execFileP(GATEWAY_BIN, ['healthcheck', '--path', '/nope', '--timeout-ms', '20000'], { env }),
      (e) => e.code === 1 && /answered 404/.test(e.stderr),
    )
  } finally {
    await gw.stop()
  }
})

test('LOG_LEVEL takes Supabase level names when RUST_LOG is unset', async () => {
  const info = await startGateway({ name: 'ops-loglevel-info', env: { LOG_LEVEL: 'info', RUST_LOG: null } })
  const warning = await startGateway({ name: 'ops-loglevel-warning', env: { LOG_LEVEL: 'warning', RUST_LOG: null } })
  try {
    assert.match(readFileSync(info.logPath, 'utf8'), /INFO.*realtime-gateway listening/)
    // The warning-level gateway is serving (startGateway waited for /healthz) but logged no info line.
    assert.doesNotMatch(readFileSync(warning.logPath, 'utf8'), /INFO/)
  } finally {
    await info.stop()
    await warning.stop()
  }
  await assert.rejects(
    execFileP(GATEWAY_BIN, [], { env: { ...process.env, LOG_LEVEL: 'loud', PORT: String(await freePort()), EMBEDDED_POSTGRES: 'off' } }),
    (e) => e.code !== 0 && /LOG_LEVEL "loud" is not a level/.test(e.stderr),
  )
})

test('LOG_FORMAT=json: one JSON object per line, connection lines carry conn_id, peer and sub', async () => {
  const gw = await startGateway({ name: 'ops-logjson', env: { LOG_FORMAT: 'json', LOG_LEVEL: 'debug', RUST_LOG: null } })
  try {
    const token = signHS256({ role: 'authenticated', sub: 'user-42', exp: 4102444800 })
    const c = await RawClient.connect(gw, { apikey: token })
    await c.join('realtime:log-room', { config: {} })
    c.close()
    let closed
    await until(() => {
      const lines = readFileSync(gw.logPath, 'utf8').split('\n').filter(Boolean)
      const objs = lines.map((l) => JSON.parse(l))
      closed = objs.find((o) => o.fields?.message === 'connection closed')
      return closed
    }, { what: 'the "connection closed" line' })
    assert.equal(closed.span.name, 'conn')
    assert.equal(typeof closed.span.conn_id, 'number')
    assert.match(closed.span.peer, /^127\.0\.0\.1:\d+$/)
    assert.equal(closed.span.sub, 'user-42')
  } finally {
    await gw.stop()
  }
})

// (What happens during the delay — /readyz 503, upgrades 503, sockets still
// served — is checked where the test, not the clock, ends the delay:
// ops-drain.test.mjs and crates/gateway/tests/ops.rs.)
test('SIGTERM with DRAIN_DELAY_MS: sockets closed with 1001 once the delay is over, exit 0', async () => {
  const gw = await startGateway({ name: 'ops-drain-delay', env: { DRAIN_DELAY_MS: '1000', SHUTDOWN_GRACE_MS: '20000' } })
  const c = await RawClient.connect(gw)
  await c.join('realtime:drain-delay', { config: {} })
  const exited = gw.signal('SIGTERM')
  await withTimeout(c.closed, 20000, 'the 1001 close')
  assert.equal(c.closeInfo.code, 1001)
  const exit = await withTimeout(exited, 20000, 'the gateway to exit')
  assert.deepEqual(exit, { code: 0, signal: null })
})
