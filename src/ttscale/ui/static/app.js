// ttscale dashboard: three tabs over the server's JSON and SSE routes (docs/UI.md).
// Plain browser JavaScript, no build step and no library: it is served as a static file.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const svg = ["svg", "g", "circle", "line", "path", "rect", "text", "title", "polyline"].includes(tag);
  const node = svg ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) {
    const units = [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [u, s] of units) if (a >= u) return (x / u).toPrecision(digits) + " " + s;
    return x.toExponential(2);
  }
  return Number.isInteger(x) ? String(x) : x.toPrecision(digits);
}
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");

// ---- API calls: with the server's key when it has one ------------------------------------------

let apiKey = sessionStorage.getItem("ttscale-api-key") || "";

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) {
    $("#key-form").hidden = false;
    $("#model").textContent = "API key needed";
    throw new Error("the server wants its API key (top right)");
  }
  return r;
}

// ---- tabs ------------------------------------------------------------------------------------

let offline = false;
let currentTab = "engine";

function showTab() {
  const name = (location.hash || "#engine").slice(1);
  currentTab = ["engine", "playground", "runs"].includes(name) ? name : "engine";
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== "tab-" + currentTab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === currentTab);
  if (currentTab === "runs") loadRuns();
  if (currentTab === "engine") pollEngine();
}
window.addEventListener("hashchange", showTab);

// ---- Engine ----------------------------------------------------------------------------------

let pollTimer = null;
let pollGeneration = 0; // a newer call supersedes an older one still waiting for its reply

async function pollEngine() {
  clearTimeout(pollTimer);
  const generation = ++pollGeneration;
  try {
    const r = await api("/v1/ttscale/engine");
    if (!r.ok) throw new Error("engine stats: HTTP " + r.status);
    renderEngine(await r.json());
  } catch (e) {
    if ($("#key-form").hidden) $("#model").textContent = "server unreachable";
  }
  if (generation === pollGeneration && !offline && currentTab === "engine") {
    pollTimer = setTimeout(pollEngine, 1000);
  }
}

function renderEngine(s) {
  if (s.offline) {
    offline = true;
    $("#model").textContent = "offline: " + s.runs_dir;
    $("#engine-offline").hidden = false;
    $("#engine-live").hidden = true;
    $("#playground-offline").hidden = false;
    $("#run-form").hidden = true;
    return;
  }
  $("#model").textContent = s.model;
  const seqs = s.sequences || {};
  $("#stat-running").textContent = seqs.running || 0;
  $("#stat-waiting").textContent = seqs.waiting || 0;
  $("#stat-requests").textContent = `${s.requests} / ${s.jobs_running}`;
  $("#stat-decode-rate").textContent = fmt(s.decode_tokens_per_s, 3);
  $("#stat-prefill-rate").textContent = fmt(s.prefill_tokens_per_s, 3);
  $("#stat-steps").textContent = s.steps;
  $("#stat-preemptions").textContent = s.preemptions;
  $("#stat-hit").textContent = pct(s.kv.prefix_hit_rate);
  const kv = s.kv;
  $("#kv-summary").textContent =
    `${kv.used} used (${kv.shared} shared) · ${kv.cached} cached · ${kv.free} free of ${kv.total} blocks of ${kv.block_size} tokens`;
  drawPool(kv.pool);
  const c = s.cost || {};
  fillKv($("#engine-cost"), [
    ["FLOPs", fmt(c.flops)], ["bytes moved", fmt(c.bytes)],
    ["model time (measured)", fmt(c.measured_time) + " s"],
    ["roofline time", c.roofline_time === null ? "– (no hardware profile: run ttscale calibrate)" : fmt(c.roofline_time) + " s"],
    ["roofline utilisation", c.utilization === null ? "–" : pct(c.utilization)],
  ]);
  fillRows($("#live-requests tbody"), (s.live_requests || []).map((r) => [
    r.request_id, r.sequences, `${r.prompt_tokens} (${r.cached_prompt_tokens})`, r.tokens, r.peak_kv_blocks,
    fmt(r.flops), fmt(r.bytes), fmt(r.measured_time), r.utilization === null ? "–" : pct(r.utilization),
  ]), "no request in the engine");
  fillRows($("#recent-runs tbody"), (s.recent_runs || []).map((r) => [
    r.strategy, r.question, r.answer ?? "(none)", fmt(r.seconds), r.tokens,
    fmt(r.flops), fmt(r.bytes), r.utilization === null ? "–" : pct(r.utilization),
  ]), "none yet: run one in the Playground");
}

