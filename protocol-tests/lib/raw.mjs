// A wscat-style client over `ws` that speaks raw Phoenix frames (V1 objects,
// V2 arrays, V2 binary kinds 3/4) and lets a test await exact frames.
import WebSocket from 'ws'
import { ANON_KEY } from './jwt.mjs'
import { sleep, WAIT_MS } from './util.mjs'

/** Encodes a V2 binary kind-3 user broadcast push (PROTOCOL.md §1.4), as realtime-js does for channel.send(). */
export function encodeKind3({ joinRef = '', ref = '', topic, event, meta = '', payload, json = true }) {
  const parts = [joinRef, ref, topic, event, meta].map((s) => Buffer.from(s, 'utf8'))
  for (const p of parts) if (p.length > 255) throw new Error('kind-3 header field over 255 bytes')
  const body = json ? Buffer.from(JSON.stringify(payload), 'utf8') : Buffer.from(payload)
  const head = Buffer.from([3, ...parts.map((p) => p.length), json ? 1 : 0])
  return Buffer.concat([head, ...parts, body])
}

/** Decodes a server binary frame. Only kind 4 (user broadcast) is legal; anything else is reported as such. */
export function decodeBinary(buf) {
  const kind = buf[0]
  if (kind !== 4) return { kind: 'binary', binKind: kind, bytes: buf }
  const [tl, el, ml, enc] = [buf[1], buf[2], buf[3], buf[4]]
  let o = 5
  const take = (n) => {
    const s = buf.subarray(o, o + n)
    o += n
    return s
  }
  const topic = take(tl).toString('utf8')
  const userEvent = take(el).toString('utf8')
  const metaText = take(ml).toString('utf8')
  const rest = buf.subarray(o)
  return {
    kind: 'binary',
    binKind: 4,
    topic,
    event: 'broadcast',
    userEvent,
    meta: metaText ? JSON.parse(metaText) : null,
    encoding: enc,
    payload: enc === 1 ? JSON.parse(rest.toString('utf8')) : Buffer.from(rest),
    bytes: buf,
  }
}

/** Normalises a text frame into {kind, raw, frame, join_ref, ref, topic, event, payload}. */
export function decodeText(raw, proto) {
  let frame
  try {
    frame = JSON.parse(raw)
  } catch {
    return { kind: 'text', raw, frame: undefined, invalid: true }
  }
  if (Array.isArray(frame)) {
    const [join_ref, ref, topic, event, payload] = frame
    return { kind: 'text', proto: 2, raw, frame, join_ref, ref, topic, event, payload }
  }
  if (frame && typeof frame === 'object') {
    return { kind: 'text', proto: 1, raw, frame, join_ref: frame.join_ref, ref: frame.ref, topic: frame.topic, event: frame.event, payload: frame.payload }
  }
  return { kind: 'text', raw, frame, invalid: true, expectedProto: proto }
}

