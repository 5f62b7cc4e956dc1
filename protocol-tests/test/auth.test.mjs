// Issue 8, checks 1, 2 and 6 (authentication), plus the error back-off defaults,
// admin and metrics protection. Real JWTs: RS256 and ES256 keys are generated here
// with node:crypto and given to the gateway as a JWKS, served by a tiny local HTTP
// server (JWKS_URL) and inline (API_JWT_JWKS); HS256 with API_JWT_SECRET.
// No database: these are connect/join/channel checks.
import { after, before, describe, it } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { generateKeyPairSync, sign as cryptoSign } from 'node:crypto'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { startGateway, withLog } from '../lib/gateway.mjs'
import { ANON_KEY, signHS256 } from '../lib/jwt.mjs'
import { RawClient } from '../lib/raw.mjs'
import { closeClients, subscribe } from '../lib/supabase.mjs'
import { sleep, until } from '../lib/util.mjs'

const now = () => Math.floor(Date.now() / 1000)
const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url')

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 })
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' })
const rotated = generateKeyPairSync('ec', { namedCurve: 'P-256' })
const stranger = generateKeyPairSync('rsa', { modulusLength: 2048 })
const jwk = (pair, kid, alg) => ({ ...pair.publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' })

/** Signs a JWT with node:crypto: RS256 / ES256 (raw r||s signature, as JOSE wants). */
function signAsym(alg, privateKey, kid, claims) {
  const input = `${b64url({ alg, typ: 'JWT', kid })}.${b64url(claims)}`
  const sig =
    alg === 'ES256'
      ? cryptoSign('sha256', Buffer.from(input), { key: privateKey, dsaEncoding: 'ieee-p1363' })
      : cryptoSign('sha256', Buffer.from(input), privateKey)
  return `${input}.${sig.toString('base64url')}`
}
const live = (extra = {}) => ({ role: 'authenticated', sub: 'u1', iat: now(), exp: now() + 3600, ...extra })
const rs256 = (claims = live()) => signAsym('RS256', rsa.privateKey, 'rsa-1', claims)
const es256 = (claims = live()) => signAsym('ES256', ec.privateKey, 'ec-1', claims)

const PUBLISHABLE = 'sb_publishable_test_0123456789'
const bad = {
  none: `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(live({ role: 'service_role' }))}.`,
  wrongKey: signAsym('RS256', stranger.privateKey, 'rsa-1', live()),
  noRole: rs256({ sub: 'u1', exp: now() + 3600 }),
  expired: es256(live({ exp: now() - 30 })),
}
const CONNECT_ERRORS = {
  none: 'Failed to generate JWT signer, check your JWT secret or JWKS configuration',
  wrongKey: 'Failed to validate JWT signature',
  noRole: 'Fields `role` and `exp` are required in JWT',
  expired: 'Token has expired',
}
const JOIN_ERRORS = {
  none: /^JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration$/,
  wrongKey: /^JwtSignatureError: Failed to validate JWT signature$/,
  noRole: /^InvalidJWTToken: Fields `role` and `exp` are required in JWT$/,
  expired: /^InvalidJWTToken: Token has expired \d+ seconds ago$/,
}

let jwksServer
let served = { keys: [jwk(rsa, 'rsa-1', 'RS256'), jwk(ec, 'ec-1', 'ES256')] }
let gwUrl
let gwInline
const sb = []

before(async () => {
  jwksServer = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify(served))
  })
  await new Promise((r) => jwksServer.listen(0, '127.0.0.1', r))
  const url = `http://127.0.0.1:${jwksServer.address().port}/.well-known/jwks.json`
  ;[gwUrl, gwInline] = await Promise.all([
    startGateway({ name: 'auth-jwks-url', env: { JWKS_URL: url, PUBLISHABLE_KEYS: PUBLISHABLE } }),
    startGateway({
      name: 'auth-jwks-inline',
      env: { API_JWT_JWKS: JSON.stringify(served), PUBLISHABLE_KEYS: PUBLISHABLE, METRICS_JWT_SECRET: 'metrics-secret' },
    }),
  ])
})

after(async () => {
  await closeClients(...sb)
  await Promise.all([gwUrl?.stop(), gwInline?.stop()])
  jwksServer?.close()
})

