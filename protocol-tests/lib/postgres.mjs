// A throwaway PostgreSQL 15 cluster for one test file, plus small SQL helpers.
//
//   const pg = await startPostgres({ name: 'changes-filters' })
//   const url = await pg.createDatabase('filters')    // postgres://postgres@127.0.0.1:<port>/filters
//   const db = await pg.connect('filters')            // a node-postgres Client (closed by pg.stop())
//   await pg.restart()                                 // pg_ctl restart -m fast, same port
//   await pg.stop()                                    // pg_ctl stop -m immediate, data dir removed
//
// Binaries come from PG_BIN (default /usr/lib/postgresql/15/bin). initdb refuses to run
// as root, so when the tests run as root every binary runs as the `postgres` user via
// runuser and the temp dir is chowned to it; otherwise the binaries run directly.
// The server log is kept in logs/pg-<name>-<port>.log.
import { execFile, execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, chownSync, mkdirSync, readFileSync, existsSync, copyFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import pgPkg from 'pg'
import { freePort } from './gateway.mjs'
import { onExit } from './cleanup.mjs'

const { Client } = pgPkg
const execFileP = promisify(execFile)
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const LOG_DIR = resolve(ROOT, 'logs')
export const PG_BIN = process.env.PG_BIN || '/usr/lib/postgresql/15/bin'

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0

/** Command + args to run a PG binary (as `postgres` when we are root). */
function cmd(bin, args) {
  const path = join(PG_BIN, bin)
  return isRoot ? ['runuser', ['-u', 'postgres', '--', path, ...args]] : [path, args]
}

async function run(bin, args, { timeoutMs = 60000 } = {}) {
  const [file, argv] = cmd(bin, args)
  try {
    return await execFileP(file, argv, { timeout: timeoutMs, cwd: '/' })
  } catch (e) {
    throw new Error(`${bin} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`)
  }
}

const clusters = new Set()
onExit(() => {
  for (const c of clusters) c.stopSync()
})

/**
 * initdb + start a cluster on a free port (or `port`) on 127.0.0.1 (trust auth, user postgres,
 * fsync off). Returns a handle; see the header comment.
 */
export async function startPostgres({ name = 'pg', extraConf = [], port: fixedPort } = {}) {
  if (!existsSync(join(PG_BIN, 'initdb'))) {
    throw new Error(`PostgreSQL binaries not found in ${PG_BIN} (set PG_BIN)`)
  }
  mkdirSync(LOG_DIR, { recursive: true })
  const dir = mkdtempSync(join(tmpdir(), 'rtgw-pg-'))
  const dataDir = join(dir, 'data')
  if (isRoot) {
    const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim())
    const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim())
    chownSync(dir, uid, gid)
  }
  await run('initdb', ['-D', dataDir, '-A', 'trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8', '--locale=C'])
  const port = fixedPort ?? (await freePort())
  const logPath = resolve(LOG_DIR, `pg-${name}-${port}.log`)
  // The server writes its log inside the temp dir (owned by postgres); copied to logs/ at stop.
  const innerLog = join(dir, 'server.log')
  const opts = [
    `-p ${port}`,
    `-k ${dir}`,
    '-c listen_addresses=127.0.0.1',
    '-c fsync=off',
    '-c synchronous_commit=off',
    '-c full_page_writes=off',
    '-c max_connections=100',
    ...extraConf.map((c) => `-c ${c}`),
  ].join(' ')
  const pgctl = (action, extra = []) => run('pg_ctl', ['-D', dataDir, '-l', innerLog, '-w', '-t', '60', ...extra, '-o', opts, action])
  await pgctl('start')

  const clients = new Set()
  let stopped = false
  const url = (db = 'postgres') => `postgres://postgres@127.0.0.1:${port}/${db}`
  const cluster = {
    name,
    port,
    dir,
    dataDir,
    logPath,
    url,
    /** A connected node-postgres Client on `db` (closed by stop()). An 'error' handler is installed. */
    async connect(db = 'postgres', { applicationName = 'protocol-tests' } = {}) {
      const c = new Client({ connectionString: url(db), application_name: applicationName })
      c.on('error', () => {}) // killed connections (restart) must not crash the test process
      await c.connect()
      clients.add(c)
      c.once('end', () => clients.delete(c))
      return c
    },
    /** One-shot query on `db`. */
    async query(db, sql, params) {
      const c = await cluster.connect(db)
      try {
        return await c.query(sql, params)
      } finally {
        await c.end().catch(() => {})
      }
    },
    /** `create database <name>`; returns its URL. */
    async createDatabase(db) {
      await cluster.query('postgres', `create database "${db.replace(/"/g, '""')}"`)
      return url(db)
    },
    /** pg_ctl restart -m fast on the same port (existing connections are terminated). */
    async restart() {
      await pgctl('restart', ['-m', 'fast'])
    },
    /** Tail of the server log. */
    logTail(lines = 40) {
      try {
        return readFileSync(innerLog, 'utf8').split('\n').slice(-lines - 1).join('\n')
      } catch (e) {
        return `(no log: ${e.message})`
      }
    },
    async stop() {
      if (stopped) return
      await Promise.all([...clients].map((c) => c.end().catch(() => {})))
      cluster.stopSync()
    },
    stopSync() {
      if (stopped) return
      stopped = true
      clusters.delete(cluster)
      try {
        const [file, argv] = cmd('pg_ctl', ['-D', dataDir, '-m', 'immediate', '-w', 'stop'])
        execFileSync(file, argv, { stdio: 'ignore', cwd: '/' })
      } catch {}
      try {
        copyFileSync(innerLog, logPath)
      } catch {}
      try {
        rmSync(dir, { recursive: true, force: true })
      } catch {}
    },
  }
  clusters.add(cluster)
  return cluster
}
