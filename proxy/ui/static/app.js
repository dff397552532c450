// The status page: reads /api/stats every few seconds and draws it; Suspend and Resume call the
// local API. Every value from the daemon goes into the page as text (textContent, SVG
// attributes), never as HTML. Charts are plain SVG, drawn here.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e8833a", "#3aa35b", "#c8372d", "#8a5cd1", "#1aa3a3", "#c79a1d", "#8a8f99"];
const state = { range: "day", stack: "by_model", data: null, busy: false, again: false };

function $(id) { return document.getElementById(id); }

function usd(value) {
  const v = Number(value) || 0;
  return "$" + (Math.abs(v) >= 100 ? v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }) : v.toFixed(6));
}

function count(value) { return (Number(value) || 0).toLocaleString("en-US"); }

function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, rows, columns, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, empty, "muted");
    td.colSpan = columns.length;
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const [get, cls] of columns) cell(tr, get(row), cls);
    body.appendChild(tr);
  }
}

function label(epoch, range) {
  const d = new Date(epoch * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  if (range === "week") return pad(d.getMonth() + 1) + "-" + pad(d.getDate());
  return pad(d.getHours()) + ":" + pad(d.getMinutes());
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= value) return m * p;
  return 10 * p;
}

// A stacked bar chart: one bar per bucket, one layer per series ({name, values}).
function bars(container, buckets, series, format) {
  container.replaceChildren();
  const width = Math.max(container.clientWidth || 800, 300);
  const height = Math.max(container.clientHeight || 200, 80);
  const left = 78, right = 8, top = 8, bottom = 22;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" }, container);
  const totals = buckets.map((_, i) => series.reduce((s, x) => s + (x.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const plotH = height - top - bottom;
  const plotW = width - left - right;
  const step = plotW / Math.max(buckets.length, 1);
  for (let g = 0; g <= 2; g++) {
    const v = (max * g) / 2;
    const y = top + plotH - (v / max) * plotH;
    svg("line", { x1: left, x2: width - right, y1: y, y2: y, stroke: "#dde1e8" }, root);
    svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7385" }, root).textContent = format(v);
  }
  const every = Math.ceil(buckets.length / 8);
  buckets.forEach((b, i) => {
    const x = left + i * step;
    let base = top + plotH;
    series.forEach((s, k) => {
      const v = s.values[i] || 0;
      if (v <= 0) return;
      const h = (v / max) * plotH;
      base -= h;
      const rect = svg("rect", { x: x + step * 0.1, y: base, width: Math.max(step * 0.8, 1), height: Math.max(h, 0.5), fill: COLORS[k % COLORS.length] }, root);
      svg("title", {}, rect).textContent = `${s.name}: ${format(v)} (${label(b, state.range)})`;
    });
    if (i % every === 0) {
      svg("text", { x: x + step / 2, y: height - 6, "text-anchor": "middle", "font-size": 11, fill: "#6b7385" }, root).textContent = label(b, state.range);
    }
  });
}

function legend(container, series) {
  container.replaceChildren();
  series.forEach((s, k) => {
    const item = document.createElement("span");
    const swatch = svg("svg", { width: 10, height: 10, class: "swatch" }, item);
    svg("rect", { width: 10, height: 10, fill: COLORS[k % COLORS.length] }, swatch);
    item.appendChild(document.createTextNode(s.name));
    container.appendChild(item);
  });
}

function render(data) {
  const t = data.totals;
  $("org").textContent = "· org " + data.org_id;
  $("total-cost").textContent = usd(t.cost_usd);
  $("total-requests").textContent = count(t.requests);
  $("total-refused").textContent = count(t.refused);
  $("total-errors").textContent = count(t.errors);
  $("total-unknown").textContent = count(t.unknown_cost);

  const g = data.guardrail;
  const stateNode = $("guard-state");
  stateNode.textContent = g.state === "suspended" ? "SUSPENDED" : "ok";
  stateNode.className = "state-" + g.state;
  let detail = "";
  if (g.state === "suspended") {
    detail = "by " + g.layer + (g.reason ? ": " + g.reason : "") + (g.expires_at ? " (until " + g.expires_at + ")" : " (until the AtlasBurn API resumes it)");
  }
  $("guard-detail").textContent = detail;

  const series = data.series[state.stack].map((s) => ({ name: s.name, values: s.cost_usd }));
  bars($("spend-chart"), data.buckets, series, usd);
  legend($("spend-legend"), series);
  bars($("requests-chart"), data.buckets, [{ name: "requests", values: data.series.requests }], count);

  const rowColumns = [[(r) => r.name], [(r) => count(r.requests)], [(r) => count(r.refused)], [(r) => count(r.unknown_cost)], [(r) => usd(r.cost_usd)]];
  fill("by-model", data.by_model, rowColumns, "no requests in this range");
  fill("by-app", data.by_app, rowColumns, "no requests in this range");
  fill("refusals", data.refusals, [[(r) => r.layer], [(r) => count(r.requests)]], "nothing refused in this range");
  fill("budgets", data.budgets, [[(r) => r.name], [(r) => r.scope], [(r) => r.window], [(r) => usd(r.spent_usd)], [(r) => usd(r.limit_usd)], [(r) => usd(r.left_usd)], [(r) => (r.over ? "over" : "ok")]], "no budgets configured");
  fill("fingerprints", data.fingerprints, [
    [(r) => r.fingerprint, "fp"], [(r) => r.provider], [(r) => r.model], [(r) => r.app],
    [(r) => count(r.requests)], [(r) => count(r.refused)], [(r) => usd(r.cost_usd)], [(r) => r.last_ts],
  ], "no repeated requests in this range");
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " · last " + state.range;
  $("updated").className = "muted";
}

async function refresh() {
  if (state.busy) {
    state.again = true; // (e.g. the range changed while a fetch was under way)
    return;
  }
  state.busy = true;
  state.again = false;
  try {
    const answer = await fetch("/api/stats?range=" + state.range, { credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401) {
      $("updated").textContent = "logged out: run `atlasburn-proxy ui` for a new login link";
      $("updated").className = "error";
      return;
    }
    if (!answer.ok) throw new Error("the daemon answered " + answer.status);
    state.data = await answer.json();
    render(state.data);
  } catch (err) {
    $("updated").textContent = "cannot read the daemon: " + err.message;
    $("updated").className = "error";
  } finally {
    state.busy = false;
  }
  if (state.again) refresh();
}

async function enforce(method, body) {
  const message = $("guard-message");
  message.textContent = method === "POST" ? "suspending…" : "resuming…";
  try {
    const answer = await fetch("/api/guardrails/enforce", {
      method, credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ org_id: state.data ? state.data.org_id : "", ...body }),
    });
    const reply = await answer.json().catch(() => ({}));
    if (!answer.ok) throw new Error((reply.error && reply.error.message) || "the daemon answered " + answer.status);
    message.textContent = method === "POST" ? "suspended" : "resumed";
  } catch (err) {
    message.textContent = err.message;
  }
  await refresh();
}

function choose(groupId, attr, key) {
  for (const button of $(groupId).querySelectorAll("button")) {
    button.addEventListener("click", () => {
      state[key] = button.dataset[attr];
      for (const other of $(groupId).querySelectorAll("button")) other.classList.toggle("on", other === button);
      if (key === "range") refresh(); else if (state.data) render(state.data);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  choose("range", "range", "range");
  choose("stack", "stack", "stack");
  $("suspend").addEventListener("click", () => {
    const reason = $("reason").value.trim() || "suspended from the status page";
    enforce("POST", { action: "suspend", layer: "manual", ttl_seconds: Number($("ttl").value), reason });
  });
  $("resume").addEventListener("click", () => {
    enforce("DELETE", { reason: $("reason").value.trim() || "resumed from the status page" });
  });
  window.addEventListener("resize", () => { if (state.data) render(state.data); });
  refresh();
  setInterval(refresh, REFRESH_MS);
});
