// sensorcast live dashboard: no build step, no dependencies.
//
// Data: GET /v1/sensors for the list, one WebSocket /v1/ws/predictions (snapshot, batched
// frames) for live updates, GET /v1/sensors/{id} to seed the chart, GET /v1/stats every second
// for the figures. On a drop it reconnects with since=<last seq seen>, so nothing is missed
// while the server keeps it; a `gap` or `lagged` notice makes it reload the counts instead.
"use strict";

const MAX_POINTS = 600;      // points kept for the chart of the selected sensor
const MAX_ROWS = 300;        // rows rendered in the sensor table
const MAX_EVENTS = 50;       // recent anomalies listed

const params = new URLSearchParams(location.search);
const key = params.get("key");  // where API keys are set: a header on fetches, key= on the socket
const $ = (id) => document.getElementById(id);

const state = {
  sensors: new Map(),   // id -> {id, value, count, anomalies, anomalyAt}
  selected: null,
  channel: null,
  series: [],           // selected sensor's predictions, oldest first
  epoch: null,
  lastSeq: null,
  lagged: 0,
  ws: null,
  retryMs: 500,
  dirty: { list: true, chart: true },
  prevStats: null,
  rate: null,           // readings/s, smoothed (see smoothRate)
  blocked: false,       // the service refused us for our key: no point retrying without a new one
  alarms: new Map(),    // alarm_id -> the alarm, while it is active
};

const RATE_TAU_S = 5;   // time constant of the readings/s average

function withKey(url) {
  if (!key) return url;
  return url + (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(key);
}

class HttpError extends Error {
  constructor(url, status, detail) {
    super(`${url}: HTTP ${status}${detail ? ": " + detail : ""}`);
    this.status = status;
    this.detail = detail;
  }
}

async function getJSON(url) {
  const headers = key ? { "X-API-Key": key } : {};
  const response = await fetch(url, { cache: "no-store", headers });
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).detail || ""; } catch (err) { /* not JSON */ }
    const error = new HttpError(url, response.status, detail);
    if (response.status === 401 || response.status === 403) needKey(error);
    throw error;
  }
  return response.json();
}

// ---- access: say that a key is needed, and take one ---------------------------------------

function needKey(error) {
  state.blocked = true;
  const why = error.status === 401
    ? (key ? "The API key given is not known to this service." : "This service needs an API key.")
    : "The API key given lacks the subscribe scope.";
  $("key-reason").textContent = `${why} (${error.detail || "HTTP " + error.status})`;
  $("keyform").hidden = false;
  $("empty").hidden = true;
  setConn("offline", error.status === 401 ? "key needed" : "key refused");
}

$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  const given = $("key-input").value.trim();
  if (!given) return;
  const query = new URLSearchParams(location.search);
  query.set("key", given);
  location.search = query.toString();  // reloads the page with the key
});

// A browser does not show a page the HTTP answer to a refused WebSocket handshake (only
// code 1006), so ask an HTTP route guarded like the socket why it was refused.
async function explainClose(event, opened) {
  if (event.reason) return `closed (${event.code}): ${event.reason}`;
  if (opened) return `disconnected (${event.code})`;
  try {
    await getJSON("/v1/stats");
  } catch (err) {
    if (err instanceof HttpError) return `refused: HTTP ${err.status} ${err.detail}`.trim();
    return "the service does not answer";
  }
  return `refused (${event.code})`;
}

// Exponentially weighted mean of the rate, so that a bursty sender (400/s one second,
// 0 the next) reads as the 200/s it averages rather than flipping between the two.
function smoothRate(previous, rate, dtS, tauS = RATE_TAU_S) {
  if (previous === null || !Number.isFinite(previous)) return rate;
  const alpha = 1 - Math.exp(-dtS / tauS);
  return previous + alpha * (rate - previous);
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return x.toExponential(2);
  return x.toFixed(a >= 100 ? 1 : a >= 1 ? 2 : 3);
}

