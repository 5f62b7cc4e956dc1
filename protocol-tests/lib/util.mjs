// Small async helpers shared by the tests.

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/**
 * Polls `cond` every `every` ms until it returns a truthy value (which is returned);
 * rejects with `what` in the message after `timeoutMs`.
 */
export async function until(cond, { timeoutMs = 5000, every = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await cond()
    if (v) return v
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await sleep(every)
  }
}

/** Rejects after `ms` with `what` unless `promise` settles first. */
export function withTimeout(promise, ms, what) {
  let timer
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    }),
  ])
}
