// Helpers for the hostile-input suite: an "arena" per case (a topic, a bystander
// subscriber that counts what it receives, a control client that sends a marker),
// raw HTTP/TCP clients for upgrade refusals and slow or silent connections.
import net from 'node:net'
import WebSocket from 'ws'
import { RawClient } from './raw.mjs'
import { ANON_KEY } from './jwt.mjs'

/** realtime-js's join config, without acks. */
export const CFG = { config: { broadcast: { self: false, ack: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false } }
/** The same with `ack: true` (every accepted broadcast is answered). */
export const ACK = { config: { ...CFG.config, broadcast: { self: false, ack: true } } }
/** The same with presence enabled. */
export const PRESENCE = { config: { ...CFG.config, presence: { key: '', enabled: true } } }

/** Every client and socket the helpers opened, so a failed case cannot leave
 * handles behind that keep the test process alive (`closeAll()` in `after`). */
const opened = new Set()

/** `RawClient.connect`, remembered for `closeAll()`. */
export async function connect(gw, opts) {
  const c = await RawClient.connect(gw, opts)
  opened.add(c)
  return c
}

/** Terminates every client and destroys every socket the helpers opened. */
export function closeAll() {
  for (const c of opened) {
    try {
      if (c instanceof net.Socket) c.destroy()
      else c.terminate()
    } catch {}
  }
  opened.clear()
}

let arenaSeq = 0
const MARKER = '__marker__'

/** The user event of a broadcast as a raw client sees it (JSON text or kind 4). */
export function userEvent(m) {
  return m.kind === 'binary' ? m.userEvent : m.payload?.event
}

/** Whether `m` is a broadcast on `topic` other than the control marker. */
const isBroadcast = (topic) => (m) => m.event === 'broadcast' && m.topic === topic && userEvent(m) !== MARKER

/**
 * A fresh topic with a bystander (joined with `bystanderJoin`, raw, `vsn`) and a
 * control client. `settle(...attackers)` makes the count exact: each attacker that
 * is still open answers a heartbeat (so every frame it sent before was handled),
 * then the control client's marker reaches the bystander; it returns the
 * broadcasts the bystander received before the marker.
 */
export async function arena(gw, label, { vsn = '2.0.0', bystanderJoin = CFG } = {}) {
  const topic = `realtime:hostile-${label}-${++arenaSeq}`
  const by = await connect(gw, { vsn })
  const joined = await by.join(topic, bystanderJoin)
  if (joined.reply.payload?.status !== 'ok') throw new Error(`bystander join failed: ${joined.reply.raw}`)
  const control = await connect(gw)
  await control.join(topic, CFG)
  // Heartbeats like realtime-js: a case that runs long on a busy machine must not
  // lose its bystander or control client to the gateway's idle timeout.
  by.keepAlive(15_000)
  control.keepAlive(15_000)
  let markers = 0
  let seen = 0
  return {
    topic,
    by,
    control,
    async settle(...attackers) {
      for (const a of attackers) if (a?.isOpen) await a.heartbeat({ timeoutMs: 20_000 })
      const id = ++markers
      control.push(topic, 'broadcast', { type: 'broadcast', event: MARKER, payload: { id } })
      const m = await by.next((x) => x.event === 'broadcast' && userEvent(x) === MARKER && (x.payload?.payload?.id ?? x.payload?.id) === id, {
        timeoutMs: 20_000,
        what: `marker ${id} at the bystander`,
      })
      const idx = by.log.indexOf(m)
      const got = by.log.slice(seen, idx).filter(isBroadcast(topic))
      seen = idx + 1
      return got
    },
    /** Every frame the bystander got that is neither a broadcast, the join reply nor a heartbeat reply. */
    others() {
      return by.log.filter(
        (m) =>
          !(m.event === 'broadcast') &&
          !(m.event === 'phx_reply' && m.ref === joined.joinRef) &&
          !(m.event === 'phx_reply' && m.topic === 'phoenix'),
      )
    },
    close() {
      by.terminate()
      control.terminate()
    },
  }
}

/** Connects a raw client, runs `fn(client)`, always terminates it. */
export async function withClient(gw, opts, fn) {
  const c = await connect(gw, opts)
  try {
    return await fn(c)
  } finally {
    c.terminate()
  }
}

/** Attempts a WebSocket upgrade expected to be refused: resolves {status, body}. */
export function refusedUpgrade(gw, { apikey = ANON_KEY, vsn = '2.0.0' } = {}) {
  const qs = new URLSearchParams()
  if (apikey !== null) qs.set('apikey', apikey)
  qs.set('vsn', vsn)
  return new Promise((res, rej) => {
    const ws = new WebSocket(`${gw.wsUrl()}?${qs}`, { perMessageDeflate: false })
    ws.once('open', () => {
      ws.terminate()
      rej(new Error('upgrade was accepted'))
    })
    ws.once('unexpected-response', (_req, resp) => {
      let body = ''
      resp.setEncoding('utf8')
      resp.on('data', (d) => (body += d))
      resp.on('end', () => {
        ws.terminate()
        res({ status: resp.statusCode, body: body ? JSON.parse(body) : null })
      })
    })
    ws.once('error', (e) => {
      if (!String(e.message).includes('Unexpected server response')) rej(e)
    })
  })
}

/** Opens a TCP connection to the gateway; resolves the socket once connected. */
export function tcpConnect(gw) {
  return new Promise((res, rej) => {
    const s = net.connect({ host: '127.0.0.1', port: gw.port })
    opened.add(s)
    s.once('connect', () => res(s))
    s.once('error', rej)
  })
}

/** Resolves when `socket` is closed (by either side). */
export function closedOf(socket) {
  return new Promise((res) => {
    if (socket.destroyed) return res()
    socket.once('close', res)
  })
}

/** The file descriptor limit of this process (soft), from /proc. */
export async function fdLimit() {
  const { readFile } = await import('node:fs/promises')
  const text = await readFile('/proc/self/limits', 'utf8')
  const m = /^Max open files\s+(\d+)/m.exec(text)
  return m ? Number(m[1]) : 1024
}

/** Sum of the samples of `name` whose labels contain every `key="value"` in `labels`. */
export async function metricWhere(gw, name, labels = {}) {
  const text = await gw.metricsText()
  let sum = 0
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line)
    if (!m || m[1] !== name) continue
    const ls = m[2] ?? ''
    if (Object.entries(labels).every(([k, v]) => ls.includes(`${k}="${v}"`))) sum += Number(m[3])
  }
  return sum
}

