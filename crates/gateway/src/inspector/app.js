// realtime-gateway inspector: plain JavaScript, no build step, no CDN.
// It reads the admin APIs (status, events, connections, tables) and sends
// broadcasts over its own WebSocket, like any client.
'use strict'

const $ = (id) => document.getElementById(id)
const state = {
  token: sessionStorage.getItem('rg-token') || '',
  lastEventId: 0,
  samples: [], // [{t, sent}]
  rates: [], // deliveries/s, newest last
  events: [], // newest first, bounded
}
const MAX_EVENTS = 500
const CHART_POINTS = 90

function headers() {
  return state.token ? { authorization: `Bearer ${state.token}` } : {}
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: { ...headers(), ...(opts.headers || {}) } })
  if (r.status === 401 || r.status === 403) {
    needToken(r.status === 403 ? 'this token is not a service_role key' : state.token ? 'token refused' : '')
    throw new Error(`HTTP ${r.status}`)
  }
  const text = await r.text()
  let body = null
  try {
    body = text ? JSON.parse(text) : null
  } catch {
    body = { message: text }
  }
  if (!r.ok) throw new Error((body && (body.message || body.error)) || `HTTP ${r.status}`)
  return body
}

function needToken(why) {
  $('auth').hidden = false
  $('main').hidden = true
  $('auth-error').textContent = why || ''
}

function el(tag, text, cls) {
  const e = document.createElement(tag)
  if (text !== undefined && text !== null) e.textContent = String(text)
  if (cls) e.className = cls
  return e
}

function row(cells) {
  const tr = document.createElement('tr')
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el('td', c))
  return tr
}

function td(child, cls) {
  const t = el('td', undefined, cls)
  if (child instanceof Node) t.appendChild(child)
  else t.textContent = child === undefined || child === null ? '' : String(child)
  return t
}

// ---- status and chart -------------------------------------------------------

async function pollStatus() {
  const s = await api('/api/realtime/status')
  $('auth').hidden = true
  $('main').hidden = false
  const st = $('status')
  st.textContent = ''
  const ready = el('span', s.ready ? 'ready' : s.draining ? 'draining' : 'not ready', s.ready ? 'ok' : 'bad')
  st.append(`v${s.version} · up ${fmtSecs(s.uptime_secs)} · `, ready, ` · ${s.connections} connections · ${s.channels.total} channels`)
  const f = s.change_feed
  const lag = f.lag_seconds === null ? '–' : `${f.lag_seconds.toFixed(3)} s`
  const behind = f.rows_behind === null ? '–' : f.rows_behind >= f.rows_behind_cap ? `≥ ${f.rows_behind}` : f.rows_behind
  $('feed').textContent = `change feed: ${f.state} · lag ${lag} · rows behind ${behind} · last batch ${f.last_batch_at || '–'} · lagged frames ${s.counters.lagged_frames}`
  const now = performance.now() / 1000
  state.samples.push({ t: now, sent: s.counters.frames_sent })
  if (state.samples.length > 2) state.samples.shift()
  if (state.samples.length === 2) {
    const [a, b] = state.samples
    const rate = Math.max(0, (b.sent - a.sent) / Math.max(0.001, b.t - a.t))
    state.rates.push(rate)
    if (state.rates.length > CHART_POINTS) state.rates.shift()
    $('rate').textContent = `${rate.toFixed(1)}/s`
    drawChart()
  }
}

function fmtSecs(x) {
  if (x < 120) return `${Math.round(x)} s`
  if (x < 7200) return `${Math.round(x / 60)} min`
  return `${(x / 3600).toFixed(1)} h`
}

function drawChart() {
  const c = $('chart')
  const ctx = c.getContext('2d')
  const w = c.width
  const h = c.height
  ctx.clearRect(0, 0, w, h)
  const max = Math.max(1, ...state.rates)
  ctx.strokeStyle = '#262b36'
  ctx.beginPath()
  for (const f of [0.25, 0.5, 0.75]) {
    ctx.moveTo(0, h * f)
    ctx.lineTo(w, h * f)
  }
  ctx.stroke()
  ctx.strokeStyle = '#3ecf8e'
  ctx.lineWidth = 2
  ctx.beginPath()
  state.rates.forEach((r, i) => {
    const x = (i / (CHART_POINTS - 1)) * w
    const y = h - 4 - (r / max) * (h - 8)
    if (i === 0) ctx.moveTo(x, y)
    else ctx.lineTo(x, y)
  })
  ctx.stroke()
  ctx.fillStyle = '#8a93a6'
  ctx.fillText(`max ${max.toFixed(1)}/s`, 6, 12)
}

