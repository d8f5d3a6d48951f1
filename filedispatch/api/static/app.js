// filedispatch dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
// Reads /api/v1/status, /api/v1/logs and /api/v1/stats; draws its charts on <canvas> itself.
"use strict";

const TOKEN_KEY = "filedispatch-token";
const REFRESH_MS = 5000;
const CHART_REFRESH_MS = 30000; // a month of stats on a big journal takes a second: not every 5 s
const STATUS_COLORS = {
  SUCCEEDED: "#2e9e5b", FAILED: "#d64545", PENDING: "#9aa3b5", IN_PROGRESS: "#3b7ddd",
};
const SERIES_COLORS = ["#3b7ddd", "#e08a2c", "#8e5cc8", "#2aa3a3", "#c8508a", "#7a8a2e", "#9aa3b5"];

const $ = (sel) => document.querySelector(sel);
const state = {
  cursors: [], cursor: null, next: null, period: "day", timer: null, detailId: null, chartsAt: 0,
};

// ---------------------------------------------------------------- requests

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  // the service refuses a change (retry, forget) that is not declared JSON: a page on another
  // site cannot send that type without asking first, and this service never says yes
  if (options.method && options.method !== "GET") headers["Content-Type"] = "application/json";
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    $("#token-form").hidden = false;
    throw new Error("This service needs its API token: enter it above.");
  }
  if (resp.status === 204) return null;
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(`${body.error || resp.status}: ${body.detail || resp.statusText}`);
  return body;
}