const POOL_COLORS = { ".": "#e5e7eb", c: "#93c5fd", u: "#34d399", s: "#f59e0b" };

function drawPool(pool) {
  const canvas = $("#pool");
  const width = canvas.clientWidth || 960;
  const n = pool.length;
  // Square cells, as large as fits in a few rows.
  let cell = Math.max(2, Math.min(14, Math.floor(Math.sqrt((width * 160) / Math.max(n, 1)))));
  const perRow = Math.max(1, Math.floor(width / cell));
  const rows = Math.ceil(n / perRow);
  canvas.width = width;
  canvas.height = Math.max(cell, rows * cell);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = POOL_COLORS[pool[i]] || "#000";
    ctx.fillRect((i % perRow) * cell, Math.floor(i / perRow) * cell, cell - (cell > 3 ? 1 : 0), cell - (cell > 3 ? 1 : 0));
  }
}

function fillRows(body, rows, empty) {
  const cols = body.closest("table").querySelectorAll("th").length;
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: cols, class: "sub" }, empty));
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const v of cells) tr.append(el("td", {}, String(v)));
    return tr;
  }));
}

function fillKv(table, rows) {
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = el("tr");
    tr.append(el("th", {}, k), el("td", {}, v));
    return tr;
  }));
}

// ---- Playground ------------------------------------------------------------------------------

let tree = null;
let controller = null;
let renderPending = false;

function newTree(run) {
  return {
    run,
    nodes: new Map([["root", { id: "root", parent: null, children: [], depth: 0, state: "root",
      text: "", tokens: run.prompt_tokens, kvBlocks: Math.ceil(run.prompt_tokens / run.block_size),
      shared: null, score: null }]]),
    requests: 0, forks: 0, pruned: 0, selected: "root",
  };
}

function node(seq, parent) {
  let n = tree.nodes.get(seq);
  if (!n) {
    const p = tree.nodes.get(parent ?? "root") || tree.nodes.get("root");
    n = { id: seq, parent: p.id, children: [], depth: p.depth + 1, state: "running", text: "",
      tokens: 0, kvBlocks: 0, shared: null, score: null };
    tree.nodes.set(seq, n);
    p.children.push(seq);
  }
  return n;
}

const handlers = {
  run(e) { tree = newTree(e); status(`running ${e.strategy} on a ${e.prompt_tokens}-token prompt…`); },
  request(e) { tree.requests += 1; status(`request ${e.request_id}: the prompt prefilled once, forked ${e.n} ways`); },
  request_done(e) {
    // Several requests (adaptive's waves): add up what their prompts cost.
    const p = tree.prompt || { computed_prompt_tokens: 0, cached_prompt_tokens: 0 };
    tree.prompt = {
      computed_prompt_tokens: p.computed_prompt_tokens + e.computed_prompt_tokens,
      cached_prompt_tokens: p.cached_prompt_tokens + e.cached_prompt_tokens,
    };
  },
  tokens(e) {
    const n = node(e.seq, null);
    n.text += e.delta;
    n.stepTokens = e.tokens;
    n.kvBlocks = e.kv_blocks;
    if (n.state !== "pruned") n.state = "running";
  },
  fork(e) {
    tree.forks += e.children.length;
    const p = node(e.parent, null);
    p.state = "expanded";
    for (const c of e.children) {
      const n = node(c, e.parent);
      n.shared = e.shared_blocks;
      n.state = "running";
    }
  },
  step(e) {
    const n = node(e.seq, e.parent);
    n.text = e.step_text;
    n.stepTokens = e.step_tokens;
    n.tokens = e.tokens;
    n.kvBlocks = e.kv_blocks;
    n.shared = e.shared_blocks;
    n.finish = e.finish_reason;
    if (n.state === "running") n.state = "live";
  },
  score(e) { node(e.seq, null).score = e.score; },
  drop(e) {
    for (const s of e.seqs) {
      const n = node(s, null);
      if (!n.children.length && n.state !== "finished") { n.state = "pruned"; tree.pruned += 1; }
    }
  },
  finished(e) {
    e.candidates.forEach((c, i) => {
      const n = c.seq_id === null ? null : tree.nodes.get(c.seq_id);
      if (!n) return;
      if (n.state === "pruned") tree.pruned -= 1;
      n.state = c.dropped ? "excluded" : "finished";
      n.answer = c.answer;
      n.dropped = c.dropped;
      n.candidateScore = c.score;
      if (i === e.chosen) n.chosen = true;
    });
  },
  vote(e) { tree.noFinished = Boolean(e.extra.no_finished); renderVote(e); },
  cost(e) { renderCost(e.stats); },
  done(e) {
    $("#answer").textContent = e.answer !== null ? e.answer
      : tree.noFinished ? "(no answer: every candidate was excluded)" : "(no answer)";
    $("#answer").title = e.text;
    status(`done in ${fmt(e.seconds)} s`);
  },
  error(e) { status("error: " + e.message, true); },
};

