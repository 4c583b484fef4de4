// busreg dashboard: a live view of the gateway's /api/v1/events stream.
// Plain ES2020 and DOM, no framework and no build step. Every piece of data reaches the page
// through textContent / setAttribute (never innerHTML), so names, metadata and reasons from
// the registry cannot inject markup.
"use strict";

(() => {
  const EVENTS_URL = "/api/v1/events";
  const MAX_CHANGES = 200; // rows kept in the recent-changes log
  const MAX_SAMPLES = 5000; // latency samples kept for tests and benchmarks
  const STATUSES = ["UP", "STARTING", "DOWN", "OUT_OF_SERVICE"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f5bd3", "#d97706", "#1a7f37", "#cf222e", "#6e40c9", "#0e7490",
    "#be185d", "#4d7c0f", "#92400e", "#475569"];

  const model = {
    services: new Map(), // name -> {epoch, revision, instances: Map(id -> instance JSON)}
    changes: [], // Change JSON, newest last
    index: 0, // highest gateway seq applied: changes at or below it are already in the model
    operator: null,
  };
  const view = {
    filter: [],
    dirtyServices: new Set(),
    structure: true, // services appeared or the whole model was replaced
    changesReset: true,
    newChanges: [], // changes applied since the last render (log rows and latency samples)
    flash: new Set(), // "service\u0000id" of rows changed since the last render
    operatorDirty: false,
    scheduled: false,
  };

  // Figures for the browser test and `busreg bench`: render time minus the change's `at`
  // (the gateway and a browser on the same machine share the clock), in milliseconds.
  window.__busregLatencies = [];
  // One entry per change rendered: which change, and when it became visible (Date.now()).
  window.__busregRendered = [];

  const $ = (id) => document.getElementById(id);

  // el("td", {class: "x", "data-testid": "y"}, "text", childNode, ...): children are text
  // (escaped by construction) or nodes; null/undefined children are skipped.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null && v !== false) node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // ---- formatting ------------------------------------------------------------------------
  function duration(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  function clock(ts) {
    const d = new Date(ts * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  const isoTime = (ts) => (Number.isFinite(ts) ? new Date(ts * 1000).toISOString() : "");
  const nowSeconds = () => Date.now() / 1000;

  // ---- connection ------------------------------------------------------------------------
  function setConn(state) {
    const badge = $("conn");
    badge.dataset.state = state;
    badge.className = `conn ${state === "connected" ? "conn-up" : "conn-down"}`;
    badge.textContent = state === "connected" ? "connected"
      : state === "connecting" ? "connecting…" : "reconnecting…";
  }

  let source = null;
  let retryDelay = 1000;
  function connect() {
    source = new EventSource(EVENTS_URL);
    source.addEventListener("state", (e) => handle(e, applyState));
    source.addEventListener("change", (e) => handle(e, applyChange));
    source.addEventListener("operator", (e) => handle(e, applyOperator));
    source.onerror = () => {
      setConn("reconnecting");
      // EventSource retries network errors by itself (readyState CONNECTING) but gives up
      // on an HTTP error status (CLOSED): then we retry, backing off up to 15 s.
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setTimeout(connect, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 15000);
      }
    };
  }

  function handle(event, apply) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch (err) {
      console.warn("busreg: unreadable event", event.type, err);
      return;
    }
    apply(data);
    scheduleRender();
  }

  // ---- model -----------------------------------------------------------------------------
  function applyState(data) {
    model.services.clear();
    for (const [name, svc] of Object.entries(data.services || {})) {
      const instances = new Map();
      for (const inst of svc.instances || []) instances.set(inst.instance_id, inst);
      model.services.set(name, { epoch: svc.epoch, revision: svc.revision, instances });
    }
    model.changes = (data.changes || []).slice(-MAX_CHANGES);
    model.index = Number(data.index) || 0;
    view.structure = true;
    view.changesReset = true;
    view.newChanges = [];
    view.flash.clear();
    retryDelay = 1000;
    setConn("connected");
  }

  function applyChange(change) {
    // After a reconnect the fresh `state` already holds everything up to its index.
    if (Number.isFinite(change.seq) && change.seq <= model.index) return;
    if (Number.isFinite(change.seq)) model.index = change.seq;
    let svc = model.services.get(change.service);
    if (!svc) {
      svc = { epoch: change.epoch, revision: 0, instances: new Map() };
      model.services.set(change.service, svc);
      view.structure = true;
    }
    svc.epoch = change.epoch;
    svc.revision = change.revision;
    const inst = change.instance || {};
    const id = inst.instance_id;
    if (change.kind === "removed") {
      svc.instances.delete(id);
    } else {
      const prev = svc.instances.get(id);
      const next = { ...inst };
      if (next.since === undefined) {
        next.since = prev && prev.incarnation === inst.incarnation ? prev.since : change.at;
      }
      if (next.changed === undefined) next.changed = change.at;
      svc.instances.set(id, next);
      view.flash.add(`${change.service}\u0000${id}`);
    }
    model.changes.push(change);
    if (model.changes.length > MAX_CHANGES) model.changes.splice(0, model.changes.length - MAX_CHANGES);
    view.dirtyServices.add(change.service);
    view.newChanges.push(change);
  }

  function applyOperator(data) {
    model.operator = data;
    view.operatorDirty = true;
  }

  // ---- filtering -------------------------------------------------------------------------
  function haystack(service, inst) {
    const meta = Object.entries(inst.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    return `${service} ${inst.instance_id} ${inst.address} ${inst.zone} ${inst.status} ${meta}`
      .toLowerCase();
  }
  // Every whitespace-separated term must occur somewhere in the instance's text.
  const matches = (text) => view.filter.every((term) => text.includes(term));

  // ---- rendering -------------------------------------------------------------------------
  function scheduleRender() {
    if (view.scheduled) return;
    view.scheduled = true;
    // One render per frame however many events arrived; the timeout covers hidden tabs,
    // where animation frames stop.
    requestAnimationFrame(render);
    setTimeout(render, 100);
  }

  function render() {
    if (!view.scheduled) return;
    view.scheduled = false;
    const sorted = [...model.services.keys()].sort();
    renderTotals();
    renderServicesTable(sorted);
    renderCards(sorted);
    renderChanges();
    if (view.operatorDirty) renderOperator();
    view.structure = false;
    view.dirtyServices.clear();
    view.flash.clear();
    recordLatencies();
  }

  function recordLatencies() {
    if (!view.newChanges.length) return;
    const shown = Date.now();
    for (const c of view.newChanges) {
      const at = Number(c.at) * 1000;
      if (Number.isFinite(at)) window.__busregLatencies.push(shown - at);
      window.__busregRendered.push({
        seq: c.seq, service: c.service, kind: c.kind, reason: c.reason,
        instance_id: c.instance && c.instance.instance_id,
        metadata: (c.instance && c.instance.metadata) || {}, at: c.at, shown,
      });
    }
    for (const list of [window.__busregLatencies, window.__busregRendered]) {
      if (list.length > MAX_SAMPLES) list.splice(0, list.length - MAX_SAMPLES);
    }
    view.newChanges = [];
  }

  function renderTotals() {
    let instances = 0;
    let up = 0;
    for (const svc of model.services.values()) {
      instances += svc.instances.size;
      for (const inst of svc.instances.values()) if (inst.status === "UP") up += 1;
    }
    $("total-services").textContent = String(model.services.size);
    $("total-instances").textContent = String(instances);
    $("total-up").textContent = String(up);
    $("index").textContent = String(model.index);
  }

  function counts(instances, key) {
    const out = new Map();
    for (const inst of instances) out.set(inst[key], (out.get(inst[key]) || 0) + 1);
    return out;
  }

  function statusChips(instances) {
    const by = counts(instances, "status");
    const order = [...STATUSES, ...[...by.keys()].filter((s) => !STATUSES.includes(s))];
    return order.filter((s) => by.has(s)).map((s) =>
      el("span", { class: `status status-${s}`, "data-status": s }, `${s} ${by.get(s)}`));
  }

  function visibleInstances(name, svc) {
    const all = [...svc.instances.values()];
    if (!view.filter.length) return all;
    return all.filter((inst) => matches(haystack(name, inst)));
  }

  function serviceVisible(name, svc) {
    if (!view.filter.length) return true;
    return matches(name.toLowerCase()) || visibleInstances(name, svc).length > 0;
  }

  function renderServicesTable(sorted) {
    const body = $("services-body");
    const rows = [];
    for (const name of sorted) {
      const svc = model.services.get(name);
      if (!serviceVisible(name, svc)) continue;
      const instances = [...svc.instances.values()];
      const zones = [...counts(instances, "zone").entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1));
      rows.push(el("tr", { "data-testid": `service-row-${name}`, "data-service": name },
        el("td", {}, el("a", { class: "svc", href: `#svc-${encodeURIComponent(name)}` }, name)),
        el("td", { class: "num", "data-field": "count" }, instances.length),
        el("td", { "data-field": "by-status" }, ...statusChips(instances)),
        el("td", { "data-field": "by-zone" }, ...zones.map(([z, n]) =>
          el("span", { class: "chip" }, el("b", {}, z), ` ${n}`))),
        el("td", { class: "num mono muted" }, svc.revision)));
    }
    body.replaceChildren(...rows);
    $("services-empty").hidden = rows.length > 0;
    $("services-empty").textContent = model.services.size
      ? "No service matches the filter." : "No services registered yet.";
  }

  const cards = new Map(); // service -> card element

  function renderCards(sorted) {
    const container = $("service-cards");
    for (const [name, card] of cards) {
      if (!model.services.has(name)) { card.remove(); cards.delete(name); }
    }
    for (const name of sorted) {
      const svc = model.services.get(name);
      let card = cards.get(name);
      const fresh = !card;
      if (fresh) {
        card = el("section", { class: "card", id: `svc-${encodeURIComponent(name)}`,
          "data-testid": `service-${name}`, "data-service": name });
        cards.set(name, card);
      }
      if (fresh || view.structure || view.dirtyServices.has(name)) fillCard(card, name, svc);
    }
    if (view.structure) container.replaceChildren(...sorted.map((n) => cards.get(n)));
  }

  function fillCard(card, name, svc) {
    const instances = visibleInstances(name, svc)
      .sort((a, b) => (a.instance_id < b.instance_id ? -1 : a.instance_id > b.instance_id ? 1 : 0));
    card.hidden = !serviceVisible(name, svc);
    const head = el("div", { class: "card-head" },
      el("h2", {}, name),
      el("span", { class: "card-meta" }, `epoch ${svc.epoch ?? "–"} · revision ${svc.revision}`),
      el("span", {}, ...statusChips([...svc.instances.values()])));
    const rows = instances.map((inst) => instanceRow(name, inst));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 8, class: "empty" },
        svc.instances.size ? "No instance matches the filter." : "No live instances.")));
    }
    const table = el("table", { class: "grid" },
      el("thead", {}, el("tr", {},
        ...["Instance", "Address", "Zone", "Status", "Metadata"].map((h) => el("th", {}, h)),
        el("th", { class: "num" }, "Inc."), el("th", { class: "num" }, "Age"),
        el("th", { class: "num" }, "Last change"))),
      el("tbody", {}, ...rows));
    card.replaceChildren(head, table);
  }

  function instanceRow(service, inst) {
    const status = el("td", { "data-field": "status" },
      el("span", { class: `status status-${inst.status}` }, inst.status));
    const ov = inst.override;
    if (ov && typeof ov === "object") {
      // `status` is already the effective (forced) one: say who forced it and why
      const text = `override by ${ov.by ?? "?"}${ov.reason ? `: ${ov.reason}` : ""}`;
      // the override's `at` is the broker's time in milliseconds
      const at = Number(ov.at) > 1e11 ? Number(ov.at) / 1000 : Number(ov.at);
      status.append(el("span", { class: "override", "data-field": "override",
        title: `since ${isoTime(at)}${ov.identity ? ` · verified ${ov.identity}` : ""}` }, text));
    }
    const meta = Object.entries(inst.metadata || {}).sort((a, b) => (a[0] < b[0] ? -1 : 1));
    const metaCell = el("td", { "data-field": "metadata" }, ...meta.map(([k, v]) => {
      const full = `${k}=${v}`;
      const shown = full.length > 60 ? `${full.slice(0, 59)}…` : full;
      return el("span", { class: "chip meta", title: full }, shown);
    }));
    const since = Number(inst.since);
    const changed = Number(inst.changed);
    const row = el("tr", {
      "data-testid": `instance-${service}-${inst.instance_id}`,
      "data-service": service, "data-instance": inst.instance_id, "data-status": inst.status,
      class: view.flash.has(`${service}\u0000${inst.instance_id}`) ? "flash" : null,
    },
    el("td", { class: "mono", "data-field": "instance" }, inst.instance_id),
    el("td", { class: "mono", "data-field": "address" }, inst.address),
    el("td", { "data-field": "zone" }, inst.zone),
    status,
    metaCell,
    el("td", { class: "num mono", "data-field": "incarnation" }, inst.incarnation),
    el("td", { class: "num", "data-field": "age", "data-since": since, title: isoTime(since) },
      duration(nowSeconds() - since)),
    el("td", { class: "num", "data-field": "changed", "data-changed": changed,
      title: isoTime(changed) }, `${duration(nowSeconds() - changed)} ago`));
    return row;
  }

  function changeRow(c) {
    const inst = c.instance || {};
    const text = `${c.service} ${c.kind} ${c.reason || ""} ${haystack(c.service, inst)}`.toLowerCase();
    return el("tr", {
      "data-testid": "change-row", "data-seq": c.seq, "data-service": c.service,
      "data-instance": inst.instance_id, "data-kind": c.kind, "data-reason": c.reason || "",
      "data-text": text, hidden: view.filter.length && !matches(text) ? "" : null,
    },
    el("td", { class: "mono muted", title: isoTime(Number(c.at)) }, clock(Number(c.at))),
    el("td", {}, c.service),
    el("td", { class: `kind kind-${c.kind}` }, c.kind),
    el("td", { class: "mono inst" }, inst.instance_id ?? "",
      inst.status && c.kind !== "removed" ? el("span", { class: "muted" }, ` ${inst.status}`) : null),
    el("td", { class: c.reason ? `reason-${c.reason}` : "muted" }, c.reason || "–"));
  }

  function renderChanges() {
    const body = $("changes-body");
    if (view.changesReset) {
      body.replaceChildren(...model.changes.slice().reverse().map(changeRow));
      view.changesReset = false;
    } else if (view.newChanges.length) {
      const rows = view.newChanges.slice(-MAX_CHANGES).reverse().map(changeRow);
      body.prepend(...rows);
      while (body.rows.length > MAX_CHANGES) body.lastElementChild.remove();
    }
    $("changes-empty").hidden = body.rows.length > 0;
  }

  function applyFilterToChanges() {
    for (const row of $("changes-body").rows) {
      row.hidden = view.filter.length > 0 && !matches(row.dataset.text || "");
    }
  }

  // ---- operator pages ---------------------------------------------------------------------
  function fmtNum(v) {
    return v === null || v === undefined || v === "" ? "–" : String(v);
  }

  function watermark(p) {
    if (p.watermark_age_ms !== undefined && p.watermark_age_ms !== null) {
      return `${(Number(p.watermark_age_ms) / 1000).toFixed(1)}s`;
    }
    if (p.watermark_age === undefined || p.watermark_age === null) return "–";
    return `${Number(p.watermark_age).toFixed(1)}s`;
  }

  function renderOperator() {
    view.operatorDirty = false;
    const op = model.operator;
    const section = $("operator");
    if (!op || !op.enabled) { section.hidden = true; return; }
    section.hidden = false;
    const at = Number.isFinite(Number(op.at)) ? `sampled ${clock(Number(op.at))}` : "";
    $("operator-at").textContent = op.namespace ? `namespace ${op.namespace} · ${at}` : at;
    $("operator-error").hidden = !op.error;
    $("operator-error").textContent = op.error ? `last sample failed: ${op.error}` : "";
    const partitions = (op.partitions || []).slice().sort((a, b) => a.partition - b.partition);
    $("partitions-body").replaceChildren(...partitions.map((p) =>
      el("tr", { "data-testid": "partition-row", "data-partition": p.partition },
        el("td", { class: "num mono" }, p.partition),
        el("td", { class: p.owner ? "mono" : "reason-expired" }, p.owner || "no owner"),
        el("td", { class: "num" }, fmtNum(p.lag)),
        el("td", { class: "num" }, fmtNum(p.outbox)),
        el("td", { class: "num" }, watermark(p)),
        el("td", { class: "num" }, fmtNum(p.applied)),
        el("td", { class: "num" }, fmtNum(p.expired)),
        el("td", { class: "num" }, fmtNum(p.instances)))));
    const workers = (op.workers || []).map((w) => (typeof w === "string" ? { worker: w } : w));
    $("workers").replaceChildren(...(workers.length ? workers.map((w) => {
      const owned = Number.isFinite(w.partitions) ? w.partitions
        : partitions.filter((p) => p.owner === w.worker).length;
      const extra = Object.entries(w)
        .filter(([k, v]) => !["worker", "partitions"].includes(k) && v !== null && typeof v !== "object")
        .map(([k, v]) => ` ${k}=${v}`).join("");
      return el("li", { "data-testid": "worker", "data-worker": w.worker },
        `${w.worker} · ${owned} partition${owned === 1 ? "" : "s"}${extra}`);
    }) : [el("li", { class: "reason-expired" }, "no live worker")]));
    const dead = Object.entries(op.deadletters || {}).sort((a, b) => b[1] - a[1]);
    $("deadletters-body").replaceChildren(...(dead.length ? dead.map(([reason, n]) =>
      el("tr", { "data-testid": "deadletter-row", "data-reason": reason },
        el("td", { class: "mono" }, reason), el("td", { class: "num" }, n)))
      : [el("tr", {}, el("td", { class: "muted", colspan: 2 }, "none"))]));
    const history = op.history || {};
    drawChart($("plot-rate"), [{ name: "changes/s", points: history.changes_per_second || [] }], true);
    const lag = Object.entries(history.lag || {})
      .sort((a, b) => Number(a[0]) - Number(b[0]))
      .map(([p, points]) => ({ name: `p${p}`, points }));
    drawChart($("plot-lag"), lag, false);
    $("plot-lag-legend").replaceChildren(...lag.map((s, i) =>
      el("span", {}, el("i", { style: `background:${PALETTE[i % PALETTE.length]}` }), s.name)));
  }

  // A small line chart: series of [ts, value] points over a shared time axis.
  function drawChart(node, series, area) {
    const W = 360, H = 120, L = 34, R = 8, T = 8, B = 18;
    const all = series.flatMap((s) => s.points).filter((p) => Array.isArray(p) && p.length >= 2);
    node.replaceChildren();
    if (!all.length) {
      const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
      t.textContent = "no samples yet";
      node.append(t);
      return;
    }
    const tMax = Math.max(...all.map((p) => p[0]));
    const tMin = Math.min(tMax - 60, Math.min(...all.map((p) => p[0])));
    const vMax = niceMax(Math.max(1, ...all.map((p) => Number(p[1]) || 0)));
    const x = (t) => L + ((t - tMin) / (tMax - tMin || 1)) * (W - L - R);
    const y = (v) => T + (1 - v / vMax) * (H - T - B);
    for (const frac of [0, 0.5, 1]) {
      const yy = y(vMax * frac);
      node.append(svg("line", { class: frac === 0 ? "axis" : "gridline", x1: L, x2: W - R, y1: yy, y2: yy }));
      const label = svg("text", { x: L - 4, y: yy + 3, "text-anchor": "end" });
      label.textContent = fmtAxis(vMax * frac);
      node.append(label);
    }
    const span = tMax - tMin;
    const left = svg("text", { x: L, y: H - 4 });
    left.textContent = `-${span >= 120 ? `${Math.round(span / 60)}m` : `${Math.round(span)}s`}`;
    const right = svg("text", { x: W - R, y: H - 4, "text-anchor": "end" });
    right.textContent = "now";
    node.append(left, right);
    series.forEach((s, i) => {
      const pts = s.points.filter((p) => Array.isArray(p) && p.length >= 2)
        .map((p) => `${x(p[0]).toFixed(1)},${y(Number(p[1]) || 0).toFixed(1)}`);
      if (!pts.length) return;
      const colour = PALETTE[i % PALETTE.length];
      if (area && pts.length > 1) {
        const first = pts[0].split(",")[0];
        const last = pts[pts.length - 1].split(",")[0];
        node.append(svg("polygon", { class: "area",
          points: `${first},${y(0)} ${pts.join(" ")} ${last},${y(0)}` }));
      }
      const line = svg("polyline", { class: "series", stroke: colour, points: pts.join(" ") });
      const title = svg("title", {});
      title.textContent = s.name;
      line.append(title);
      node.append(line);
    });
  }

  function niceMax(v) {
    const exp = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= v) return m * exp;
    return 10 * exp;
  }
  const fmtAxis = (v) => (v >= 1000 ? `${(v / 1000).toFixed(v % 1000 ? 1 : 0)}k` : String(+v.toFixed(1)));

  // ---- ages ticking, filter box ----------------------------------------------------------
  function tickAges() {
    const now = nowSeconds();
    for (const cell of document.querySelectorAll("td[data-since]")) {
      cell.textContent = duration(now - Number(cell.dataset.since));
    }
    for (const cell of document.querySelectorAll("td[data-changed]")) {
      cell.textContent = `${duration(now - Number(cell.dataset.changed))} ago`;
    }
  }

  function onFilter() {
    view.filter = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    view.structure = true;
    applyFilterToChanges();
    view.scheduled = true;
    render();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("filter").addEventListener("input", onFilter);
    setConn("connecting");
    setInterval(tickAges, 1000);
    connect();
  });
})();