function showError(err) {
  const box = $("#message");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

// ---------------------------------------------------------------- formatting

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function uptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${Math.floor(s % 60)}s`;
}

// what a file's writer named cannot break a line, drive anything, or reorder what is around it:
// control and bidi characters are shown as the escapes the log and the console use
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]/gu;
const NAMED = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

function shown(text) {
  if (text === null || text === undefined) return "";
  return String(text).replace(UNSAFE, (c) => {
    if (NAMED[c]) return NAMED[c];
    const code = c.charCodeAt(0);
    return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
  });
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) node.append(c);
  return node;
}

// ---------------------------------------------------------------- status header

const PAUSE_REASONS = {
  operator: "Paused by an operator (fd-pause on the console): no new work is taken; the watchers keep recording. fd-resume continues.",
  journal: "Paused because the journal cannot be written: intake and delivery resume by themselves once it can.",
};

async function refreshStatus() {
  const s = await api("/api/v1/status");
  $("#version").textContent = s.version;
  $("#queue-depth").textContent = s.queue_depth ?? "–";
  $("#in-flight").textContent = s.in_flight;
  $("#succeeded").textContent = s.counts ? s.counts.SUCCEEDED : "–";
  $("#failures").textContent = s.counts ? s.counts.FAILED : "–";
  // red only when something failed: a red 0 reads as an alarm
  $("#failures-card").className = s.counts && s.counts.FAILED > 0 ? "card bad" : "card";
  $("#uptime").textContent = uptime(s.uptime_s);
  const waiting = s.retry_waiting || { count: 0, next_attempt: null };
  $("#retry-waiting").textContent = waiting.count;
  $("#retry-next").textContent = waiting.next_attempt ? `next ${when(waiting.next_attempt)}` : "";
  $("#retry-card").className = waiting.count > 0 ? "card warn" : "card";
  // the journal failing pauses everything: say so in the header, with what to do
  const failing = s.journal && s.journal.state !== "ok";
  $("#state").textContent = failing ? `PAUSED: journal ${s.journal.state}` : s.paused ? "PAUSED" : "running";
  $("#state-card").className = failing ? "card bad" : s.paused ? "card warn" : "card ok";
  $("#journal-alert").hidden = !failing;
  $("#journal-alert").textContent = failing
    ? `The journal cannot be written: ${shown(s.journal.error)}. Intake and delivery are paused and resume by themselves.`
    : "";
  const pausedBy = s.paused && !failing ? s.pause_reason || "operator" : null;
  $("#pause-alert").hidden = !pausedBy;
  $("#pause-alert").textContent = pausedBy ? PAUSE_REASONS[pausedBy] || `Paused (${shown(pausedBy)}).` : "";
  renderWindows(s.windows || []);
  renderService(s);
  renderNodes((await api("/api/v1/nodes")).nodes || []);
  return JSON.stringify(s.counts || {});
}

function renderNodes(nodes) {
  const rows = nodes.map((n) => {
    const tr = el("tr", {}, cell(n.name), cell(n.alive ? "held" : "ran out"), cell(n.lease_age_s.toFixed(1), "num"),
      cell((n.sources_listed || []).join(", "), "clip"), cell(n.in_flight, "num"),
      cell(n.waiting ?? 0, "num"));
    tr.dataset.node = n.name;
    if (!n.alive) tr.className = "has-error";
    return tr;
  });
  $("#nodes tbody").replaceChildren(...rows);
}

// destinations with a time window: shut ones say how much waits for them, and until when
function renderWindows(windows) {
  const list = $("#windows");
  list.replaceChildren(
    ...windows.map((w) =>
      el("li", {
        className: w.open ? "window open" : "window shut",
        textContent: w.open
          ? `${shown(w.destination)}: window ${shown(w.window)} open`
          : `${shown(w.destination)}: window ${shown(w.window)} shut; ${w.waiting} waiting` +
            (w.opens ? `, opens ${when(w.opens)}` : ""),
      }),
    ),
  );
  list.hidden = windows.length === 0;
}

// cells whose text may be long (a URL, a name, an error): cut with an ellipsis inside a box of
// bounded width, the whole text as the tooltip (a table cell's own max-width is ignored)
const CUT = ["file", "dest", "reason", "clip"];

function cut(text, className = "") {
  const whole = shown(text);
  if (!PATHS.some((c) => className.split(" ").includes(c))) {
    return el("div", { className: "cut", textContent: whole, title: whole });
  }
  // a path or URL keeps its end (what tells two destinations apart, the file's folder): its
  // middle goes first, then the box cuts at the start what is still too wide
  const inner = el("bdi", { dir: "ltr", textContent: middle(whole, PATH_CHARS) });
  return el("div", { className: "cut tail", title: whole }, inner);
}

const PATHS = ["dest", "path"];
const PATH_CHARS = 34;

function middle(text, max) {
  if (text.length <= max) return text;
  const head = Math.min(14, max - 12);
  return text.slice(0, head) + "…" + text.slice(text.length - (max - head - 1));
}

function cell(text, className = "") {
  const td = el("td", { className });
  if (CUT.some((c) => className.split(" ").includes(c))) td.append(cut(text, className));
  else td.textContent = shown(text);
  return td;
}

function cause(reason, destination) {
  // a processor's reason starts with its destination, which the row shows beside it already
  const prefix = `${destination}: `;
  return reason && reason.startsWith(prefix) ? reason.slice(prefix.length) : reason || "";
}

function renderService(s) {
  const sources = (s.sources || []).map((src) => {
    const stopped = (s.stopped_sources || []).includes(src.name);
    const how = `${src.polling ? "polling" : "inotify"}, ${src.ready ? "ready" : "scanning"}${stopped ? ", stopped" : ""}`;
    const tr = el("tr", {}, cell(src.name), cell(src.path, "path clip"), cell(how), cell(src.last_error || "", "reason clip"));
    tr.dataset.source = src.name;
    if (src.last_error || stopped) tr.className = "has-error";
    return tr;
  });
  $("#sources tbody").replaceChildren(...sources);
  const dests = Object.entries(s.destinations || {}).map(([name, d]) => {
    const tr = el("tr", {}, cell(name, "dest clip"), cell(d.succeeded, "num"), cell(d.failed, "num"),
      cell(d.retried, "num"), cell(cause(d.last_error, name), "reason clip"));
    tr.dataset.destination = name;
    if (d.last_error) tr.className = "has-error";
    return tr;
  });
  if (!dests.length) dests.push(el("tr", {}, el("td", { colSpan: 5, className: "empty", textContent: "Nothing sent yet in this run." })));
  $("#destinations tbody").replaceChildren(...dests);
}

// ---------------------------------------------------------------- history table

function filterParams() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#filters"))) {
    if (String(v).trim() !== "") params.set(k, String(v).trim());
  }
  return params;
}

async function refreshLogs() {
  const params = filterParams();
  params.set("limit", "50");
  if (state.cursor) params.set("cursor", state.cursor);
  const page = await api("/api/v1/logs?" + params);
  state.next = page.next ? new URL(page.next, location.href).searchParams.get("cursor") : null;
  $("#count").textContent = `${page.count} matching`;
  $("#next").disabled = !state.next;
  $("#prev").disabled = state.cursors.length === 0;
  $("#page-info").textContent = `page ${state.cursors.length + 1}`;
  const body = $("#logs tbody");
  const rows = page.results.map(renderRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 12, className: "empty", textContent: "No dispatches match." })));
  body.replaceChildren(...rows);
}

const MARKED = "recorded by mark-existing as already there: never sent";

function renderRow(e) {
  const tr = el("tr", { className: "row" });
  tr.dataset.id = e.id;
  tr.dataset.status = e.status;
  if (e.marked) tr.dataset.marked = "true";
  const cells = [
    [String(e.id), "num"], [when(e.created), ""], [e.filename, "file"], [e.source, ""],
    [e.destination, "dest"], [e.label ? `${e.rule} (${e.label})` : e.rule, ""], [null, "status"], [e.size, "num"],
    [duration(e.duration_ms), "num"], [String(e.attempts), "num"], [cause(e.reason, e.destination), "reason"],
  ];
  for (const [text, cls] of cells) {
    const td = el("td", { className: cls });
    if (cls === "status" && e.marked) {
      td.append(el("span", { className: "badge MARKED", textContent: "MARKED", title: MARKED }));
    } else if (cls === "status") td.append(el("span", { className: `badge ${e.status}`, textContent: e.status }));
    else if (CUT.includes(cls)) td.append(cut(text, cls));
    else td.textContent = shown(text);
    tr.append(td);
  }
  const action = el("td", { className: "action" });
  if (e.status === "FAILED") {
    const btn = el("button", { className: "retry", textContent: "Retry", type: "button" });
    btn.addEventListener("click", (ev) => { ev.stopPropagation(); retry(e.id); });
    action.append(btn);
  }
  tr.append(action);
  tr.addEventListener("click", () => openDetail(e.id));
  return tr;
}

async function retry(id) {
  let failure = null;
  try {
    await api(`/api/v1/logs/${id}/retry`, { method: "POST" });
  } catch (err) { failure = err; }
  await refreshAll();
  if (failure) showError(failure);
}

async function forget(id) {
  if (!confirm(`Forget dispatch ${id}? The file is sent again at the next rescan, within the source's rescan seconds (default 60), or at the next start.`)) return;
  let failure = null;
  try {
    await api(`/api/v1/logs/${id}`, { method: "DELETE" });
    $("#detail").close();
  } catch (err) { failure = err; }
  await refreshAll();
  if (failure) showError(failure);
}