/** Opens a WebSocket with `apikey`; resolves {status, body} (101 on success). */
function connectStatus(gw, apikey, headers = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${gw.wsUrl('/socket/websocket')}?vsn=2.0.0&apikey=${encodeURIComponent(apikey)}`, { headers })
    ws.on('open', () => {
      ws.close()
      resolve({ status: 101 })
    })
    ws.on('unexpected-response', (_req, res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }))
    })
    ws.on('error', (e) => (e.message.includes('Unexpected server response') ? null : reject(e)))
  })
}

describe('tokens at connect and at join (check 1)', () => {
  for (const [label, gwOf] of [
    ['JWKS from a URL', () => gwUrl],
    ['inline JWKS (API_JWT_JWKS)', () => gwInline],
  ]) {
    it(`${label}: RS256, ES256 and sb_publishable_ accepted; none, wrong key, no role, expired refused with Supabase's messages`, withLog(gwOf, async () => {
      const gw = gwOf()
      for (const good of [rs256(), es256(), PUBLISHABLE, ANON_KEY]) {
        assert.equal((await connectStatus(gw, good)).status, 101)
      }
      for (const [k, token] of Object.entries(bad)) {
        const r = await connectStatus(gw, token)
        assert.equal(r.status, 401, k)
        assert.deepEqual(r.body, { error: CONNECT_ERRORS[k] }, k)
      }
      // At join: the access_token decides (the socket itself connected with the anon key).
      const raw = await RawClient.connect(gw, { vsn: '1.0.0' })
      try {
        for (const [k, token] of Object.entries(bad)) {
          const { reply } = await raw.join(`realtime:join-${k}`, { config: {}, access_token: token })
          assert.equal(reply.payload.status, 'error', k)
          assert.match(reply.payload.response.reason, JOIN_ERRORS[k], k)
        }
        for (const token of [rs256(), es256(), PUBLISHABLE]) {
          const { reply } = await raw.join('realtime:join-ok', { config: {}, access_token: token })
          assert.equal(reply.payload.status, 'ok')
        }
      } finally {
        raw.close()
      }
      // supabase-js with an RS256 / ES256 token as its key subscribes.
      for (const key of [rs256(), es256()]) {
        const c = createClient(gw.url, key, { realtime: { transport: WebSocket } })
        sb.push(c)
        await subscribe(c.channel('sb-ok'))
      }
    }))
  }

  it('a kid the gateway does not know yet is fetched from the JWKS URL (key rotation)', withLog(() => gwUrl, async () => {
    const token = signAsym('ES256', rotated.privateKey, 'ec-2', live())
    served = { keys: [...served.keys, jwk(rotated, 'ec-2', 'ES256')] }
    assert.equal((await connectStatus(gwUrl, token)).status, 101)
    // The inline set is fixed: the same token is refused there, naming the kid.
    const r = await connectStatus(gwInline, token)
    assert.equal(r.status, 401)
    assert.match(r.body.error, /Failed to generate JWT signer for key ID \(kid\) "ec-2"/)
  }))
})

describe('token expiry on joined channels (check 2)', () => {
  it('a channel whose token expires gets the expiry message and phx_close within 1 s of exp; one refreshed with setAuth() stays open', withLog(() => gwUrl, async () => {
    const exp = now() + 3
    const short = { token: rs256(live({ exp })) }
    const refreshed = { token: rs256(live({ exp })) }
    const mk = (holder) => {
      const c = createClient(gwUrl.url, ANON_KEY, { accessToken: async () => holder.token, realtime: { transport: WebSocket } })
      sb.push(c)
      return c
    }
    const [ca, cb, sender] = [mk(short), mk(refreshed), mk({ token: ANON_KEY })]
    await Promise.all([ca.realtime.setAuth(), cb.realtime.setAuth(), sender.realtime.setAuth()])
    const chA = ca.channel('expiry')
    const systemA = []
    chA.on('system', {}, (m) => systemA.push({ m, at: Date.now() }))
    const stA = await subscribe(chA)
    const chB = cb.channel('expiry')
    const gotB = []
    chB.on('broadcast', { event: 'after' }, (m) => gotB.push(m))
    const stB = await subscribe(chB)

    // B refreshes before expiry with a later token.
    refreshed.token = rs256(live({ exp: now() + 3600 }))
    await cb.realtime.setAuth()

    await stA.waitFor('CLOSED', 15000)
    const expiry = systemA.find((s) => /^Token has expired \d+ seconds ago$/.test(s.m.message))
    assert.ok(expiry, JSON.stringify(systemA))
    // The gateway's own clock: checked in exp's second (N = 0), i.e. within 1 s of exp.
    assert.equal(expiry.m.message, 'Token has expired 0 seconds ago')
    assert.ok(expiry.at >= exp * 1000, 'not before exp')

    // B stays open past its old exp and keeps receiving.
    await sleep(Math.max(0, exp * 1000 + 1500 - Date.now()))
    assert.ok(!stB.statuses.includes('CLOSED'), stB.statuses.join(' → '))
    const chS = sender.channel('expiry')
    await subscribe(chS)
    await chS.send({ type: 'broadcast', event: 'after', payload: { n: 1 } })
    await until(() => gotB.length === 1, { what: 'B receives after the old exp' })
  }))

  it('an access_token that fails closes the channel with its message', withLog(() => gwInline, async () => {
    const raw = await RawClient.connect(gwInline, { vsn: '1.0.0' })
    try {
      const { joinRef } = await raw.join('realtime:refresh-bad', { config: {}, access_token: es256() })
      raw.push('realtime:refresh-bad', 'access_token', { access_token: bad.wrongKey }, { joinRef })
      const sys = await raw.next((m) => m.event === 'system' && m.topic === 'realtime:refresh-bad')
      assert.deepEqual(sys.payload, { extension: 'system', status: 'error', message: 'Failed to validate JWT signature', channel: 'refresh-bad' })
      const close = await raw.next((m) => m.event === 'phx_close' && m.topic === 'realtime:refresh-bad')
      assert.equal(close.ref, joinRef)
    } finally {
      raw.close()
    }
  }))
})