/** A client frame: FIN/opcode byte, masked payload (as a browser sends it). */
export function clientFrame(opcode, payload = Buffer.alloc(0), { fin = true, rsv = 0, masked = true } = {}) {
  const data = Buffer.from(payload)
  const head = [(fin ? 0x80 : 0) | (rsv << 4) | opcode]
  const maskBit = masked ? 0x80 : 0
  if (data.length < 126) head.push(maskBit | data.length)
  else if (data.length <= 0xffff) head.push(maskBit | 126, data.length >> 8, data.length & 0xff)
  else {
    head.push(maskBit | 127)
    const len = Buffer.alloc(8)
    len.writeBigUInt64BE(BigInt(data.length))
    head.push(...len)
  }
  if (!masked) return Buffer.concat([Buffer.from(head), data])
  const mask = Buffer.from([0x12, 0x34, 0x56, 0x78])
  const body = Buffer.from(data.map((b, i) => b ^ mask[i % 4]))
  return Buffer.concat([Buffer.from(head), mask, body])
}

/**
 * A WebSocket spoken byte by byte over TCP (for frames `ws` refuses to send):
 * upgrades, then collects the server's frames. `frames` are {opcode, payload};
 * `closed` resolves with the close frame's code (or null) once the TCP
 * connection ends.
 */
export async function byteSocket(gw, { vsn = '2.0.0', apikey = ANON_KEY } = {}) {
  const s = await tcpConnect(gw)
  s.write(
    `GET /socket/websocket?apikey=${apikey}&vsn=${vsn} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
  )
  let buf = Buffer.alloc(0)
  let upgraded = false
  const frames = []
  const waiters = new Set()
  const closed = new Promise((res) => s.once('close', () => res(frames.find((f) => f.opcode === 8)?.code ?? null)))
  s.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    if (!upgraded) {
      const end = buf.indexOf('\r\n\r\n')
      if (end < 0) return
      if (!buf.subarray(0, 12).toString().includes('101')) throw new Error(`upgrade refused: ${buf.toString()}`)
      upgraded = true
      buf = buf.subarray(end + 4)
    }
    for (;;) {
      if (buf.length < 2) break
      let len = buf[1] & 0x7f
      let off = 2
      if (len === 126) {
        if (buf.length < 4) break
        len = buf.readUInt16BE(2)
        off = 4
      } else if (len === 127) {
        if (buf.length < 10) break
        len = Number(buf.readBigUInt64BE(2))
        off = 10
      }
      if (buf.length < off + len) break
      const payload = buf.subarray(off, off + len)
      const f = { opcode: buf[0] & 0x0f, payload }
      if (f.opcode === 8) f.code = payload.length >= 2 ? payload.readUInt16BE(0) : null
      frames.push(f)
      buf = buf.subarray(off + len)
      for (const w of waiters) w()
    }
  })
  await new Promise((res, rej) => {
    const check = () => upgraded && (waiters.delete(check), res())
    waiters.add(check)
    s.once('data', check)
    s.once('error', rej)
  })
  /** Resolves with the first frame matching `pred` (5 s). */
  const next = (pred) =>
    new Promise((res, rej) => {
      const check = () => {
        const f = frames.find(pred)
        if (f) {
          waiters.delete(check)
          clearTimeout(t)
          res(f)
        }
      }
      const t = setTimeout(() => {
        waiters.delete(check)
        rej(new Error(`no matching frame; got opcodes ${frames.map((f) => f.opcode)}`))
      }, 5000)
      waiters.add(check)
      check()
    })
  return { socket: s, frames, closed, next, send: (b) => s.write(b) }
}