async function openDetail(id) {
  try {
    const d = await api(`/api/v1/logs/${id}`);
    state.detailId = id;
    $("#detail-id").textContent = `#${d.id}`;
    const fields = ["status", "filename", "relpath", "source", "rule", "label", "step", "destination", "protocol",
      "location", "size", "byte_size", "mtime", "btime", "attempts", "created", "started", "finished",
      "duration_ms", "next_attempt", "reason", "error_type", "detail", "extension", "node"];
    const dl = $("#detail-fields");
    dl.replaceChildren();
    if (d.marked) dl.append(el("dt", { textContent: "marked" }), el("dd", { textContent: MARKED }));
    for (const f of fields) {
      let v = d[f];
      if (v === null || v === undefined || v === "") continue;
      if (["created", "started", "finished", "next_attempt", "mtime", "btime"].includes(f)) v = `${when(v)} (${v})`;
      dl.append(el("dt", { textContent: f }), el("dd", { textContent: shown(v) }));
    }
    $("#detail-retry").hidden = d.status !== "FAILED";
    $("#detail").showModal();
  } catch (err) { showError(err); }
}

// ---------------------------------------------------------------- charts

function periodStarts(period, since, until) {
  // every period start (YYYY-MM-DD, UTC) from since to until, so quiet periods show as gaps
  const out = [];
  const d = new Date(since + "T00:00:00Z");
  if (period === "week") d.setUTCDate(d.getUTCDate() - ((d.getUTCDay() + 6) % 7));
  if (period === "month") d.setUTCDate(1);
  const end = new Date(until + "T00:00:00Z");
  while (d <= end && out.length < 400) {
    out.push(d.toISOString().slice(0, 10));
    if (period === "day") d.setUTCDate(d.getUTCDate() + 1);
    else if (period === "week") d.setUTCDate(d.getUTCDate() + 7);
    else d.setUTCMonth(d.getUTCMonth() + 1);
  }
  return out;
}

