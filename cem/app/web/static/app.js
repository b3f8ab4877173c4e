// The S2 CEM dashboard: live state over server-sent events, charts drawn as plain SVG.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const SERIES_COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4",
  "#84cc16", "#ec4899", "#64748b", "#a16207", "#0ea5e9", "#d946ef"];
const KIND_COLORS = { "ev": "#2563eb", "EVs": "#2563eb", "battery": "#10b981", "heat_pump": "#f59e0b",
  "heat pump": "#f59e0b", "pv": "#facc15", "PV": "#facc15", "base load": "#94a3b8", "load": "#94a3b8" };
const state = { snap: null, history: [], plan: null, zone: "UTC" };
const $ = (sel) => document.querySelector(sel);

// --- formatting -------------------------------------------------------------------------------
function hhmm(iso) {
  if (!iso) return "–";
  const d = typeof iso === "number" ? new Date(iso * 1000) : new Date(iso);
  return d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", timeZone: state.zone });
}
function dayTime(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString("en-GB", { weekday: "short", hour: "2-digit", minute: "2-digit", timeZone: state.zone });
}
const kw = (w) => (w === null || w === undefined) ? "–" : (w / 1000).toFixed(1) + " kW";
function ago(iso) {
  if (!iso || !state.snap) return "–";
  const s = (new Date(state.snap.now) - new Date(iso)) / 1000;
  if (s < 90) return Math.max(0, Math.round(s)) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svgEl(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

// --- a small SVG chart kit ----------------------------------------------------------------------
function frame(svg, x0, x1, y0, y1) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 800, H = svg.clientHeight || 200;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  if (y1 <= y0) y1 = y0 + 1;
  if (x1 <= x0) x1 = x0 + 1;
  const sx = (x) => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
  const sy = (y) => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
  const ticks = niceTicks(y0, y1, 4);
  for (const v of ticks) {
    svg.appendChild(svgEl("line", { x1: pad.l, x2: W - pad.r, y1: sy(v), y2: sy(v), class: "grid" }));
    const t = svgEl("text", { x: pad.l - 4, y: sy(v) + 4, "text-anchor": "end" });
    t.textContent = Math.abs(v) >= 100 ? v.toFixed(0) : +v.toFixed(1);
    svg.appendChild(t);
  }
  return { svg, sx, sy, W, H, pad };
}
function niceTicks(lo, hi, n) {
  const span = hi - lo, raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v);
  return out;
}
function line(f, pts, attrs) {
  const good = pts.filter((p) => p[1] !== null && p[1] !== undefined && isFinite(p[1]));
  if (!good.length) return null;
  const d = good.map((p, i) => (i ? "L" : "M") + f.sx(p[0]).toFixed(1) + "," + f.sy(p[1]).toFixed(1)).join("");
  const path = svgEl("path", Object.assign({ d, fill: "none" }, attrs));
  f.svg.appendChild(path);
  return path;
}
function stepLine(f, xs, ys, width, attrs) {
  const pts = [];
  xs.forEach((x, i) => { pts.push([x, ys[i]]); pts.push([x + width, ys[i]]); });
  return line(f, pts, attrs);
}
function timeAxis(f, x0, x1) {
  const hours = (x1 - x0) / 3600, every = hours > 12 ? 3 : hours > 4 ? 1 : 0.5;
  const step = every * 3600;
  for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) {
    const t = svgEl("text", { x: f.sx(x), y: f.H - 4, "text-anchor": "middle" });
    t.textContent = hhmm(x);
    f.svg.appendChild(t);
  }
}

