// Runs real NATS servers (Debian's nats-server) on free loopback ports.
//
//   const nats = await startNats()                  // one server
//   nats.url                                        // nats://127.0.0.1:<port> (give it to NATS_URL)
//   const cl = await startNatsCluster(3)            // three servers routed to each other
//   cl.servers[0].kill()                            // SIGKILL one node
//   await cl.stop()
//
// Logs go to logs/nats-<port>.log. nats-server comes from NATS_SERVER_BIN or
// /usr/sbin/nats-server (scripts/install-deps.sh installs it).
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, openSync, closeSync, readFileSync } from 'node:fs'
import { connect } from 'node:net'
import { dirname, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { freePort } from './gateway.mjs'
import { sleep } from './util.mjs'
import { onExit } from './cleanup.mjs'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const LOG_DIR = resolve(ROOT, 'logs')

/** The nats-server binary. */
export const NATS_BIN = process.env.NATS_SERVER_BIN || '/usr/sbin/nats-server'

/** Why NATS tests cannot run here, or null when they can. */
export function natsMissing() {
  return existsSync(NATS_BIN) ? null : `nats-server not found at ${NATS_BIN} (apt-get install nats-server, or set NATS_SERVER_BIN)`
}

const running = new Set()
onExit(() => {
  for (const child of running) {
    try {
      child.kill('SIGKILL')
    } catch {}
  }
})

function tail(path, lines) {
  try {
    return readFileSync(path, 'utf8').split('\n').slice(-lines - 1).join('\n')
  } catch (e) {
    return `(no log: ${e.message})`
  }
}

/** Resolves true once a NATS server on `port` greets with INFO. */
function probe(port) {
  return new Promise((res) => {
    const sock = connect({ host: '127.0.0.1', port })
    const done = (ok) => {
      sock.destroy()
      res(ok)
    }
    sock.setTimeout(1000, () => done(false))
    sock.on('error', () => done(false))
    sock.on('data', (d) => done(d.toString().startsWith('INFO ')))
  })
}

/**
 * Starts one nats-server. `cluster` = { port, routes: [ports], name } joins it to a cluster.
 */
export async function startNats({ port, cluster, readyTimeoutMs = 20000 } = {}) {
  const missing = natsMissing()
  if (missing) throw new Error(missing)
  mkdirSync(LOG_DIR, { recursive: true })
  port ??= await freePort()
  const args = ['-a', '127.0.0.1', '-p', String(port)]
  if (cluster) {
    args.push('--cluster', `nats://127.0.0.1:${cluster.port}`, '--cluster_name', cluster.name ?? 'realtime-test')
    const routes = cluster.routes.filter((p) => p !== cluster.port).map((p) => `nats://127.0.0.1:${p}`)
    if (routes.length) args.push('--routes', routes.join(','))
  }
  const logPath = resolve(LOG_DIR, `nats-${port}.log`)
  const fd = openSync(logPath, 'w')
  const child = spawn(NATS_BIN, args, { stdio: ['ignore', fd, fd] })
  closeSync(fd)
  running.add(child)
  let exit = null
  const exited = new Promise((res) => {
    child.on('exit', (code, signal) => {
      exit = { code, signal }
      running.delete(child)
      res(exit)
    })
    child.on('error', (err) => {
      exit = { error: err.message }
      running.delete(child)
      res(exit)
    })
  })
  const deadline = Date.now() + readyTimeoutMs
  while (!(await probe(port))) {
    if (exit) throw new Error(`nats-server exited (${JSON.stringify(exit)}); log ${logPath}:\n${tail(logPath, 20)}`)
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`nats-server on ${port} not ready after ${readyTimeoutMs} ms; log ${logPath}:\n${tail(logPath, 20)}`)
    }
    await sleep(50)
  }
  return {
    port,
    url: `nats://127.0.0.1:${port}`,
    logPath,
    get alive() {
      return exit === null
    },
    logTail: (lines = 30) => tail(logPath, lines),
    /** SIGKILL, and wait for the exit. */
    async kill() {
      if (exit === null) child.kill('SIGKILL')
      await exited
    },
    async stop() {
      if (exit === null) {
        child.kill('SIGTERM')
        const killer = setTimeout(() => child.kill('SIGKILL'), 5000)
        await exited
        clearTimeout(killer)
      }
    },
  }
}

/** Starts `n` nats-servers routed to each other, and waits until the routes are up. */
export async function startNatsCluster(n = 3) {
  const ports = []
  const clusterPorts = []
  for (let i = 0; i < n; i++) {
    ports.push(await freePort())
    clusterPorts.push(await freePort())
  }
  const servers = await Promise.all(
    ports.map((port, i) => startNats({ port, cluster: { port: clusterPorts[i], routes: clusterPorts } })),
  )
  // Routes connect shortly after start; each server logs one line per route.
  const deadline = Date.now() + 30000
  for (const s of servers) {
    while ((readFileSync(s.logPath, 'utf8').match(/Route connection created/g) || []).length < n - 1) {
      if (Date.now() > deadline) throw new Error(`NATS routes not up; log ${s.logPath}:\n${s.logTail()}`)
      await sleep(50)
    }
  }
  return {
    servers,
    urls: servers.map((s) => s.url),
    async stop() {
      await Promise.all(servers.map((s) => s.stop()))
    },
  }
}