// ---- events -----------------------------------------------------------------

async function pollEvents() {
  if ($('pause').checked) return
  const r = await api(`/api/realtime/events?limit=200&after=${state.lastEventId}`)
  if (r.last_id < state.lastEventId) state.lastEventId = 0 // the gateway restarted
  for (const e of r.events) {
    state.lastEventId = Math.max(state.lastEventId, e.id)
    state.events.unshift(e)
  }
  state.events.length = Math.min(state.events.length, MAX_EVENTS)
  if (r.events.length) renderEvents()
}

function eventCells(e) {
  const where = e.kind === 'broadcast' ? e.topic : `${e.schema}.${e.table}`
  const what = e.kind === 'broadcast' ? `${e.event} → ${e.deliveries}` : e.type
  const payload = e.payload + (e.truncated ? ' …' : '')
  return [e.id, e.at.slice(11, 23), e.kind === 'broadcast' ? 'broadcast' : 'change', where, what, payload]
}

function renderEvents() {
  const q = $('filter').value.trim().toLowerCase()
  const body = $('events').tBodies[0]
  body.textContent = ''
  for (const e of state.events) {
    const cells = eventCells(e)
    if (q && !cells.join(' ').toLowerCase().includes(q)) continue
    const tr = row(cells.map((c, i) => td(c, i === 5 ? 'payload' : i === 2 ? `kind-${e.kind}` : '')))
    tr.dataset.kind = e.kind
    body.appendChild(tr)
  }
}

// ---- clients ----------------------------------------------------------------

async function pollClients() {
  const r = await api('/api/realtime/connections?limit=200')
  const body = $('clients').tBodies[0]
  body.textContent = ''
  for (const c of r.connections) {
    const chans = c.channels.map((ch) => ch.topic.replace(/^realtime:/, '') + (ch.postgres_changes ? ' (changes)' : '') + (ch.presence ? ' (presence)' : '')).join(', ')
    body.appendChild(row([c.id, c.forwarded_for || c.peer, c.sub || '', c.role, chans, c.since.slice(11, 19), c.frames_in, c.frames_out, c.lagged_frames]))
  }
  const dis = $('disconnects').tBodies[0]
  dis.textContent = ''
  for (const d of r.disconnects.slice(-20).reverse()) {
    dis.appendChild(row([d.id, d.forwarded_for || d.peer, d.sub || '', d.ended.slice(11, 19), d.reason, d.detail || '']))
  }
}

// ---- tables -----------------------------------------------------------------

async function loadTables() {
  const err = $('tables-error')
  err.textContent = ''
  let r
  try {
    r = await api('/api/realtime/tables')
  } catch (e) {
    err.textContent = `tables: ${e.message}`
    return
  }
  const body = $('tables').tBodies[0]
  body.textContent = ''
  for (const t of r.tables) {
    const name = `${t.schema}.${t.table}`
    const badge = el('span', t.enabled ? 'enabled' : 'disabled', `badge ${t.enabled ? 'on' : 'off'}`)
    const btn = el('button', t.enabled ? 'Disable' : 'Enable')
    btn.type = 'button'
    btn.dataset.table = name
    btn.addEventListener('click', async () => {
      btn.disabled = true
      try {
        await api(`/api/realtime/tables/${encodeURIComponent(name)}`, { method: t.enabled ? 'DELETE' : 'POST' })
      } catch (e) {
        err.textContent = `${name}: ${e.message}`
      }
      await loadTables()
    })
    const tr = row([td(name), td(badge), td(btn)])
    tr.dataset.table = name
    tr.dataset.enabled = String(t.enabled)
    body.appendChild(tr)
  }
}