// --- charts -------------------------------------------------------------------------------------
function drawHistory() {
  const snap = state.snap, hist = state.history;
  const svg = $("#history-chart"), psvg = $("#phase-chart");
  if (!snap) return;
  const now = new Date(snap.now).getTime() / 1000;
  const x0 = hist.length ? Math.min(hist[0][0], now - 3600) : now - 3600;
  const ptus = snap.ptu_averages || [];
  const limit = snap.site.import_limit_kw, gtv = snap.site.gtv_kw;
  let ymax = Math.max(gtv, limit, 1);
  for (const h of hist) ymax = Math.max(ymax, h[1] / 1000);
  let ymin = 0;
  for (const h of hist) ymin = Math.min(ymin, h[1] / 1000);
  const f = frame(svg, x0, now, ymin, ymax * 1.08);
  const width = (snap.ptu_minutes || 15) * 60;
  for (const p of ptus) {
    const xs = new Date(p.start).getTime() / 1000;
    if (xs + 900 < x0) continue;
    const x = f.sx(Math.max(xs, x0)), x2 = f.sx(Math.min(xs + 900, now));
    svg.appendChild(svgEl("rect", { x, y: f.sy(Math.max(p.avg_kw, 0)), width: Math.max(1, x2 - x),
      height: Math.abs(f.sy(0) - f.sy(Math.max(p.avg_kw, 0))), fill: "var(--ptu)", opacity: p.settled ? 0.55 : 0.3,
      class: "ptu" }));
    line(f, [[Math.max(xs, x0), p.limit_kw], [Math.min(xs + 900, now), p.limit_kw]],
      { stroke: "var(--limit)", "stroke-width": 2, class: "limit" });
  }
  if (!ptus.length) line(f, [[x0, limit], [now, limit]], { stroke: "var(--limit)", "stroke-width": 2, class: "limit" });
  line(f, hist.map((h) => [h[0] + 30, h[1] / 1000]), { stroke: "var(--import)", "stroke-width": 2, class: "import" });
  timeAxis(f, x0, now);
  // phases
  const fuse = snap.site.fuse_a, v = snap.site.voltage_v;
  let amax = fuse;
  for (const h of hist) amax = Math.max(amax, h[2] / v, h[3] / v, h[4] / v);
  const g = frame(psvg, x0, now, 0, amax * 1.08);
  line(g, [[x0, fuse], [now, fuse]], { stroke: "var(--limit)", "stroke-width": 2, "stroke-dasharray": "6 4", class: "fuse" });
  ["l1", "l2", "l3"].forEach((name, i) =>
    line(g, hist.map((h) => [h[0] + 30, h[2 + i] / v]), { stroke: `var(--${name})`, "stroke-width": 1.5, class: "phase " + name }));
  timeAxis(g, x0, now);
}