function status(text, bad = false) {
  const s = $("#run-status");
  s.textContent = text;
  s.classList.toggle("bad", bad);
}

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderTree(); });
}

function layoutTree() {
  // Leaves get consecutive rows; a parent sits at the middle of its children. x is the depth.
  const rows = new Map();
  let next = 0;
  const visit = (id) => {
    const n = tree.nodes.get(id);
    if (!n.children.length) { rows.set(id, next++); return rows.get(id); }
    const ys = n.children.map(visit);
    rows.set(id, (ys[0] + ys[ys.length - 1]) / 2);
    return rows.get(id);
  };
  visit("root");
  return { rows, count: Math.max(next, 1) };
}

function renderTree() {
  if (!tree) return;
  const svg = $("#tree");
  const { rows, count } = layoutTree();
  const maxDepth = Math.max(...[...tree.nodes.values()].map((n) => n.depth));
  const dx = 150, dy = 26, pad = 24;
  const width = pad * 2 + (maxDepth + 1) * dx + 60;
  const height = pad * 2 + count * dy;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const pos = (n) => [pad + n.depth * dx, pad + rows.get(n.id) * dy];
  const edges = el("g", { class: "edges" });
  const nodes = el("g", { class: "nodes" });
  for (const n of tree.nodes.values()) {
    const [x, y] = pos(n);
    if (n.parent !== null) {
      const [px, py] = pos(tree.nodes.get(n.parent));
      const mid = px + dx / 2;
      edges.append(el("path", { d: `M${px},${py} C${mid},${py} ${mid},${y} ${x},${y}`, class: "edge " + n.state }));
      if (n.shared) {
        edges.append(el("text", { x: x - 8, y: y - 5, class: "shared", "text-anchor": "end" }, `${n.shared} shared`));
      }
    }
    const cls = ["node", n.state, n.chosen ? "chosen" : "", tree.selected === n.id ? "selected" : ""].join(" ");
    const g = el("g", { class: cls, transform: `translate(${x},${y})`, "data-seq": n.id, tabindex: 0 });
    // The whole label area takes clicks, not only the dot and the glyphs.
    g.append(el("rect", { x: -9, y: -10, width: dx - 24, height: 20, class: "hit" }));
    g.append(el("circle", { r: n.id === "root" ? 8 : 6 }));
    const label = n.id === "root" ? `prompt ${n.tokens} tok`
      : [n.score !== null ? fmt(n.score, 2) : null, n.answer ?? null].filter((v) => v !== null).join(" · ");
    g.append(el("text", { x: 10, y: 4, class: "label" }, label));
    g.append(el("title", {}, n.id === "root" ? tree.run.question : n.text));
    const select = () => { tree.selected = n.id; renderDetail(n); renderTree(); };
    g.addEventListener("click", select);
    g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(); } });
    nodes.append(g);
  }
  svg.replaceChildren(edges, nodes);
  const live = [...tree.nodes.values()].filter((n) => n.id !== "root");
  const prompt = tree.prompt
    ? ` · prompt: ${tree.prompt.computed_prompt_tokens} tokens computed, ${tree.prompt.cached_prompt_tokens} from the prefix cache`
    : "";
  $("#tree-summary").textContent =
    `${live.length} branches · ${tree.forks} forked · ${tree.pruned} pruned · ${tree.requests} request(s)${prompt}`;
  if (tree.selected !== "root") renderDetail(tree.nodes.get(tree.selected));
}

