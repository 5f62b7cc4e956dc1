// Process-exit cleanup shared by every helper that starts something (gateways,
// PostgreSQL, nginx, nats-server): whatever happens, a test file's process must
// not leave them running.
//
//   onExit(() => child.kill('SIGKILL'))   // synchronous work only
//
// The hooks run on a normal exit, on `--test-force-exit` (npm test), and when the
// process is told to stop: the test runner sends SIGTERM to a file that passes
// its `--test-timeout`, and a terminal sends SIGINT/SIGHUP. Node's default for
// those signals exits without 'exit' hooks, so this module turns them into a
// process.exit() (after saying why on stderr).
const hooks = new Set()
let installed = false

function runHooks() {
  for (const fn of hooks) {
    try {
      fn()
    } catch {}
  }
  hooks.clear()
}

function install() {
  if (installed) return
  installed = true
  process.on('exit', runHooks)
  for (const [sig, code] of [['SIGTERM', 143], ['SIGINT', 130], ['SIGHUP', 129]]) {
    process.once(sig, () => {
      process.stderr.write(`\n# ${process.argv[1] ?? 'test process'}: ${sig} received (file timeout or interrupt); stopping the processes it started\n`)
      process.exit(code)
    })
  }
}

/** Registers a synchronous hook run once when this process exits, however it exits. */
export function onExit(fn) {
  install()
  hooks.add(fn)
  return () => hooks.delete(fn)
}