export class RawClient {
  /**
   * Connects to the gateway. `vsn`: '1.0.0', '2.0.0' or null (no vsn parameter → V1).
   * `apikey`: query parameter (null to leave it out). Resolves once the socket is open.
   */
  static async connect(gw, { vsn = '2.0.0', path = '/socket/websocket', apikey = ANON_KEY, query = {}, collect = true } = {}) {
    const params = new URLSearchParams()
    if (apikey !== null) params.set('apikey', apikey)
    for (const [k, v] of Object.entries(query)) params.set(k, v)
    if (vsn !== null) params.set('vsn', vsn)
    const qs = params.toString()
    const url = gw.wsUrl(path) + (qs ? `?${qs}` : '')
    const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 })
    const client = new RawClient(ws, vsn === '2.0.0' ? 2 : 1, collect)
    await new Promise((res, rej) => {
      ws.once('open', () => {
        client.openedAt = Date.now()
        res()
      })
      ws.once('unexpected-response', (_req, resp) => rej(new Error(`upgrade refused: HTTP ${resp.statusCode}`)))
      ws.once('error', rej)
    })
    return client
  }

  constructor(ws, proto, collect) {
    this.ws = ws
    this.proto = proto
    this.collect = collect
    /** Received, decoded messages not yet taken by next(). */
    this.inbox = []
    /** Every received message (when collecting), in order. */
    this.log = []
    /** Optional hook called with every decoded message. */
    this.onMessage = null
    this.refCounter = 100
    this.waiters = new Set()
    this.closeInfo = null
    this.errors = []
    ws.on('error', (e) => this.errors.push(e))
    ws.on('message', (data, isBinary) => {
      const msg = isBinary ? decodeBinary(Buffer.from(data)) : decodeText(data.toString('utf8'), this.proto)
      msg.at = Date.now()
      if (this.onMessage) this.onMessage(msg)
      if (!this.collect) return
      this.log.push(msg)
      this.inbox.push(msg)
      for (const w of this.waiters) w()
    })
    this.closed = new Promise((res) => {
      ws.on('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString('utf8'), at: Date.now() }
        for (const w of this.waiters) w()
        res(this.closeInfo)
      })
    })
  }

  get isOpen() {
    return this.ws.readyState === WebSocket.OPEN
  }

  makeRef() {
    return String(++this.refCounter)
  }

  sendText(text) {
    this.ws.send(text, { binary: false })
  }

  sendBinary(buf) {
    this.ws.send(buf, { binary: true })
  }

  /** Sends one Phoenix message in this connection's serializer; returns the ref. */
  push(topic, event, payload, { ref = this.makeRef(), joinRef = null } = {}) {
    if (this.proto === 2) this.sendText(JSON.stringify([joinRef, ref, topic, event, payload]))
    else {
      const m = { topic, event, payload, ref }
      if (joinRef !== null) m.join_ref = joinRef
      this.sendText(JSON.stringify(m))
    }
    return ref
  }

  /** Waits for the first inbox message matching `pred`, removes it from the inbox and returns it. */
  next(pred = () => true, { timeoutMs = WAIT_MS, what = 'a matching frame' } = {}) {
    return new Promise((res, rej) => {
      const check = () => {
        const i = this.inbox.findIndex(pred)
        if (i >= 0) {
          const [m] = this.inbox.splice(i, 1)
          done()
          res(m)
        } else if (this.closeInfo) {
          done()
          rej(new Error(`socket closed (${JSON.stringify(this.closeInfo)}) while waiting for ${what}; inbox: ${this.dumpInbox()}`))
        }
      }
      const timer = setTimeout(() => {
        done()
        rej(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; inbox: ${this.dumpInbox()}`))
      }, timeoutMs)
      const done = () => {
        clearTimeout(timer)
        this.waiters.delete(check)
      }
      this.waiters.add(check)
      check()
    })
  }

  /** Waits for a reply (phx_reply) to `ref` on `topic`. */
  reply(topic, ref, opts = {}) {
    return this.next((m) => m.event === 'phx_reply' && m.topic === topic && m.ref === ref, {
      what: `phx_reply ref=${ref} on ${topic}`,
      ...opts,
    })
  }

  /** Asserts that no message matching `pred` arrives within `ms` (and none is already in the inbox). */
  async expectNone(pred, ms, what = 'frame') {
    await sleep(ms)
    const hit = this.inbox.find(pred)
    if (hit) throw new Error(`unexpected ${what}: ${hit.raw ?? hit.bytes?.toString('hex')}`)
  }

  dumpInbox(max = 8) {
    const shown = this.inbox.slice(0, max).map((m) => m.raw ?? `<binary ${m.bytes.toString('hex').slice(0, 80)}>`)
    return `[${shown.join(', ')}${this.inbox.length > max ? `, … ${this.inbox.length - max} more` : ''}]`
  }

  /** Sends a heartbeat and returns the reply message. */
  async heartbeat(opts) {
    const ref = this.push('phoenix', 'heartbeat', {})
    return this.reply('phoenix', ref, opts)
  }

  /** Joins `topic` (full topic, e.g. realtime:room) with `payload`; returns {joinRef, reply}. */
  async join(topic, payload = { config: {} }, { joinRef = this.makeRef(), timeoutMs = WAIT_MS } = {}) {
    this.push(topic, 'phx_join', payload, { ref: joinRef, joinRef })
    const reply = await this.reply(topic, joinRef, { timeoutMs })
    return { joinRef, reply }
  }

  /**
   * Sends a heartbeat every `ms` (realtime-js does every 25 s) while the socket is open, so a
   * long test is not closed by the idle timeout. Works while reading is paused. Returns a stop function.
   */
  keepAlive(ms = 25000) {
    const timer = setInterval(() => {
      if (this.isOpen) this.push('phoenix', 'heartbeat', {})
    }, ms)
    timer.unref()
    this.ws.once('close', () => clearInterval(timer))
    return () => clearInterval(timer)
  }

  /** Stops reading from the TCP socket (the kernel buffers fill, then the server's backlog). */
  pause() {
    this.ws._socket.pause()
  }

  resume() {
    this.ws._socket.resume()
  }

  close() {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close()
    else this.ws.terminate()
  }

  terminate() {
    this.ws.terminate()
  }
}

/**
 * The exact decoded frame a server must send, in the connection's serializer:
 * V2 → [join_ref, ref, topic, event, payload]; V1 → {topic, event, payload, ref} (no join_ref).
 */
export function expectedFrame(proto, { join_ref = null, ref = null, topic, event, payload }) {
  return proto === 2 ? [join_ref, ref, topic, event, payload] : { topic, event, payload, ref }
}