function renderDetail(n) {
  const d = $("#node-detail");
  if (n.id === "root") {
    d.replaceChildren(el("div", {}, tree.run.question));
    return;
  }
  const facts = [
    ["branch", `seq ${n.id}, depth ${n.depth}, ${n.state}${n.chosen ? " (chosen)" : ""}`],
    ["step tokens", n.stepTokens ?? "–"], ["path tokens", n.tokens || "–"],
    ["KV blocks", `${n.kvBlocks}${n.shared !== null ? ` (${n.shared} shared with its parent)` : ""}`],
    ["score", n.score === null ? "–" : fmt(n.score)],
    ["answer", n.answer === undefined ? "–" : n.answer ?? "(none)"],
    ["excluded", n.dropped || "–"], ["finish", n.finish || "–"],
  ];
  const table = el("table", { class: "kv" });
  fillKv(table, facts.map(([k, v]) => [k, String(v)]));
  d.replaceChildren(table, el("pre", {}, n.text));
}

function renderVote(e) {
  const box = $("#vote");
  let entries = Object.entries(e.votes).sort((a, b) => b[1] - a[1]);
  let note = null;
  if (!entries.length && tree) {
    // A strategy that selects by score has no vote: show its candidates' answers instead.
    const counts = {};
    for (const n of tree.nodes.values()) {
      if (n.state === "finished" && n.answer !== null && n.answer !== undefined) counts[n.answer] = (counts[n.answer] || 0) + 1;
    }
    entries = Object.entries(counts).sort((a, b) => b[1] - a[1]);
    if (entries.length) note = "candidates' answers (this strategy selects by score, not by vote)";
  }
  const dropped = Object.entries(e.extra.dropped || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  if (!entries.length) {
    const cands = tree ? [...tree.nodes.values()].filter((n) => n.answer !== undefined) : [];
    const why = e.extra.no_finished ? `no candidate could vote (excluded: ${dropped})`
      : cands.length && cands.every((n) => n.answer === null)
        ? `no candidate gave an answer (${cands.length} candidates)`
        : "no vote: this strategy selects by score";
    box.replaceChildren(el("p", { class: "sub vote-empty" }, why));
    return;
  }
  const max = Math.max(...entries.map(([, v]) => v));
  const bars = entries.map(([answer, v]) => {
    const row = el("div", { class: "bar" + (answer === e.answer ? " winner" : "") });
    row.append(el("span", { class: "name" }, answer), el("span", { class: "fill", style: `width:${(100 * v) / max}%` }),
      el("span", { class: "count" }, fmt(v, 3)));
    return row;
  });
  const extra = note ? [el("p", { class: "sub" }, note)] : [];
  if (e.extra.tie) extra.push(el("p", { class: "sub" }, "tie between " + e.extra.tied.join(", ")));
  if (dropped) extra.push(el("p", { class: "sub" }, "excluded: " + dropped));
  box.replaceChildren(...bars, ...extra);
}

function renderCost(s) {
  const util = s.roofline_time && s.measured_time ? pct(s.roofline_time / s.measured_time) : "–";
  fillKv($("#run-cost"), [
    ["generated tokens", s.generated_tokens], ["prompt tokens computed / cached",
      `${s.computed_prompt_tokens} / ${s.cached_prompt_tokens}`],
    ["forks", s.forks], ["peak KV blocks", s.peak_kv_blocks],
    ["wall time", fmt(s.wall_time) + " s"], ["FLOPs", fmt(s.flops)], ["bytes", fmt(s.bytes)],
    ["roofline utilisation", util],
  ].map(([k, v]) => [k, String(v)]));
}

function unescape(s) {
  return s.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
}

async function startRun(ev) {
  ev.preventDefault();
  if (controller) controller.abort();
  controller = new AbortController();
  for (const id of ["#vote", "#answer", "#run-cost", "#node-detail"]) $(id).replaceChildren();
  $("#tree").replaceChildren();
  tree = null;
  const body = {
    question: $("#q").value,
    strategy: $("#strategy").value.trim(),
    scorer: $("#scorer").value,
    max_tokens: Number($("#max-tokens").value),
    temperature: Number($("#temperature").value),
    seed: $("#seed").value === "" ? null : Number($("#seed").value),
    step_delimiter: unescape($("#delimiter").value),
    max_step_tokens: Number($("#step-tokens").value),
    hygiene: $("#hygiene").checked,
  };
  $("#run").disabled = true;
  $("#stop").disabled = false;
  status("starting…");
  try {
    const r = await api("/v1/ttscale/runs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      status("refused: " + ((err.error && err.error.message) || "HTTP " + r.status), true);
      return;
    }
    await readEvents(r.body);
  } catch (e) {
    if (e.name !== "AbortError") status("error: " + e.message, true);
    else status("stopped");
  } finally {
    $("#run").disabled = false;
    $("#stop").disabled = true;
    controller = null;
  }
}

async function readEvents(stream) {
  // Server-sent events over a POST body: "event: kind\ndata: {json}\n\n" frames.
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      const event = JSON.parse(data);
      const handle = handlers[event.kind];
      if (handle) handle(event);
      scheduleRender();
    }
  }
}

