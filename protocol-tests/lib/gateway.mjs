// Starts the real realtime-gateway binary on a free loopback port and stops it again.
//
//   const gw = await startGateway({ name: 'raw', env: { IDLE_TIMEOUT_MS: '3000' } })
//   gw.url        http://127.0.0.1:<port>   (supabase-js URL; it appends /realtime/v1/websocket)
//   gw.wsUrl(p)   ws://127.0.0.1:<port><p>
//   await gw.stop()           (gw.kill(): SIGKILL, for crash tests)
//
// The binary comes from GATEWAY_BIN (default ../target/debug/realtime-gateway,
// relative to protocol-tests/). Its stdout and stderr go to logs/<name>-<port>.log;
// `withLog` prints the tail of that log when a test fails.
import { spawn } from 'node:child_process'
import { createServer } from 'node:net'
import { existsSync, mkdirSync, openSync, closeSync, readFileSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { JWT_SECRET } from './jwt.mjs'
import { sleep } from './util.mjs'
import { onExit } from './cleanup.mjs'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
export const GATEWAY_BIN = resolve(ROOT, process.env.GATEWAY_BIN || '../target/debug/realtime-gateway')
const LOG_DIR = resolve(ROOT, 'logs')

const running = new Set()
onExit(() => {
  for (const child of running) {
    try {
      child.kill('SIGKILL')
    } catch {}
  }
})

/** A free TCP port on 127.0.0.1 (bind to 0, read the port, release it). */
export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer()
    srv.unref()
    srv.on('error', rej)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => res(port))
    })
  })
}

function tail(path, lines) {
  try {
    const text = readFileSync(path, 'utf8').split('\n')
    return text.slice(-lines - 1).join('\n')
  } catch (e) {
    return `(no log: ${e.message})`
  }
}

/**
 * Starts the gateway and waits until GET /healthz answers 200.
 * `env` entries override the defaults; an entry set to `null` removes the variable.
 * `port` fixes the port (default: a free one).
 */
export async function startGateway({ name = 'gateway', env = {}, readyTimeoutMs = 20000, port: fixedPort } = {}) {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(
      `gateway binary not found at ${GATEWAY_BIN}: run \`cargo build -p gateway\` or set GATEWAY_BIN`,
    )
  }
  mkdirSync(LOG_DIR, { recursive: true })
  let lastErr
  // A free port can be taken between freePort() and the bind: retry with another one.
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = fixedPort ?? (await freePort())
    try {
      return await launch(name, port, env, readyTimeoutMs)
    } catch (e) {
      lastErr = e
      if (!e.earlyExit || fixedPort) throw e
    }
  }
  throw lastErr
}