describe('admin surfaces and /metrics', () => {
  it('tables API needs service_role; /metrics needs the METRICS_JWT_SECRET bearer when set', withLog(() => gwInline, async () => {
    const tables = (token) => fetch(`${gwInline.url}/api/realtime/tables`, { headers: { authorization: `Bearer ${token}` } })
    assert.equal((await tables(ANON_KEY)).status, 403)
    assert.notEqual((await tables(signHS256({ role: 'service_role', exp: now() + 60 }))).status, 403)
    assert.equal((await fetch(`${gwInline.url}/metrics`)).status, 401)
    const ok = await fetch(`${gwInline.url}/metrics`, {
      headers: { authorization: `Bearer ${signHS256({ exp: now() + 60 }, 'metrics-secret')}` },
    })
    assert.equal(ok.status, 200)
    assert.match(await ok.text(), /realtime_/)
  }))
})

describe('secure by default (check 6) and back-off defaults', () => {
  it('no auth: loopback only by default; a non-loopback bind refuses to start unless INSECURE', async () => {
    const noAuth = { API_JWT_SECRET: null }
    const refused = await startGateway({ name: 'auth-public-noauth', env: { ...noAuth, BIND_ADDR: '0.0.0.0' } }).then(
      () => assert.fail('started on 0.0.0.0 without auth'),
      (e) => e,
    )
    const logPath = /log (\S+\.log):/.exec(refused.message)?.[1]
    assert.ok(logPath, refused.message.slice(0, 300))
    assert.match(readFileSync(logPath, 'utf8'), /refusing to serve on 0\.0\.0\.0 without authentication.*--insecure/)
    const insecure = await startGateway({ name: 'auth-insecure', env: { ...noAuth, BIND_ADDR: '0.0.0.0', INSECURE: 'true' } })
    try {
      assert.match(insecure.logTail(), /INSECURE: serving on a non-loopback address without authentication/)
    } finally {
      await insecure.stop()
    }
    const dev = await startGateway({ name: 'auth-dev', env: { ...noAuth, BIND_ADDR: null } })
    try {
      assert.match(dev.logTail(), /serving on loopback only/)
      assert.equal((await connectStatus(dev, 'anything')).status, 101)
      // Loopback alone does not keep it local: a page elsewhere (Origin) or a
      // DNS-rebound name (Host) is refused; local pages and tools are served.
      const port = new URL(dev.url).port
      assert.equal((await connectStatus(dev, 'anything', { Origin: 'http://localhost:3000' })).status, 101)
      assert.equal((await connectStatus(dev, 'anything', { Host: `localhost:${port}` })).status, 101)
      const foreign = await connectStatus(dev, 'anything', { Origin: 'https://evil.example' })
      assert.equal(foreign.status, 403)
      assert.match(foreign.body.message, /loopback origin/)
      const rebound = await connectStatus(dev, 'anything', { Host: `evil.example:${port}` })
      assert.equal(rebound.status, 403)
      assert.match(rebound.body.message, /loopback address/)
    } finally {
      await dev.stop()
    }
  })

  it('defaults: a refused upgrade is answered after ~2 s, a refused join after ~5 s while heartbeats are still answered', withLog(() => gwDefaults, async () => {
    gwDefaults = await startGateway({ name: 'auth-backoff', env: { CONNECT_ERROR_BACKOFF_MS: null, CHANNEL_ERROR_BACKOFF_MS: null } })
    const t0 = Date.now()
    assert.equal((await connectStatus(gwDefaults, bad.noRole)).status, 401)
    assert.ok(Date.now() - t0 >= 1900, `connect refused after ${Date.now() - t0} ms`)
    const raw = await RawClient.connect(gwDefaults, { vsn: '1.0.0' })
    try {
      const t1 = Date.now()
      const joinRef = raw.push('realtime:backoff', 'phx_join', { config: {}, access_token: bad.none })
      // The reader is not blocked: a heartbeat sent after the join is answered first.
      await raw.heartbeat()
      assert.ok(!raw.log.some((m) => m.ref === joinRef), 'join error held back')
      const reply = await raw.reply('realtime:backoff', joinRef, { timeoutMs: 15000 })
      assert.equal(reply.payload.status, 'error')
      assert.ok(Date.now() - t1 >= 4900, `join refused after ${Date.now() - t1} ms`)
    } finally {
      raw.close()
      await gwDefaults.stop()
    }
  }))
})

let gwDefaults