// ---- Runs ------------------------------------------------------------------------------------

let runs = [];
let selectedRun = null;
const sortState = new Map();

function sortable(table, rows, render) {
  for (const th of table.querySelectorAll("th[data-key]")) {
    th.onclick = () => {
      const key = th.dataset.key;
      const prev = sortState.get(table.id);
      const dir = prev && prev.key === key ? -prev.dir : th.hasAttribute("data-num") ? -1 : 1;
      sortState.set(table.id, { key, dir });
      render();
    };
  }
  const s = sortState.get(table.id);
  if (!s) return rows;
  return [...rows].sort((a, b) => {
    const x = a[s.key], y = b[s.key];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * s.dir;
  });
}

async function loadRuns() {
  const r = await api("/v1/ttscale/eval-runs").catch((e) => ({ ok: false, status: e.message }));
  if (!r.ok) { $("#runs-root").textContent = "eval runs: HTTP " + r.status; return; }
  const data = await r.json();
  runs = data.runs.map((x) => ({
    ...x, n_strategies: x.strategies.length,
    best: Math.max(...x.strategies.map((s) => s.accuracy ?? 0), 0),
  }));
  $("#runs-root").textContent = runs.length ? `${runs.length} eval folder(s) under ${data.root}`
    : `no eval folders under ${data.root} (ttscale eval --out ${data.root}/NAME)`;
  renderRuns();
  for (const id of ["#cmp-a", "#cmp-b"]) {
    const sel = $(id);
    const keep = sel.value;
    sel.replaceChildren(...runs.map((x) => el("option", { value: x.name }, x.name)));
    if (keep) sel.value = keep;
  }
  if (runs.length > 1 && !$("#cmp-b").dataset.touched) $("#cmp-b").value = runs[1].name;
  if (selectedRun) showRun(runs.find((x) => x.name === selectedRun.name) || runs[0]);
}

function renderRuns() {
  const table = $("#runs-table");
  const rows = sortable(table, runs, renderRuns);
  table.querySelector("tbody").replaceChildren(...rows.map((x) => {
    const tr = el("tr", { class: "clickable" + (selectedRun && selectedRun.name === x.name ? " selected" : ""), "data-run": x.name });
    for (const v of [x.name, x.task ?? "–", x.model ?? "–", x.n_problems ?? "–", x.max_tokens ?? "–",
      x.n_strategies, pct(x.best), new Date(x.modified * 1000).toLocaleString()]) {
      tr.append(el("td", {}, String(v)));
    }
    tr.onclick = () => showRun(x);
    return tr;
  }));
}