function firstValue(values, channel) {
  if (!values) return null;
  if (channel && channel in values) return values[channel];
  const keys = Object.keys(values);
  return keys.length ? values[keys[0]] : null;
}

// ---- sensor list ------------------------------------------------------------------------

async function loadSensors() {
  const body = await getJSON("/v1/sensors");
  for (const s of body.sensors) {
    const last = s.last_prediction;
    state.sensors.set(s.sensor_id, {
      id: s.sensor_id,
      value: last ? firstValue(last.values) : null,
      count: s.count,
      anomalies: s.anomalies,
      anomalyAt: 0,
    });
  }
  if (!state.selected && body.sensors.length) {
    const wanted = decodeURIComponent(location.hash.replace(/^#sensor=/, ""));
    select(state.sensors.has(wanted) ? wanted : body.sensors[0].sensor_id);
  }
  state.dirty.list = true;
}

async function loadAlarms() {
  const body = await getJSON("/v1/alarms?state=active");
  state.alarms.clear();
  for (const a of body.alarms) state.alarms.set(a.alarm_id, a);
  renderAlarms();
}

function onAlarm(a) {
  if (a.state === "raised") state.alarms.set(a.alarm_id, { ...a, acknowledged: false });
  else if (a.state === "cleared") state.alarms.delete(a.alarm_id);
  else if (a.state === "acknowledged" && state.alarms.has(a.alarm_id)) {
    state.alarms.get(a.alarm_id).acknowledged = true;
  }
  renderAlarms();
}

function renderAlarms() {
  const list = $("alarms");
  list.replaceChildren();
  const active = [...state.alarms.values()].sort((a, b) => (a.started_at < b.started_at ? 1 : -1));
  for (const a of active) {
    const li = document.createElement("li");
    li.dataset.alarm = a.alarm_id;
    const name = document.createElement("b");
    name.textContent = a.sensor_id;
    const since = new Date(a.started_at).toLocaleString();
    const what = [a.channels.join(", "), a.detectors.join(", ")].filter(Boolean).join(" · ");
    li.append(name, ` since ${since}: ${what}, peak ${fmt(a.peak_score)}`);
    if (a.acknowledged) li.append(" (acknowledged)");
    list.append(li);
  }
  $("alarm-count").textContent = String(active.length);
  $("no-alarms").hidden = active.length > 0;
}

function renderList() {
  const tbody = $("sensors").tBodies[0];
  const needle = $("filter").value.trim().toLowerCase();
  const ids = [...state.sensors.keys()].filter((id) => !needle || id.toLowerCase().includes(needle)).sort();
  const shown = ids.slice(0, MAX_ROWS);
  const now = performance.now();
  const rows = shown.map((id) => {
    const s = state.sensors.get(id);
    const tr = document.createElement("tr");
    tr.dataset.sensor = id;
    if (id === state.selected) tr.className = "selected";
    if (s.anomalyAt && now - s.anomalyAt < 3000) tr.classList.add("flash");
    tr.innerHTML = '<td class="sensor"></td><td class="num"></td><td class="num"></td><td class="num"></td>';
    const cells = tr.children;
    cells[0].textContent = id;
    cells[0].title = id;
    cells[1].textContent = fmt(s.value);
    cells[2].textContent = s.count.toLocaleString();
    cells[3].textContent = s.anomalies.toLocaleString();
    if (s.anomalies) cells[3].className = "num hot";
    return tr;
  });
  tbody.replaceChildren(...rows);
  $("more").textContent = ids.length > shown.length ? `and ${ids.length - shown.length} more (use the filter)` : "";
  $("empty").hidden = state.blocked || state.sensors.size > 0;
}

$("sensors").addEventListener("click", (event) => {
  const tr = event.target.closest("tr[data-sensor]");
  if (tr) select(tr.dataset.sensor);
});
$("filter").addEventListener("input", () => { state.dirty.list = true; });
$("channel").addEventListener("change", (event) => { state.channel = event.target.value; state.dirty.chart = true; });

// ---- the selected sensor ----------------------------------------------------------------

async function select(id) {
  state.selected = id;
  state.series = [];
  state.channel = null;
  history.replaceState(null, "", location.search + "#sensor=" + encodeURIComponent(id));
  $("chart-title").textContent = id;
  state.dirty.list = state.dirty.chart = true;
  try {
    const body = await getJSON("/v1/sensors/" + encodeURIComponent(id));
    if (state.selected !== id) return;
    const seen = new Set(state.series.map((p) => p.seq));
    const seeded = body.recent_predictions.filter((p) => !seen.has(p.seq));
    state.series = seeded.concat(state.series).sort((a, b) => a.seq - b.seq);
  } catch (err) {
    console.warn(err);
  }
  state.dirty.chart = true;
}

function onPrediction(p, live) {
  let s = state.sensors.get(p.sensor_id);
  if (!s) {
    s = { id: p.sensor_id, value: null, count: 0, anomalies: 0, anomalyAt: 0 };
    state.sensors.set(p.sensor_id, s);
  }
  s.value = firstValue(p.values);
  if (live) {
    s.count += 1;
    if (p.is_anomaly) {
      s.anomalies += 1;
      s.anomalyAt = performance.now();
      addEvent(p);
    }
  }
  state.dirty.list = true;
  if (!state.selected) select(p.sensor_id);
  if (p.sensor_id === state.selected) {
    const last = state.series[state.series.length - 1];
    if (!last || p.seq > last.seq) {
      state.series.push(p);
      if (state.series.length > MAX_POINTS) state.series.splice(0, state.series.length - MAX_POINTS);
      state.dirty.chart = true;
    }
  }
}

function addEvent(p) {
  const li = document.createElement("li");
  const when = new Date(p.ts).toLocaleTimeString();
  li.innerHTML = "<b></b> <span></span>";
  li.firstChild.textContent = p.sensor_id;
  li.lastChild.textContent =
    ` ${when} · value ${fmt(firstValue(p.values))} · score ${fmt(p.anomaly_score)} · seq ${p.seq}`;
  li.dataset.sensor = p.sensor_id;
  li.addEventListener("click", () => select(p.sensor_id));
  const list = $("anomalies");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// ---- chart -------------------------------------------------------------------------------

function renderChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();

  const series = state.series;
  const channels = series.length ? Object.keys(series[series.length - 1].values) : [];
  updateChannels(channels);
  const ch = state.channel || channels[0];
  const points = series
    .map((p) => ({
      t: Date.parse(p.ts), v: p.values ? p.values[ch] : undefined,
      f: p.forecast ? p.forecast[ch] : undefined, anomaly: p.is_anomaly, status: p.status, p,
    }))
    .filter((q) => Number.isFinite(q.t) && Number.isFinite(q.v));
  canvas.dataset.points = String(points.length);
  canvas.dataset.anomalies = String(points.filter((q) => q.anomaly).length);
  if (!points.length) {
    ctx.fillStyle = color("--muted");
    ctx.font = "13px system-ui, sans-serif";
    ctx.fillText(state.selected ? "waiting for predictions…" : "no sensor selected", 16, 24);
    $("chart-note").textContent = "";
    return;
  }
  // A forecast is made after seeing a reading, for the next one: draw each forecast at the
  // following reading's time, where it is what the model expected there.
  const expected = [];
  for (let i = 1; i < points.length; i++) {
    if (Number.isFinite(points[i - 1].f)) expected.push({ t: points[i].t, v: points[i - 1].f });
  }
  const lastF = points[points.length - 1].f;
  const t0 = points[0].t;
  let t1 = points[points.length - 1].t;
  const step = points.length > 1 ? (t1 - t0) / (points.length - 1) : 1000;
  const tNext = t1 + step;
  if (Number.isFinite(lastF)) t1 = tNext;
  let lo = Infinity, hi = -Infinity;
  for (const q of points) { lo = Math.min(lo, q.v); hi = Math.max(hi, q.v); }
  for (const e of expected) { lo = Math.min(lo, e.v); hi = Math.max(hi, e.v); }
  if (Number.isFinite(lastF)) { lo = Math.min(lo, lastF); hi = Math.max(hi, lastF); }
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const left = 64, right = width - 16, top = 12, bottom = height - 28;
  const x = (t) => left + (t1 === t0 ? 0.5 : (t - t0) / (t1 - t0)) * (right - left);
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);

  // grid and axes
  ctx.strokeStyle = color("--line");
  ctx.fillStyle = color("--muted");
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(right, yy); ctx.stroke();
    ctx.fillText(fmt(v), 6, yy + 4);
  }
  const timeLabel = (t) => new Date(t).toLocaleTimeString();
  ctx.fillText(timeLabel(t0), left, height - 8);
  const endLabel = timeLabel(points[points.length - 1].t);
  ctx.fillText(endLabel, right - ctx.measureText(endLabel).width, height - 8);

  // expected (dashed), then the value line, then markers on top
  ctx.setLineDash([5, 4]);
  ctx.strokeStyle = color("--forecast");
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  expected.forEach((e, i) => (i ? ctx.lineTo(x(e.t), y(e.v)) : ctx.moveTo(x(e.t), y(e.v))));
  if (Number.isFinite(lastF)) {
    if (!expected.length) ctx.moveTo(x(points[points.length - 1].t), y(points[points.length - 1].v));
    ctx.lineTo(x(tNext), y(lastF));
  }
  ctx.stroke();
  ctx.setLineDash([]);

  ctx.strokeStyle = color("--value");
  ctx.lineWidth = 1.75;
  ctx.beginPath();
  points.forEach((q, i) => (i ? ctx.lineTo(x(q.t), y(q.v)) : ctx.moveTo(x(q.t), y(q.v))));
  ctx.stroke();

  for (const q of points) {
    if (q.anomaly) {
      ctx.fillStyle = color("--anomaly");
      ctx.beginPath(); ctx.arc(x(q.t), y(q.v), 5.5, 0, 2 * Math.PI); ctx.fill();
      ctx.strokeStyle = color("--anomaly");
      ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(x(q.t), y(q.v), 9, 0, 2 * Math.PI); ctx.stroke();
    } else if (q.status !== "ok") {
      ctx.fillStyle = color("--warming");
      ctx.beginPath(); ctx.arc(x(q.t), y(q.v), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
  }
  const last = points[points.length - 1];
  $("chart-note").textContent =
    `${points.length} points · last ${fmt(last.v)} · next expected ${fmt(lastF)} · ` +
    `score ${fmt(last.p.anomaly_score)} · model v${last.p.model_version} · ${last.status}`;
}

function updateChannels(channels) {
  const select = $("channel");
  const current = [...select.options].map((o) => o.value).join(",");
  if (current !== channels.join(",")) {
    select.replaceChildren(...channels.map((c) => new Option(c, c)));
    if (state.channel && channels.includes(state.channel)) select.value = state.channel;
  }
  select.hidden = channels.length < 2;
}

// ---- WebSocket ---------------------------------------------------------------------------

function setConn(kind, text) {
  const el = $("conn");
  el.dataset.state = kind;
  el.textContent = text;
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ batch: "true" });
  if (state.lastSeq === null) query.set("snapshot", "true");  // first connection
  else query.set("since", String(state.lastSeq));
  const ws = new WebSocket(withKey(`${proto}//${location.host}/v1/ws/predictions?${query}`));
  state.ws = ws;
  setConn(state.lastSeq === null ? "connecting" : "reconnecting", "connecting…");
  let opened = false;
  ws.onmessage = (event) => {
    if (state.ws !== ws) return;
    opened = true;
    const message = JSON.parse(event.data);
    if (message.type === "predictions") message.items.forEach(onFrame);
    else onFrame(message);
  };
  ws.onclose = async (event) => {
    if (state.ws !== ws) return;
    const why = await explainClose(event, opened);
    if (state.blocked) return;  // needKey() said so; retrying with the same key cannot help
    const delay = state.retryMs * (0.8 + Math.random() * 0.4);
    state.retryMs = Math.min(state.retryMs * 2, 10000);
    setConn("offline", `${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
    setTimeout(connect, delay);
  };
}

function onFrame(m) {
  switch (m.type) {
    case "hello":
      if (state.epoch !== null && m.epoch !== state.epoch) {
        // A new epoch: the server restarted and seqs start over. So do we.
        state.epoch = null;
        state.lastSeq = null;
        state.sensors.clear();
        state.alarms.clear();
        state.series = [];
        const old = state.ws;
        state.ws = null;
        old.close();
        loadSensors().catch(console.warn).finally(connect);
        return;
      }
      state.epoch = m.epoch;
      // Snapshot frames (seq <= hello's) were counted in /v1/sensors already.
      if (state.lastSeq === null) state.lastSeq = m.seq;
      state.retryMs = 500;
      setConn("live", "live");
      $("epoch").textContent = m.epoch;
      break;
    case "prediction": {
      const live = m.seq > state.lastSeq;
      onPrediction(m, live);
      if (live) state.lastSeq = m.seq;
      break;
    }
    case "model":
      if (m.seq > state.lastSeq) state.lastSeq = m.seq;
      break;
    case "alarm":
      if (m.snapshot || m.seq > state.lastSeq) onAlarm(m);
      if (m.seq > state.lastSeq) state.lastSeq = m.seq;
      break;
    case "lagged":
      state.lagged += m.dropped;
      $("lagged").textContent = state.lagged.toLocaleString();
      loadSensors().catch(console.warn);
      loadAlarms().catch(console.warn);
      break;
    case "gap":
      if (m.reason === "epoch_changed" && m.from_seq !== undefined) {
        // The numbering changed under us (a Redis replica was promoted): follow it.
        state.epoch = m.epoch;
        state.lastSeq = m.from_seq - 1;
        $("epoch").textContent = m.epoch;
      }
      loadSensors().catch(console.warn);
      loadAlarms().catch(console.warn);
      break;
  }
}

// ---- figures -----------------------------------------------------------------------------

async function pollStats() {
  try {
    const s = await getJSON("/v1/stats");
    const prev = state.prevStats;
    if (prev && s.time > prev.time) {
      const dt = s.time - prev.time;
      const rate = smoothRate(state.rate, Math.max(0, (s.accepted - prev.accepted) / dt), dt);
      state.rate = rate;
      $("rate").textContent = rate >= 100 ? Math.round(rate).toLocaleString() : rate.toFixed(1);
    }
    state.prevStats = s;
    const lat = s.latency;
    $("latency").textContent = lat && lat.p99_ms ? `${fmt(lat.p50_ms)} / ${fmt(lat.p99_ms)} ms` : "–";
    $("subscribers").textContent = String(s.subscribers);
    $("sensor-count").textContent = s.sensors.toLocaleString();
    $("accepted").textContent = s.accepted.toLocaleString();
  } catch (err) {
    console.warn(err);
  }
}

function frame() {
  if (state.dirty.list) { state.dirty.list = false; renderList(); }
  if (state.dirty.chart) { state.dirty.chart = false; renderChart(); }
  $("seq").textContent = state.lastSeq === null ? "–" : String(state.lastSeq);
}

window.addEventListener("resize", () => { state.dirty.chart = true; });
// Rendering is throttled: frames may arrive by the thousand per second.
setInterval(frame, 200);
setInterval(() => { state.dirty.list = true; }, 1000);  // let anomaly flashes fade
setInterval(() => { if (!state.blocked) pollStats(); }, 1000);
loadSensors().catch(console.warn).finally(() => { if (!state.blocked) connect(); });
loadAlarms().catch(console.warn);
pollStats();
