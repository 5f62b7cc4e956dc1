// supabase-js 2.119.0 clients pointed at a gateway (Node 20: `ws` is the transport).
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { ANON_KEY } from './jwt.mjs'
import { withTimeout, WAIT_MS } from './util.mjs'

/** A supabase-js client for `gw`. `realtime` options are merged into the defaults. */
export function sbClient(gw, realtime = {}) {
  return createClient(gw.url, ANON_KEY, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    realtime: { transport: WebSocket, ...realtime },
  })
}

/**
 * Subscribes `channel` and resolves once it reports SUBSCRIBED; rejects on the first
 * CHANNEL_ERROR / TIMED_OUT / CLOSED before that. `statuses` (returned, and kept
 * up to date afterwards) records every status the callback saw, with errors.
 */
export async function subscribe(channel, { timeoutMs = WAIT_MS } = {}) {
  const statuses = []
  const waiters = new Set()
  const first = new Promise((res, rej) => {
    channel.subscribe((status, err) => {
      statuses.push(err ? `${status}: ${err.message}` : status)
      for (const w of waiters) w(status)
      if (status === 'SUBSCRIBED') res()
      else rej(new Error(`channel ${channel.topic} reported ${status}${err ? `: ${err.message}` : ''}`))
    })
  })
  await withTimeout(first, timeoutMs, `SUBSCRIBED on ${channel.topic}`)
  /** Resolves on the next callback with `status`. */
  const waitFor = (status, ms = WAIT_MS) =>
    withTimeout(
      new Promise((res) => {
        const w = (s) => {
          if (s === status) {
            waiters.delete(w)
            res()
          }
        }
        waiters.add(w)
      }),
      ms,
      `${status} on ${channel.topic} (statuses so far: ${statuses.join(' → ')})`,
    )
  return { statuses, waitFor }
}

/** The `ws` WebSocket a supabase-js client currently uses. */
export function wsOf(client) {
  return client.realtime.socketAdapter.getSocket().conn
}

/** Removes every channel and closes the socket of each client (errors ignored). */
export async function closeClients(...clients) {
  await Promise.all(
    clients.filter(Boolean).map(async (c) => {
      try {
        await c.removeAllChannels()
      } catch {}
      try {
        await c.realtime.disconnect()
      } catch {}
    }),
  )
}