function showRun(run) {
  if (!run) return;
  selectedRun = run;
  renderRuns();
  $("#run-detail").hidden = false;
  $("#run-title").textContent = `${run.name}: ${run.task ?? "?"} · ${run.model ?? "?"} · ${run.n_problems} problems · max ${run.max_tokens ?? "?"} tokens` +
    (run.complete ? "" : " (in progress: summary computed from the records so far)");
  renderStrategies();
  drawPareto();
}

function renderStrategies() {
  const table = $("#strategies-table");
  const rows = sortable(table, selectedRun.strategies, renderStrategies);
  table.querySelector("tbody").replaceChildren(...rows.map((s) => {
    const tr = el("tr");
    for (const v of [s.strategy, pct(s.accuracy), `${pct(s.accuracy_lo)} – ${pct(s.accuracy_hi)}`, pct(s.coverage),
      fmt(s.mean_candidates), fmt(s.mean_tokens), fmt(s.mean_wall_time), fmt(s.mean_flops),
      fmt(s.mean_peak_kv_blocks), pct(s.prompt_cache_share)]) {
      tr.append(el("td", {}, String(v)));
    }
    return tr;
  }));
}

function drawPareto() {
  const svg = $("#pareto");
  const key = document.querySelector("input[name=xaxis]:checked").value;
  const pts = selectedRun.strategies.filter((s) => s[key] > 0 && s.accuracy !== null);
  const W = 760, H = 360, L = 60, R = 110, T = 36, B = 48;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const parts = [];
  const title = `${selectedRun.task ?? "?"} · ${selectedRun.model ?? "?"} · ${selectedRun.n_problems} problems · max ${selectedRun.max_tokens ?? "?"} tokens`;
  parts.push(el("text", { x: W / 2, y: 18, "text-anchor": "middle", class: "title" }, title));
  if (!pts.length) {
    parts.push(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, `no strategy has a ${key}`));
    svg.replaceChildren(...parts);
    return;
  }
  // Cost spans orders of magnitude across strategies: log x.
  const xs = pts.map((s) => Math.log10(s[key]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 - x0 < 0.2) { x0 -= 0.1; x1 += 0.1; }
  x0 -= 0.05 * (x1 - x0); x1 += 0.05 * (x1 - x0);
  const sx = (v) => L + ((Math.log10(v) - x0) / (x1 - x0)) * (W - L - R);
  const sy = (a) => H - B - a * (H - T - B);
  parts.push(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  parts.push(el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (let a = 0; a <= 1.0001; a += 0.25) {
    parts.push(el("line", { x1: L, y1: sy(a), x2: W - R, y2: sy(a), class: "gridline" }));
    parts.push(el("text", { x: L - 6, y: sy(a) + 4, "text-anchor": "end" }, `${Math.round(a * 100)}%`));
  }
  // Ticks at 1, 2 and 5 per decade when the range is short, at powers of ten otherwise.
  const mantissas = x1 - x0 < 2 ? [1, 2, 5] : [1];
  for (let e = Math.floor(x0); e <= Math.ceil(x1); e++) {
    for (const m of mantissas) {
      const v = m * 10 ** e;
      if (Math.log10(v) < x0 || Math.log10(v) > x1) continue;
      parts.push(el("line", { x1: sx(v), y1: H - B, x2: sx(v), y2: H - B + 4, class: "axis" }));
      parts.push(el("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, fmt(v, 2)));
    }
  }
  parts.push(el("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" },
    key === "mean_flops" ? "FLOPs per problem (log)" : "seconds per problem (log)"));
  const ceil = selectedRun.ceiling;
  if (ceil) {
    parts.push(el("line", { x1: L, y1: sy(ceil.coverage), x2: W - R, y2: sy(ceil.coverage), class: "ceiling" }));
    parts.push(el("text", { x: L + 6, y: sy(ceil.coverage) - 5, "text-anchor": "start", class: "ceiling-label" },
      `pass@N ceiling ${pct(ceil.coverage)} (${ceil.strategy})`));
  }
  // The frontier: points no other point beats on both cost and accuracy.
  const sorted = [...pts].sort((a, b) => a[key] - b[key]);
  let best = -1;
  const front = sorted.filter((s) => (s.accuracy > best ? ((best = s.accuracy), true) : false));
  parts.push(el("polyline", { points: front.map((s) => `${sx(s[key])},${sy(s.accuracy)}`).join(" "), class: "frontier" }));
  const placed = []; // label positions so far: a label that would overlap one moves down
  for (const s of [...pts].sort((a, b) => b.accuracy - a.accuracy)) {
    const x = sx(s[key]);
    let ly = sy(s.accuracy) - 6;
    while (placed.some(([px, py]) => Math.abs(px - x) < 90 && Math.abs(py - ly) < 12)) ly += 12;
    placed.push([x, ly]);
    const g = el("g", { class: "point" });
    g.append(el("line", { x1: x, y1: sy(s.accuracy_lo ?? s.accuracy), x2: x, y2: sy(s.accuracy_hi ?? s.accuracy), class: "ci" }));
    g.append(el("circle", { cx: x, cy: sy(s.accuracy), r: 5 }));
    g.append(el("text", { x: x + 7, y: ly }, s.strategy));
    g.append(el("title", {}, `${s.strategy}: ${pct(s.accuracy)} [${pct(s.accuracy_lo)}, ${pct(s.accuracy_hi)}] at ${fmt(s[key])}`));
    parts.push(g);
  }
  if (pts.every((s) => s.accuracy === 0)) {
    parts.push(el("text", { x: W / 2, y: sy(0.5), "text-anchor": "middle", class: "warn" }, "every strategy scored 0%"));
  }
  svg.replaceChildren(...parts);
}

async function compareRuns(ev) {
  ev.preventDefault();
  const a = $("#cmp-a").value, b = $("#cmp-b").value;
  const table = $("#compare-table");
  if (!a || !b) { $("#compare-status").textContent = "pick two runs"; return; }
  $("#compare-status").textContent = "comparing…";
  let r, data;
  try {
    r = await api(`/v1/ttscale/eval-runs/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    data = await r.json();
  } catch (e) {
    $("#compare-status").textContent = e.message;
    return;
  }
  if (!r.ok) {
    $("#compare-status").textContent = (data.error && data.error.message) || "HTTP " + r.status;
    table.hidden = true;
    return;
  }
  $("#compare-status").textContent = `${b} against ${a}, on the problems both ran`;
  table.hidden = false;
  table.querySelector("tbody").replaceChildren(...data.strategies.map((s) => {
    const tr = el("tr", { class: s.p_value < 0.05 ? "significant" : "" });
    const ratios = Object.entries(s.cost_ratios).filter(([, v]) => v !== null).map(([k, v]) => `${k} ×${fmt(v, 2)}`).join(", ");
    for (const v of [s.strategy, s.n, pct(s.accuracy_a), pct(s.accuracy_b), pct(s.diff),
      `${pct(s.ci_lo)} – ${pct(s.ci_hi)}`, `${s.a_only} / ${s.b_only}`, fmt(s.p_value, 2), ratios || "–"]) {
      tr.append(el("td", {}, String(v)));
    }
    return tr;
  }));
}

// ---- start -----------------------------------------------------------------------------------

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("#api-key").value;
  sessionStorage.setItem("ttscale-api-key", apiKey);
  $("#key-form").hidden = true;
  showTab();
  if (currentTab !== "engine") pollEngine();
});
$("#run-form").addEventListener("submit", startRun);
$("#stop").addEventListener("click", () => controller && controller.abort());
$("#compare-form").addEventListener("submit", compareRuns);
$("#cmp-b").addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
for (const r of document.querySelectorAll("input[name=xaxis]")) r.addEventListener("change", drawPareto);
showTab();
if (currentTab !== "engine") pollEngine(); // once: the model's name, or that this is offline
