// The cockpit page: renders /api/cameras and every update from /events. Everything shown
// came over MQTT from devices, so it is written with textContent only, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function ago(s) {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

// Results (green, up) and refusals (red, down) per minute over the last hour.
function chart(results, refusals) {
  const w = 180, h = 34, mid = 22, n = results.length;
  const max = Math.max(1, ...results, ...refusals);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const bw = w / n;
  const bar = (i, y, hh, cls) => {
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", (i * bw).toFixed(1));
    r.setAttribute("y", y.toFixed(1));
    r.setAttribute("width", Math.max(1, bw - 0.5).toFixed(1));
    r.setAttribute("height", hh.toFixed(1));
    r.setAttribute("class", cls);
    svg.appendChild(r);
  };
  for (let i = 0; i < n; i++) {
    if (results[i]) { const hh = (mid - 1) * results[i] / max; bar(i, mid - hh, hh, "r"); }
    if (refusals[i]) { bar(i, mid + 1, (h - mid - 1) * refusals[i] / max, "x"); }
  }
  const title = document.createElementNS(SVG, "title");
  title.textContent = "results (up) and refusals (down) per minute, last hour";
  svg.appendChild(title);
  return svg;
}

function row(c) {
  const tr = el("tr", "camera");
  tr.dataset.device = c.device_id;
  tr.dataset.camera = c.camera_id;
  const name = el("td");
  name.appendChild(el("div", "device", c.device_id));
  name.appendChild(el("div", "cam", c.camera_id));
  if (c.note) name.appendChild(el("div", "note", c.note));
  tr.appendChild(name);
  const state = el("td");
  state.appendChild(el("span", `pill availability ${c.availability}`, c.availability));
  tr.appendChild(state);
  const model = el("td", "model");
  if (c.model_name !== null) {
    model.appendChild(el("span", "model-name", c.model_name));
    model.appendChild(document.createTextNode(" "));
    model.appendChild(el("span", "model-version", `v${c.model_version}`));
    if (c.input_mode) model.appendChild(el("div", "mode", c.input_mode));
  } else {
    model.textContent = "—";
  }
  tr.appendChild(model);
  tr.appendChild(el("td", "label", c.last_label === null ? "—" : c.last_label));
  tr.appendChild(el("td", "when", ago(c.last_result_age_s)));
  tr.appendChild(el("td", "latency", c.latency_s === null ? "—" : `${c.latency_s.toFixed(1)} s`));
  tr.appendChild(el("td", "hour", `${c.results_last_hour} results, ${c.refusals_last_hour} refused`));
  const ch = el("td");
  ch.appendChild(chart(c.results_per_minute, c.refusals_per_minute));
  tr.appendChild(ch);
  return tr;
}

function render(v) {
  const body = document.querySelector("#cameras tbody");
  body.replaceChildren(...v.cameras.map(row));
  document.getElementById("empty").hidden = v.cameras.length > 0;
  const b = document.getElementById("broker");
  b.textContent = v.broker_connected ? "broker connected" : "broker disconnected";
  b.className = `pill ${v.broker_connected ? "online" : "offline"}`;
  const online = v.cameras.filter((c) => c.availability === "online").length;
  let s = `${v.cameras.length} cameras, ${online} online`;
  if (v.ignored_messages) s += `, ${v.ignored_messages} messages ignored`;
  document.getElementById("summary").textContent = s;
  document.body.dataset.updated = String(v.now_unix_ms);
}

async function start() {
  try {
    const r = await fetch("/api/cameras");
    render(await r.json());
  } catch (e) {
    document.getElementById("summary").textContent = `cannot load /api/cameras: ${e}`;
  }
  const es = new EventSource("/events");
  es.onmessage = (m) => render(JSON.parse(m.data));
}

start();