// ---- the WebSocket (Phoenix V1 JSON), for sending broadcasts -----------------

const ws = { sock: null, ref: 0, waiting: new Map(), joined: new Map(), heartbeat: null }

function wsUrl() {
  const proto = location.protocol === 'https:' ? 'wss' : 'ws'
  const q = new URLSearchParams({ vsn: '1.0.0' })
  if (state.token) q.set('apikey', state.token)
  return `${proto}://${location.host}/socket/websocket?${q}`
}

function wsOpen() {
  if (ws.sock && ws.sock.readyState <= 1) return ws.ready
  ws.joined.clear()
  ws.sock = new WebSocket(wsUrl())
  ws.ready = new Promise((res, rej) => {
    ws.sock.onopen = () => res()
    ws.sock.onerror = () => rej(new Error('WebSocket failed'))
  })
  ws.sock.onmessage = (m) => {
    const msg = JSON.parse(m.data)
    if (msg.event === 'phx_reply' && ws.waiting.has(msg.ref)) {
      ws.waiting.get(msg.ref)(msg.payload)
      ws.waiting.delete(msg.ref)
    }
    if (msg.event === 'phx_close' || msg.event === 'phx_error') ws.joined.delete(msg.topic)
  }
  ws.sock.onclose = () => {
    clearInterval(ws.heartbeat)
    ws.joined.clear()
  }
  clearInterval(ws.heartbeat)
  ws.heartbeat = setInterval(() => push('phoenix', 'heartbeat', {}).catch(() => {}), 20000)
  return ws.ready
}

function push(topic, event, payload) {
  const ref = String(++ws.ref)
  return new Promise((res, rej) => {
    const t = setTimeout(() => {
      ws.waiting.delete(ref)
      rej(new Error(`no reply to ${event}`))
    }, 5000)
    ws.waiting.set(ref, (p) => {
      clearTimeout(t)
      res(p)
    })
    ws.sock.send(JSON.stringify({ topic, event, payload, ref }))
  })
}

async function sendBroadcast(topic, event, payload) {
  await wsOpen()
  const full = `realtime:${topic}`
  if (!ws.joined.has(full)) {
    const reply = await push(full, 'phx_join', { config: { broadcast: { self: false, ack: true }, presence: { key: '' }, postgres_changes: [] }, access_token: state.token || undefined })
    if (reply.status !== 'ok') throw new Error(`join refused: ${JSON.stringify(reply.response)}`)
    ws.joined.set(full, true)
  }
  const reply = await push(full, 'broadcast', { type: 'broadcast', event, payload })
  if (reply.status !== 'ok') throw new Error(`broadcast refused: ${JSON.stringify(reply.response)}`)
}

// ---- wiring -----------------------------------------------------------------

function every(ms, fn) {
  const tick = async () => {
    try {
      await fn()
    } catch (e) {
      if (!String(e.message).startsWith('HTTP 40')) console.warn(e)
    }
    setTimeout(tick, ms)
  }
  tick()
}

$('auth-form').addEventListener('submit', (e) => {
  e.preventDefault()
  state.token = $('token').value.trim()
  sessionStorage.setItem('rg-token', state.token)
  $('auth-error').textContent = ''
  if (ws.sock) ws.sock.close()
  pollStatus().then(loadTables).catch(() => {})
})

$('broadcast-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  const out = $('bc-result')
  let payload
  try {
    payload = JSON.parse($('bc-payload').value || 'null')
  } catch (err) {
    out.textContent = `payload is not JSON: ${err.message}`
    return
  }
  $('bc-send').disabled = true
  try {
    await sendBroadcast($('bc-topic').value.trim(), $('bc-event').value.trim(), payload)
    out.textContent = `sent at ${new Date().toISOString().slice(11, 19)}`
  } catch (err) {
    out.textContent = err.message
  } finally {
    $('bc-send').disabled = false
  }
})

$('filter').addEventListener('input', renderEvents)
$('clear').addEventListener('click', async () => {
  await api('/api/realtime/events/clear', { method: 'POST' })
  state.events = []
  renderEvents()
})

every(1000, pollStatus)
every(1000, pollEvents)
every(2000, pollClients)
every(5000, loadTables)