function drawPlan() {
  const plan = state.plan;
  const svg = $("#plan-chart"), psvg = $("#price-chart"), legend = $("#plan-legend");
  if (!plan) return;
  const start = new Date(plan.start).getTime() / 1000, step = plan.ptu_minutes * 60, n = plan.n;
  const pos = new Array(n).fill(0), neg = new Array(n).fill(0);
  for (const s of plan.series) s.w.forEach((w, t) => { if (w > 0) pos[t] += w; else neg[t] += w; });
  let ymax = Math.max(...pos, ...plan.import_limit_w, 1) / 1000, ymin = Math.min(...neg, 0) / 1000;
  const f = frame(svg, start, start + n * step, ymin * 1.05, ymax * 1.08);
  const up = new Array(n).fill(0), down = new Array(n).fill(0);
  legend.textContent = "";
  plan.series.forEach((s, i) => {
    const color = (plan.series.length > 12 ? KIND_COLORS[s.kind] : null) || SERIES_COLORS[i % SERIES_COLORS.length];
    const item = el("span"); item.appendChild(el("span", { class: "k", style: `background:${color};height:10px` }));
    item.appendChild(document.createTextNode(s.name)); legend.appendChild(item);
    s.w.forEach((w, t) => {
      if (!w) return;
      const x = f.sx(start + t * step), x2 = f.sx(start + (t + 1) * step);
      const base = w > 0 ? up[t] : down[t], top = base + w;
      if (w > 0) up[t] = top; else down[t] = top;
      svg.appendChild(svgEl("rect", { x, width: Math.max(0.5, x2 - x - 0.5), y: f.sy(Math.max(base, top) / 1000),
        height: Math.abs(f.sy(base / 1000) - f.sy(top / 1000)), fill: color, class: "bar", "data-series": s.name }));
    });
  });
  const xs = plan.import_limit_w.map((_, t) => start + t * step);
  stepLine(f, xs, plan.import_limit_w.map((w) => w / 1000), step, { stroke: "var(--limit)", "stroke-width": 2, class: "limit" });
  stepLine(f, xs, plan.planned_import_limit_w.map((w) => w / 1000), step,
    { stroke: "var(--limit)", "stroke-width": 1, "stroke-dasharray": "4 3", class: "planned-limit" });
  stepLine(f, xs, plan.grid_w.map((w) => w / 1000), step, { stroke: "#111827", "stroke-width": 1.5, class: "grid-import" });
  if (state.snap) {
    const now = new Date(state.snap.now).getTime() / 1000;
    line(f, [[now, ymin], [now, ymax * 1.05]], { stroke: "#111827", "stroke-dasharray": "2 3", class: "now" });
  }
  timeAxis(f, start, start + n * step);
  const lim = el("span"); lim.appendChild(el("span", { class: "k limit" })); lim.appendChild(document.createTextNode("import limit (dashed: what plans use)"));
  legend.appendChild(lim);
  const prices = plan.import_eur_per_kwh.map((p) => p * 100);
  const g = frame(psvg, start, start + n * step, Math.min(0, ...prices), Math.max(...prices, 1) * 1.1);
  prices.forEach((p, t) => {
    const x = g.sx(start + t * step), x2 = g.sx(start + (t + 1) * step);
    psvg.appendChild(svgEl("rect", { x, width: Math.max(0.5, x2 - x - 0.5), y: g.sy(Math.max(p, 0)),
      height: Math.abs(g.sy(0) - g.sy(p)), fill: "var(--price)", opacity: 0.7, class: "price" }));
  });
  timeAxis(g, start, start + n * step);
  $("#plan-meta").textContent = `plan ${plan.plan_id ?? ""} · ${plan.status.toLowerCase()}`;
}

// --- tables -------------------------------------------------------------------------------------
function renderNow() {
  const s = state.snap;
  state.zone = s.site.timezone;
  $("#site-name").textContent = s.site.name;
  $("#clock").textContent = dayTime(s.now);
  const h = $("#health");
  h.textContent = s.health.ok ? "running" : "attention: " + s.health.reason;
  h.title = s.health.reason;
  h.className = "badge " + (s.health.ok ? "ok" : "bad");
  const p = s.plan;
  $("#plan-status").textContent = p ? `plan ${p.plan_id ?? ""} ${p.status.toLowerCase()}, ${p.replans} replans, made ${ago(p.made_at)}` : "no plan yet";
  if (s.power) {
    $("#import-now").textContent = kw(s.power.import_w);
    $("#ptu-avg").textContent = s.power.ptu_avg_kw === null ? "–" : s.power.ptu_avg_kw.toFixed(1) + " kW";
    $("#ptu-limit").textContent = s.power.ptu_limit_kw === null ? "" : `limit ${s.power.ptu_limit_kw} kW`;
    const bars = $("#phase-bars"); bars.textContent = "";
    s.power.phase_a.forEach((a, i) => {
      const pct = Math.min(100, Math.max(0, a / s.site.fuse_a * 100));
      const row = el("div", { class: "sub" }, `L${i + 1} ${a.toFixed(1)} A of ${s.site.fuse_a} A`);
      const bar = el("div", { style: `height:6px;background:var(--line);border-radius:3px` });
      bar.appendChild(el("div", { style: `height:6px;width:${pct}%;border-radius:3px;background:${pct > 95 ? "var(--bad)" : "var(--l" + (i + 1) + ")"}` }));
      bars.appendChild(row); bars.appendChild(bar);
    });
  }
  $("#import-limit").textContent = `limit now ${s.site.import_limit_kw} kW (GTV ${s.site.gtv_kw} kW)`;
  if (s.prices) {
    $("#price-now").textContent = (s.prices.import_eur_per_kwh * 100).toFixed(1) + " ct/kWh";
    $("#price-export").textContent = `feed-in ${(s.prices.export_eur_per_kwh * 100).toFixed(1)} ct/kWh`;
  }
}