function label(start, period) {
  const d = new Date(start + "T00:00:00Z");
  if (period === "month") return d.toLocaleDateString(undefined, { month: "short", year: "2-digit", timeZone: "UTC" });
  return d.toLocaleDateString(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
}

async function refreshCharts() {
  state.chartsAt = Date.now();
  const stats = await api(`/api/v1/stats?period=${state.period}`);
  const metric = $("#chart-metric").value;
  const today = new Date().toISOString().slice(0, 10);
  const first = stats.since ? stats.since.slice(0, 10) : (stats.results[0] || { start: today }).start;
  const starts = periodStarts(state.period, first, today);
  const byStart = Object.fromEntries(stats.results.map((b) => [b.start, b]));
  const labels = starts.map((s) => label(s, state.period));
  const pick = (b, key, name) => (b && b[key][name] ? b[key][name][metric] : 0);

  const statuses = ["SUCCEEDED", "FAILED", "IN_PROGRESS", "PENDING"];
  const statusSeries = statuses.map((name) => ({
    name, color: STATUS_COLORS[name], values: starts.map((s) => pick(byStart[s], "by_status", name)),
  }));
  const dests = Object.entries(stats.totals.by_destination)
    .sort((a, b) => b[1][metric] - a[1][metric]).map(([name]) => name);
  const top = dests.slice(0, 6);
  const destSeries = top.map((name, i) => ({
    name, color: SERIES_COLORS[i], values: starts.map((s) => pick(byStart[s], "by_destination", name)),
  }));
  if (dests.length > top.length) {
    const rest = dests.slice(top.length);
    destSeries.push({
      name: "other", color: SERIES_COLORS[6],
      values: starts.map((s) => rest.reduce((n, d) => n + pick(byStart[s], "by_destination", d), 0)),
    });
  }
  const fmt = metric === "bytes" ? bytes : (n) => (Number.isInteger(n) ? String(n) : n.toFixed(1));
  drawStacked($("#chart-status"), labels, statusSeries, fmt);
  drawStacked($("#chart-destination"), labels, destSeries, fmt);
}

function niceStep(v) {
  // a round step (1, 2 or 5 times a power of ten) of at least v
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawStacked(canvas, labels, series, fmt) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  const pad = { left: 56, right: 10, top: 0, bottom: 30 };
  // legend first: it wraps, and the plot starts below it
  const legend = [];
  let lx = pad.left, ly = 13;
  for (const s of series) {
    const name = s.name.length > 48 ? "…" + s.name.slice(-47) : s.name;
    const width = ctx.measureText(name).width + 28;
    if (lx + width > w && lx > pad.left) { lx = pad.left; ly += 16; }
    legend.push({ x: lx, y: ly, name, color: s.color });
    lx += width;
  }
  pad.top = ly + 14;
  const pw = w - pad.left - pad.right, ph = h - pad.top - pad.bottom;
  const totals = labels.map((_, i) => series.reduce((n, s) => n + s.values[i], 0));
  const step = niceStep(Math.max(0, ...totals) / 4);
  const max = step * 4;

  // grid and y axis
  ctx.strokeStyle = "#e2e5eb"; ctx.fillStyle = "#6b7385"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + ph - (ph * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + pw, y); ctx.stroke();
    ctx.fillText(fmt((max * i) / 4), pad.left - 6, y);
  }
  // bars
  const slot = pw / Math.max(1, labels.length);
  const bw = Math.max(1, Math.min(28, slot * 0.7));
  let bars = 0;
  labels.forEach((_, i) => {
    let y = pad.top + ph;
    for (const s of series) {
      const v = s.values[i];
      if (!v) continue;
      const bh = (v / max) * ph;
      ctx.fillStyle = s.color;
      ctx.fillRect(pad.left + i * slot + (slot - bw) / 2, y - bh, bw, bh);
      y -= bh;
      bars++;
    }
  });
  // x labels, thinned to fit
  ctx.fillStyle = "#6b7385"; ctx.textAlign = "center"; ctx.textBaseline = "top";
  const every = Math.max(1, Math.ceil(labels.length / Math.max(1, Math.floor(pw / 60))));
  labels.forEach((text, i) => {
    // counted from the newest period, so the latest one is always labelled
    if ((labels.length - 1 - i) % every === 0) ctx.fillText(text, pad.left + i * slot + slot / 2, pad.top + ph + 6);
  });
  ctx.textAlign = "left"; ctx.textBaseline = "middle";
  for (const item of legend) {
    ctx.fillStyle = item.color; ctx.fillRect(item.x, item.y - 5, 10, 10);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(item.name, item.x + 14, item.y);
  }
  if (!bars) {
    ctx.fillStyle = "#6b7385"; ctx.textAlign = "center";
    ctx.fillText("no dispatches in this period", pad.left + pw / 2, pad.top + ph / 2);
  }
  canvas.dataset.bars = String(bars);
}

