// The built-in /inspector page in a real browser (issue 11, check 4): Debian's
// Chromium driven by playwright-core. With auth on, the page asks for a token
// and gets a service_role key; a table is enabled from the page; a row inserted
// with psql appears among the live events; a broadcast sent from the page's
// form reaches a supabase-js client. A screenshot (showing the inserted row) is
// saved as protocol-tests/artifacts/inspector.png (gitignored; CI keeps it).
//
// Chromium comes from /usr/bin/chromium (scripts/install-deps.sh installs it),
// playwright-core from package.json (never `npx playwright install`). If either
// is missing the file is skipped with the reason.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { startChangesEnv, closeSbClients } from '../lib/changes-env.mjs'
import { signHS256 } from '../lib/jwt.mjs'
import { sbClient, subscribe } from '../lib/supabase.mjs'
import { until } from '../lib/util.mjs'

const execFileP = promisify(execFile)
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const ARTIFACTS = resolve(ROOT, 'artifacts')
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium'
const PSQL = '/usr/bin/psql'
const SERVICE_KEY = signHS256({ role: 'service_role', exp: 4102444800 })

let playwright = null
try {
  playwright = await import('playwright-core')
} catch {}
const missing = !existsSync(CHROMIUM)
  ? `${CHROMIUM} not found (apt-get install chromium)`
  : !playwright
    ? 'playwright-core not installed (npm ci)'
    : !existsSync(PSQL)
      ? 'psql not found'
      : null

let env
let context
let profile
const clients = []

before(async () => {
  if (missing) return
  env = await startChangesEnv({
    name: 'inspector',
    setupSql: `create table inspector_items (id bigint generated always as identity primary key, body text not null)`,
    gatewayEnv: { LOG_LEVEL: 'info', RUST_LOG: null },
  })
  profile = mkdtempSync(join(tmpdir(), 'inspector-chromium-'))
  // Flags that keep Chromium off the network (this machine's network is closed).
  context = await playwright.chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 1300 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
})

after(async () => {
  await closeSbClients(clients)
  await context?.close()
  if (profile) rmSync(profile, { recursive: true, force: true })
  if (env) await env.stop()
})

test('the inspector: token prompt, enable a table, see a psql insert live, send a broadcast to supabase-js', { skip: missing ?? false }, async () => {
  const page = context.pages()[0] ?? (await context.newPage())
  const consoleErrors = []
  page.on('pageerror', (e) => consoleErrors.push(e.message))
  try {
    await page.goto(`${env.gw.url}/inspector`)

    // Auth is on: the page asks for a token before showing anything.
    await page.locator('#auth').waitFor({ state: 'visible', timeout: 30000 })
    assert.equal(await page.locator('#main').isVisible(), false)
    await page.fill('#token', SERVICE_KEY)
    await page.click('#auth-form button')
    await page.locator('#main').waitFor({ state: 'visible', timeout: 30000 })
    await page.locator('#status .ok').waitFor({ timeout: 30000 })

    // Enable the table from the page.
    const tableRow = page.locator('#tables tr[data-table="public.inspector_items"]')
    await tableRow.waitFor({ timeout: 30000 })
    assert.equal(await tableRow.getAttribute('data-enabled'), 'false')
    await tableRow.locator('button').click()
    await page.locator('#tables tr[data-table="public.inspector_items"][data-enabled="true"]').waitFor({ timeout: 30000 })
    const enabled = await env.db.query(`select count(*)::int as n from realtime_gateway.tables where "table" = 'inspector_items'`).catch(() => null)
    if (enabled) assert.equal(enabled.rows[0].n, 1, 'enabled in the database')

    // A row inserted with psql shows up among the live events.
    // (The gateway may learn of the newly enabled table a moment later: insert until one is seen.)
    let n = 0
    await until(async () => {
      n++
      await execFileP(PSQL, [env.dbUrl, '-v', 'ON_ERROR_STOP=1', '-c', `insert into inspector_items (body) values ('hello from psql ${n}')`])
      const rows = page.locator('#events tbody tr[data-kind="postgres_changes"]', { hasText: 'hello from psql' })
      try {
        await rows.first().waitFor({ timeout: 2000 })
        return true
      } catch {
        return false
      }
    }, { timeoutMs: 60000, every: 10, what: 'the psql insert in the events table' })
    const eventText = await page.locator('#events tbody tr[data-kind="postgres_changes"]').first().innerText()
    assert.match(eventText, /public\.inspector_items/)
    assert.match(eventText, /INSERT/)

    // A broadcast sent from the form reaches a supabase-js client.
    const sb = sbClient(env.gw)
    clients.push(sb)
    const got = []
    await subscribe(sb.channel('inspector-room').on('broadcast', { event: 'from-inspector' }, (m) => got.push(m.payload)))
    await page.fill('#bc-topic', 'inspector-room')
    await page.fill('#bc-event', 'from-inspector')
    await page.fill('#bc-payload', '{"text": "hi from the page", "n": 42}')
    await page.click('#bc-send')
    await until(() => got.length >= 1, { what: 'the supabase-js client to receive the broadcast' })
    assert.deepEqual(got[0], { text: 'hi from the page', n: 42 })
    await page.locator('#bc-result', { hasText: 'sent at' }).waitFor({ timeout: 30000 })
    // The broadcast shows in the events table too, and the clients table lists connections.
    await page.locator('#events tbody tr[data-kind="broadcast"]', { hasText: 'from-inspector' }).first().waitFor({ timeout: 30000 })
    await page.locator('#clients tbody tr').first().waitFor({ timeout: 30000 })

    // Filter and pause.
    await page.fill('#filter', 'hello from psql')
    assert.equal(await page.locator('#events tbody tr[data-kind="broadcast"]').count(), 0, 'the filter hides the broadcast')
    await page.fill('#filter', '')

    assert.deepEqual(consoleErrors, [], 'no script errors on the page')
  } finally {
    mkdirSync(ARTIFACTS, { recursive: true })
    await page.screenshot({ path: join(ARTIFACTS, 'inspector.png'), fullPage: true }).catch(() => {})
  }
})
