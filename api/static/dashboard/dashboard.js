// The dashboard's only script: live progress by polling the page's JSON (no external code).
"use strict";

function fmtEta(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  return "ETA " + (s >= 60 ? Math.floor(s / 60) + "m " + (s % 60) + "s" : s + "s");
}

function watchJob(section) {
  const id = section.dataset.job;
  const status = document.getElementById("job-status");
  const bar = document.getElementById("job-progress");
  const text = document.getElementById("job-progress-text");
  const eta = document.getElementById("job-eta");
  const plot = document.getElementById("loss-plot");
  const error = document.getElementById("job-error");
  let lastStatus = status.textContent;
  let seq = null;

  async function tick() {
    let state;
    try {
      const query = seq === null ? "" : "?seq=" + seq;
      const resp = await fetch("/dashboard/jobs/" + encodeURIComponent(id) + "/live" + query, {credentials: "same-origin"});
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      state = await resp.json();
    } catch (e) {
      setTimeout(tick, 3000);
      return;
    }
    status.textContent = state.status;
    status.className = "status status-" + state.status;
    bar.value = state.percent;
    text.textContent = state.total ? (state.phase || "") + " " + state.step + "/" + state.total : "";
    eta.textContent = state.final ? "" : fmtEta(state.eta_s);
    if (state.plot_svg !== null) plot.innerHTML = state.plot_svg; // the server's SVG: numbers and fixed labels only
    seq = state.event_seq;
    if (state.error) {
      error.textContent = state.error.code + ": " + state.error.message;
      error.hidden = false;
    }
    if (state.final) {
      // the evidence (grids, metrics, download) is rendered by the server: show it
      if (lastStatus !== state.status) window.location.reload();
      return;
    }
    lastStatus = state.status;
    setTimeout(tick, 1000);
  }
  tick();
}

function watchList(table) {
  if (table.querySelector('tr[data-live="True"]')) {
    setTimeout(() => window.location.reload(), 3000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("job");
  if (section && section.dataset.final === "false") watchJob(section);
  const table = document.getElementById("jobs-table");
  if (table) watchList(table);
});