// ---------------------------------------------------------------- wiring

async function refreshAll(charts = true) {
  try {
    const work = [refreshStatus(), refreshLogs()];
    const due = charts || Date.now() - state.chartsAt >= CHART_REFRESH_MS;
    if (due) work.push(refreshCharts());
    const [counts] = await Promise.all(work);
    // something was sent or failed since: the charts follow now, not at their next turn
    if (!due && state.counts !== undefined && counts !== state.counts) await refreshCharts();
    state.counts = counts;
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    showError(null);
  } catch (err) { showError(err); }
}

function restartFromFirstPage() {
  state.cursors = [];
  state.cursor = null;
  refreshLogs().catch(showError);
}

function schedule() {
  clearInterval(state.timer);
  if ($("#auto-refresh").checked) {
    state.timer = setInterval(() => { if (!$("#detail").open) refreshAll(false); }, REFRESH_MS);
  }
}

function init() {
  const filters = $("#filters");
  filters.addEventListener("change", restartFromFirstPage);
  filters.addEventListener("input", (ev) => { if (ev.target.tagName === "INPUT") restartFromFirstPage(); });
  filters.addEventListener("reset", () => setTimeout(restartFromFirstPage, 0));
  filters.addEventListener("submit", (ev) => { ev.preventDefault(); restartFromFirstPage(); });
  $("#next").addEventListener("click", () => {
    state.cursors.push(state.cursor);
    state.cursor = state.next;
    refreshLogs().catch(showError);
  });
  $("#prev").addEventListener("click", () => {
    state.cursor = state.cursors.pop() || null;
    refreshLogs().catch(showError);
  });
  for (const btn of document.querySelectorAll("#period-tabs button")) {
    btn.addEventListener("click", () => {
      document.querySelectorAll("#period-tabs button").forEach((b) => b.classList.toggle("active", b === btn));
      state.period = btn.dataset.period;
      refreshCharts().catch(showError);
    });
  }
  $("#chart-metric").addEventListener("change", () => refreshCharts().catch(showError));
  $("#auto-refresh").addEventListener("change", schedule);
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("#token").value);
    $("#token").value = "";
    $("#token-form").hidden = true;
    refreshAll();
  });
  $("#detail-retry").addEventListener("click", () => { $("#detail").close(); retry(state.detailId); });
  $("#detail-forget").addEventListener("click", () => forget(state.detailId));
  window.addEventListener("resize", () => refreshCharts().catch(showError));
  refreshAll();
  schedule();
}

init();
