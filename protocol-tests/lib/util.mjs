// Small async helpers shared by the tests.

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/**
 * Default give-up time of the positive waits here and in raw.mjs / supabase.mjs /
 * changes-env.mjs (a frame, a status, a condition). Generous on purpose: a wait that
 * succeeds returns as soon as it can, so this only decides how long a broken gateway
 * takes to fail, and CI's 2-core box may be very busy. Waits for something that must
 * NOT happen are fixed sleeps (expectNone) and do not use it.
 */
export const WAIT_MS = 20_000

/**
 * Polls `cond` every `every` ms until it returns a truthy value (which is returned);
 * rejects with `what` in the message after `timeoutMs`. `what` may be a function,
 * called at the time out, so the message shows the state then (counts reached, ...).
 */
export async function until(cond, { timeoutMs = WAIT_MS, every = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await cond()
    if (v) return v
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'function' ? what() : what}`)
    }
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