function fillRows(tbody, rows, key, build) {
  const existing = new Map([...tbody.children].map((tr) => [tr.dataset.rm, tr]));
  const keep = new Set();
  rows.forEach((row, i) => {
    const id = row[key];
    keep.add(id);
    let tr = existing.get(id);
    if (!tr) { tr = el("tr", { "data-rm": id }); }
    build(tr, row);
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  for (const [id, tr] of existing) if (!keep.has(id)) tr.remove();
}
function cells(tr, values) {
  while (tr.children.length < values.length) tr.appendChild(el("td"));
  values.forEach((v, i) => {
    const td = tr.children[i];
    const [text, cls] = Array.isArray(v) ? v : [v, ""];
    if (td.textContent !== String(text)) td.textContent = text;
    if (cls !== undefined && td.className !== cls) td.className = cls;
  });
}

function renderEvs() {
  const evs = state.snap.evs;
  $("#ev-count").textContent = `(${evs.length})`;
  fillRows($("#evs tbody"), evs, "rm_id", (tr, e) => {
    const unit = /soc|%/i.test(e.level_unit) ? " (SoC-based)" : "";
    cells(tr, [
      e.evse, e.driver || "–",
      [`${e.charged_kwh.toFixed(1)} kWh${unit}`, "num"],
      [e.target_kwh === null ? "–" : `${e.target_kwh.toFixed(1)} kWh`, "num"],
      e.departure ? `${dayTime(e.departure)} (${e.departure_source})` : `– (${e.departure_source})`,
      [e.planned_kwh === null ? "–" : `${e.planned_kwh.toFixed(1)} kWh`, "num"],
      [e.power_w === null ? "–" : `${kw(e.power_w)} · ${e.current_a} A`, "num"],
      [e.why, "why code-" + e.code],
      [e.next, "next"],
    ]);
    if (tr.children.length < 10) tr.appendChild(modeCell(e));
    const sel = tr.children[9].querySelector("select");
    if (document.activeElement !== sel) sel.value = e.mode;
  });
}
function modeCell(e) {
  const td = el("td");
  const sel = el("select", { class: "mode", "aria-label": "mode of " + e.evse });
  for (const [v, t] of [["smart", "smart"], ["charge_now", "charge now"], ["paused", "paused"]]) sel.appendChild(el("option", { value: v }, t));
  const min = el("input", { class: "min", type: "number", min: "0", step: "0.5", placeholder: "min kWh", "aria-label": "minimum kWh first" });
  const go = el("button", { type: "button" }, "set");
  go.addEventListener("click", async () => {
    const body = { mode: sel.value };
    if (min.value) body.min_kwh = parseFloat(min.value);
    await post(`/api/evs/${encodeURIComponent(e.rm_id)}/mode`, body);
  });
  td.appendChild(sel); td.appendChild(min); td.appendChild(go);
  return td;
}

function renderRms() {
  const rms = state.snap.rms;
  $("#rm-count").textContent = `(${rms.filter((r) => r.connected).length} connected of ${rms.length})`;
  fillRows($("#rms tbody"), rms, "rm_id", (tr, r) => {
    tr.className = r.connected ? "" : "off";
    cells(tr, [r.name, r.kind, r.control_type || "–",
      [r.connected ? "connected" : "disconnected", r.connected ? "state-on" : "state-off"],
      r.last_message_at ? `${r.last_message || ""} ${ago(r.last_message_at)}` : "–",
      [r.measured_w === null ? "–" : kw(r.measured_w), "num"],
      [r.planned_w === null ? "–" : kw(r.planned_w), "num"],
      r.instruction || "–"]);
  });
}

function renderCongestion() {
  const tbody = $("#congestion tbody");
  tbody.textContent = "";
  for (const w of state.snap.congestion) {
    const tr = el("tr", { class: w.active ? "active" : "" });
    tr.appendChild(el("td", {}, dayTime(w.start)));
    tr.appendChild(el("td", {}, dayTime(w.end)));
    tr.appendChild(el("td", { class: "num" }, w.import_limit_kw === null ? "–" : `${w.import_limit_kw} kW`));
    tr.appendChild(el("td", {}, w.source + (w.active ? " (in force)" : "")));
    tbody.appendChild(tr);
  }
}

function renderDecisions() {
  const ol = $("#decisions");
  ol.textContent = "";
  for (const d of state.snap.decisions) {
    const li = el("li", { class: d.kind });
    li.appendChild(el("span", { class: "muted" }, hhmm(d.at) + " "));
    li.appendChild(el("span", { class: "kind" }, d.kind + ": "));
    li.appendChild(document.createTextNode(d.text + (d.detail ? ` — ${d.detail}` : "")));
    ol.appendChild(li);
  }
}

function render() {
  if (!state.snap) return;
  renderNow(); drawHistory(); renderEvs(); renderRms(); renderCongestion(); renderDecisions();
}

// --- writes -------------------------------------------------------------------------------------
async function post(url, body) {
  const token = $("#token").value || localStorage.getItem("cem-token") || "";
  if ($("#token").value) localStorage.setItem("cem-token", $("#token").value);
  const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json",
    ...(token ? { Authorization: "Bearer " + token } : {}) }, body: JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  $("#message").textContent = res.ok ? "done: applied on the next replan" : `refused (${res.status}): ${data.error || ""}`;
  if (!res.ok) document.querySelector("details").open = true;
  return res.ok;
}
$("#congestion-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const toIso = (v) => new Date(v).toISOString();
  await post("/api/congestion", { action: "add", start: toIso(form.get("start")), end: toIso(form.get("end")),
    import_limit_kw: parseFloat(form.get("import_limit_kw")) });
});
$("#token").value = localStorage.getItem("cem-token") || "";