async function launch(name, port, envOverrides, readyTimeoutMs) {
  const logPath = resolve(LOG_DIR, `${name}-${port}.log`)
  const childEnv = { ...process.env }
  // No database for these tests, whatever the caller's shell has configured.
  for (const k of ['DATABASE_URL', 'DB_HOST', 'DB_PORT', 'DB_USER', 'DB_PASSWORD', 'DB_NAME']) delete childEnv[k]
  Object.assign(childEnv, {
    PORT: String(port),
    BIND_ADDR: '127.0.0.1',
    EMBEDDED_POSTGRES: 'off',
    RUST_LOG: process.env.GW_RUST_LOG || 'info',
    NO_COLOR: '1',
    API_JWT_SECRET: JWT_SECRET,
    // Refused upgrades and joins are answered after a back-off (2 s / 5 s by
    // default, as Supabase); tests keep them short. auth.test.mjs checks the defaults.
    CONNECT_ERROR_BACKOFF_MS: '50',
    CHANNEL_ERROR_BACKOFF_MS: '50',
  })
  for (const [k, v] of Object.entries(envOverrides)) {
    if (v === null || v === undefined) delete childEnv[k]
    else childEnv[k] = String(v)
  }
  const fd = openSync(logPath, 'w')
  const child = spawn(GATEWAY_BIN, [], { env: childEnv, stdio: ['ignore', fd, fd] })
  closeSync(fd)
  running.add(child)

  let exit = null
  let stopping = false
  const exited = new Promise((res) => {
    child.on('exit', (code, signal) => {
      exit = { code, signal }
      running.delete(child)
      res(exit)
    })
    child.on('error', (err) => {
      exit = { code: null, signal: null, error: err }
      running.delete(child)
      res(exit)
    })
  })

  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + readyTimeoutMs
  for (;;) {
    if (exit) {
      const e = new Error(
        `gateway exited before it was ready (${JSON.stringify(exit)}); log ${logPath}:\n${tail(logPath, 40)}`,
      )
      // Only a lost race for the port is worth another attempt.
      e.earlyExit = /address already in use|AddrInUse/i.test(tail(logPath, 40))
      throw e
    }
    try {
      const r = await fetch(`${url}/healthz`)
      await r.arrayBuffer()
      if (r.status === 200) break
    } catch {}
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`gateway not healthy after ${readyTimeoutMs} ms; log ${logPath}:\n${tail(logPath, 40)}`)
    }
    await sleep(50)
  }

  const gw = {
    name,
    port,
    pid: child.pid,
    url,
    logPath,
    env: childEnv,
    wsUrl: (path = '/socket/websocket') => `ws://127.0.0.1:${port}${path}`,
    /** True while the process runs. */
    get alive() {
      return exit === null
    },
    /** True once a stop or a signal was requested (its exit is expected). */
    get stopping() {
      return stopping
    },
    /** How the process ended, or null. */
    get exit() {
      return exit
    },
    logTail: (lines = 60) => tail(logPath, lines),
    /** Resident set size in KiB, from /proc/<pid>/status VmRSS. */
    rssKiB() {
      const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))
      if (!m) throw new Error('no VmRSS line')
      return Number(m[1])
    },
    /** GET /metrics as text (asserts 200). */
    async metricsText() {
      const r = await fetch(`${url}/metrics`)
      const text = await r.text()
      if (r.status !== 200) throw new Error(`GET /metrics answered ${r.status}: ${text.slice(0, 200)}`)
      return text
    },
    /** Sum of every sample of metric `name` (any labels); null when the metric is absent. */
    async metric(name) {
      const text = await gw.metricsText()
      let sum = null
      for (const line of text.split('\n')) {
        if (line.startsWith('#')) continue
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line)
        if (m && m[1] === name) sum = (sum ?? 0) + Number(m[3])
      }
      return sum
    },
    /** SIGKILL now (a crash, as far as peers and clients can tell); resolves once it exited. */
    kill() {
      return gw.signal('SIGKILL')
    },
    /**
     * Sends a signal (e.g. SIGTERM to start a drain) without waiting; the exit
     * that follows counts as a requested stop. Resolves to the exit once the
     * process is gone.
     */
    signal(sig) {
      stopping = true
      if (exit === null) child.kill(sig)
      return exited
    },
    /** SIGTERM, then SIGKILL after 5 s. Throws if the process had died on its own before. */
    async stop() {
      const diedEarly = exit !== null && !stopping
      stopping = true
      if (exit === null) {
        child.kill('SIGTERM')
        const killer = setTimeout(() => child.kill('SIGKILL'), 5000)
        await exited
        clearTimeout(killer)
      }
      if (diedEarly) {
        throw new Error(`gateway ${name} exited on its own during the tests (${JSON.stringify(exit)}); log ${logPath}:\n${tail(logPath, 40)}`)
      }
      return exit
    },
  }
  return gw
}

/** Samples `gw`'s RSS every 50 ms; stop() returns the peak (KiB). */
export function rssSampler(gw) {
  let peak = gw.rssKiB()
  const timer = setInterval(() => {
    try {
      peak = Math.max(peak, gw.rssKiB())
    } catch {}
  }, 50)
  return { stop: () => (clearInterval(timer), peak) }
}

/**
 * Wraps a test body: on failure, or if the gateway died during the test, prints the
 * tail of the gateway log (and, for a death, fails the test).
 */
export function withLog(getGateways, fn) {
  return async (t) => {
    const gws = () => [getGateways()].flat().filter(Boolean)
    try {
      const out = await fn(t)
      for (const gw of gws()) {
        if (!gw.alive && !gw.stopping) throw new Error(`gateway ${gw.name} died during the test: ${JSON.stringify(gw.exit)}`)
      }
      return out
    } catch (e) {
      for (const gw of gws()) {
        console.error(`\n----- tail of gateway log ${gw.logPath} -----\n${gw.logTail()}\n----- end of log -----`)
      }
      throw e
    }
  }
}
