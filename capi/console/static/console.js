// capi console: live updates only. Every page reads without this file; it polls the JSON
// endpoints the pages name (data-live) and writes what changed with textContent (never
// HTML), so nothing an outside value holds can become markup.
"use strict";

const EVERY_MS = 3000;
const EXPIRED = "session expired: log in again";

// Control and bidi characters shown as visible escapes, as capi.safetext.shown does for
// the pages (the same characters: tests/test_console_units.py checks).
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff]/g;
const NAMED = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

function shown(value) {
  return String(value).replace(UNSAFE, (c) => {
    if (NAMED[c]) return NAMED[c];
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

class Expired extends Error {}

function age(s) {
  if (s === null || s === undefined) return "-";
  if (s < 120) return `${Math.round(s * 10) / 10} s`;
  if (s < 7200) return `${Math.round(s / 6) / 10} min`;
  return `${Math.round(s / 360) / 10} h`;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) throw new Expired(EXPIRED);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function live(label) {
  const state = document.getElementById("live-state");
  if (state) state.textContent = label;
}

function poll(step) {
  const run = async () => {
    try {
      const again = await step();
      live(`live, updated ${new Date().toLocaleTimeString()}`);
      if (again === false) return;
    } catch (error) {
      if (error instanceof Expired) {
        live(EXPIRED);  // polling stops: a new login is a new page
        return;
      }
      live(`live updates paused (${error.message}); retrying`);
    }
    setTimeout(run, EVERY_MS);
  };
  setTimeout(run, EVERY_MS);
}

function overview(table) {
  const rows = new Map();
  const diagnoses = new Map();
  for (const row of table.querySelectorAll("tr[data-name]")) rows.set(row.dataset.name, row);
  for (const row of table.querySelectorAll("tr[data-diagnosis]")) diagnoses.set(row.dataset.diagnosis, row);
  poll(async () => {
    const data = await getJSON(table.dataset.live);
    document.getElementById("workers-alive").textContent = String(data.workers_alive);
    for (const d of data.destinations) {
      const row = rows.get(d.name);
      if (!row) continue;
      for (const cell of row.querySelectorAll("[data-f]")) {
        const value = d[cell.dataset.f];
        if (cell.dataset.kind === "age") cell.textContent = age(value);
        else cell.textContent = value === null || value === undefined ? "-" : shown(value);
        if (cell.classList.contains("state")) cell.className = `state ${value}`;
      }
      const diagnosis = diagnoses.get(d.name);
      if (diagnosis) {
        diagnosis.hidden = !d.diagnosis;
        diagnosis.querySelector("[data-f]").textContent = shown(d.diagnosis);
      }
    }
  });
}

function tail(body) {
  poll(async () => {
    const url = `${body.dataset.live}?after=${encodeURIComponent(body.dataset.after)}`;
    const data = await getJSON(url);
    body.dataset.after = data.after;
    for (const line of data.lines) {
      const row = document.createElement("tr");
      const cells = [line.time, line.id, line.type, line.status, line.reason || "",
        line.request_id || "", line.identifiers.join(", ")];
      for (const text of cells) {
        const cell = document.createElement("td");
        cell.textContent = shown(text);
        row.appendChild(cell);
      }
      row.children[3].className = `state ${line.status}`;
      body.insertBefore(row, body.firstChild);
    }
    while (body.children.length > 200) body.removeChild(body.lastChild);
  });
}

function job(box) {
  if (box.dataset.state !== "running") return;
  poll(async () => {
    const data = await getJSON(box.dataset.live);
    const bar = box.querySelector("progress");
    bar.max = data.total || 1;
    bar.value = data.done;
    let text = `${data.state}: ${data.done} of ${data.total}`;
    if (data.state === "completed") {
      text += `; replayed ${data.replayed}, already gone ${data.already_gone}, past deadline ${data.expired}`;
    }
    if (data.error) text += `; ${data.error}`;
    document.getElementById("job-state").textContent = shown(text);
    return data.state === "running";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("overview");
  if (table) overview(table);
  const ring = document.querySelector("#tail tbody[data-live]");
  if (ring) tail(ring);
  const box = document.getElementById("job");
  if (box) job(box);
});