// --- live data ----------------------------------------------------------------------------------
function onState(snap) {
  state.snap = snap;
  if (snap.point) {
    const last = state.history[state.history.length - 1];
    if (last && last[0] === snap.point[0]) state.history[state.history.length - 1] = snap.point;
    else state.history.push(snap.point);
    const keep = new Date(snap.now).getTime() / 1000 - 48 * 3600;
    while (state.history.length && state.history[0][0] < keep) state.history.shift();
  }
  render();
  if (state.plan) {
    const now = new Date(snap.now).getTime() / 1000;
    const start = new Date(state.plan.start).getTime() / 1000;
    if (now - start > 900) drawPlan();
  }
}
async function load() {
  try {
    const res = await fetch("/api/state");
    const snap = await res.json();
    state.history = snap.history || [];
    state.zone = snap.site.timezone;
    onState(snap);
    const plan = await fetch("/api/plan");
    if (plan.ok) { state.plan = await plan.json(); drawPlan(); }
  } catch (err) { $("#health").textContent = "cannot reach the CEM"; }
  const source = new EventSource("/api/events");
  source.addEventListener("state", (ev) => onState(JSON.parse(ev.data)));
  source.addEventListener("plan", (ev) => { state.plan = JSON.parse(ev.data); drawPlan(); });
  source.onerror = () => { const h = $("#health"); h.textContent = "reconnecting…"; h.className = "badge bad"; };
}
window.addEventListener("resize", () => { drawHistory(); drawPlan(); });
load();
