// node:test reporter that prints one closing line, `N passed, N failed, N skipped`,
// and the names of the failed tests (suites are not counted, only tests).
export default async function* summary(source) {
  let passed = 0
  let failed = 0
  let skipped = 0
  const failures = []
  for await (const { type, data } of source) {
    if (type !== 'test:pass' && type !== 'test:fail') continue
    if (data.details?.type === 'suite') continue
    if (data.skip || data.todo) skipped++
    else if (type === 'test:pass') passed++
    else {
      failed++
      failures.push(`${data.file ? `${data.file.split('/').pop()}: ` : ''}${data.name}`)
    }
  }
  let out = '\n'
  if (failures.length) out += `failed tests:\n${failures.map((f) => `  ✖ ${f}`).join('\n')}\n`
  out += `${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`
  yield out
}
