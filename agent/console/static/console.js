// plantgate console: polls the agent's JSON and updates the page in place.
// Everything from the agent (event data above all) is untrusted: it is only ever
// put into the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "plantgate.token";
const $ = (id) => document.getElementById(id);

const state = {
  tab: "overview",
  status: null,
  overview: null,
  lastUpdate: null,
  failing: false,
  asking: null,          // the token dialog's pending promise, so one refusal asks once
  selected: new Set(),   // dead letters ticked for replay
  deadLetters: [],
  actions: null,
  tagFilter: "",
  tags: null,
  shown: {},             // what each part last rendered, so an unchanged answer leaves the page alone
  declinedAt: 0,         // when the token dialog was last cancelled for reading
  shownDead: null,       // the dead letter shown in the detail panel
};

// True when ``data`` differs from what ``part`` last rendered (re-rendering the same rows would
// close an open select and move rows under the pointer).
function changed(part, data) {
  const text = JSON.stringify(data);
  if (state.shown[part] === text) return false;
  state.shown[part] = text;
  return true;
}

// --- small helpers ------------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "title") node.title = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function cell(text, cls) {
  return el("td", { class: cls }, text === null || text === undefined ? "–" : text);
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 120) return `${m} min ${Math.round(s % 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtUnix(t) {
  if (t === null || t === undefined) return "–";
  return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(t) {
  if (t === null || t === undefined) return "–";
  return `${fmtSeconds(Math.max(0, Date.now() / 1000 - t))} ago`;
}

function isoAgo(iso) {
  if (!iso) return "–";
  const t = Date.parse(iso);
  return Number.isNaN(t) ? iso : `${iso} (${fmtSeconds(Math.max(0, (Date.now() - t) / 1000))} ago)`;
}

function sinceText(since) {
  if (since === null || since === undefined) return "–";
  const t = typeof since === "number" ? since * 1000 : Date.parse(since);
  return Number.isNaN(t) ? String(since) : `${fmtSeconds(Math.max(0, (Date.now() - t) / 1000))} ago`;
}

function valueText(v) {
  if (v === null || v === undefined) return "–";
  return typeof v === "string" && v !== "" ? v : JSON.stringify(v);
}

function fillBody(table, rows) {
  table.tBodies[0].replaceChildren(...rows);
}

function facts(dl, pairs) {
  const nodes = [];
  for (const [name, value] of pairs) {
    nodes.push(el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "–" : value));
  }
  dl.replaceChildren(...nodes);
}

// --- HTTP: the token never goes into a URL, only into the Authorization header ----------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function call(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const saved = token();
  if (saved) headers.Authorization = `Bearer ${saved}`;
  const response = await fetch(path, { method: options.method || "GET", headers, body: options.body, cache: "no-store" });
  let body = null;
  const text = await response.text();
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  return { status: response.status, ok: response.ok, body };
}

function detailOf(answer) {
  const body = answer.body;
  if (body && typeof body === "object") return body.detail || body.error || `HTTP ${answer.status}`;
  return `HTTP ${answer.status}`;
}

// Asks for a token in a dialog; resolves true when one was given. Never shows a stored token.
function askToken(why) {
  if (state.asking) return state.asking;
  const dialog = $("token-dialog");
  $("token-why").textContent = why;
  $("token-input").value = "";
  state.asking = new Promise((resolve) => {
    const finish = (given) => {
      const value = $("token-input").value.trim();
      $("token-input").value = "";
      if (given && value) sessionStorage.setItem(TOKEN_KEY, value);
      dialog.close();
      state.asking = null;
      resolve(Boolean(given && value));
    };
    $("token-ok").onclick = () => finish(true);
    $("token-cancel").onclick = () => finish(false);
    $("token-input").onkeydown = (e) => { if (e.key === "Enter") { e.preventDefault(); finish(true); } };
    dialog.oncancel = (e) => { e.preventDefault(); finish(false); };
    dialog.showModal();
    $("token-input").focus();
  });
  return state.asking;
}

async function read(path) {
  let answer = await call(path);
  if (answer.status === 401 && Date.now() - state.declinedAt > 30000) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (await askToken("This agent listens beyond loopback: reading it needs its admin or ingest token.")) {
      answer = await call(path);
    } else {
      state.declinedAt = Date.now();  // not asked again at every poll
    }
  }
  if (answer.status === 401) throw new Error("reading this agent needs its token");
  return answer;
}

// --- the live marker ----------------------------------------------------------------------------

function markLive() {
  state.failing = false;
  state.lastUpdate = new Date();
  const live = $("live");
  live.dataset.state = "live";
  live.textContent = `live · updated ${state.lastUpdate.toLocaleTimeString()}`;
}

function markStale(reason) {
  state.failing = true;
  const live = $("live");
  live.dataset.state = "stale";
  const since = state.lastUpdate ? state.lastUpdate.toLocaleTimeString() : "never";
  live.textContent = `stale: ${reason} · last update ${since} · retrying`;
}

// --- Overview -----------------------------------------------------------------------------------

function renderOverview() {
  const status = state.status;
  const overview = state.overview;
  if (!status) return;
  const agent = status.agent || {};
  $("agent-name").textContent = `${agent.site || ""} / ${agent.id || ""}`;
  const config = overview
    ? (overview.config_path || `not known to the agent (data dir ${overview.data_dir})`)
    : "–";
  facts($("agent-facts"), [
    ["Agent", `${agent.id} at ${agent.site}`],
    ["State", agent.state],
    ["Version", agent.version],
    ["Uptime", fmtSeconds(agent.uptime_seconds)],
    ["Config file", config],
    ["Listening on", overview ? overview.listen : "–"],
    ["Replay and purge", overview ? overview.actions.detail : "–"],
  ]);
  const extra = (overview && overview.sources) || {};
  const rows = [];
  for (const [name, source] of Object.entries(status.sources || {})) {
    const more = extra[name] || {};
    const lastValue = more.last_value_time ? isoAgo(more.last_value_time)
      : (more.last_event_at ? `event ${ago(more.last_event_at)}` : "–");
    const degraded = Object.entries(source.degraded || {}).map(([item, why]) => `${item}: ${why}`);
    const info = Object.entries(source.info || {}).map(([k, v]) => `${k}=${v}`);
    rows.push(el("tr", { dataset: { source: name } },
      cell(name), cell(source.kind),
      cell(source.state, `state state-${source.state}`),
      cell(sinceText(source.since)), cell(lastValue, "last-value"),
      cell(source.last_error, source.last_error ? "error" : ""),
      cell(degraded.length ? degraded.join("\n") : "–", degraded.length ? "degraded error" : "degraded"),
      cell(info.join(", ") || "–")));
  }
  fillBody($("sources"), rows);

  const sinkRows = [];
  for (const [name, sink] of Object.entries(status.sinks || {})) {
    const lanes = Object.entries(sink.lanes || {});
    lanes.forEach(([lane, l], i) => {
      const first = i === 0;
      sinkRows.push(el("tr", { dataset: { sink: name, lane } },
        cell(first ? name : ""), cell(first ? sink.kind : ""),
        first ? cell(sink.state, `state state-${sink.state}`) : cell(""),
        cell(lane), cell(l.depth, "num"), cell(l.depth ? fmtSeconds(l.oldest_age_seconds) : "–", "num"),
        cell(`${l.rate_per_second}/s`, "num"),
        cell(!l.depth ? "–" : (l.drain_seconds === null ? "unknown (stalled)" : fmtSeconds(l.drain_seconds)), "num"),
        cell(first ? sink.dead_letters.count : "", "num"),
        cell(first ? sink.last_error : "", first && sink.last_error ? "error" : "")));
    });
  }
  fillBody($("sinks"), sinkRows);

  const buffer = status.buffer || {};
  const held = buffer.held || {};
  facts($("buffer-facts"), [
    ["File", buffer.path],
    ["Size", fmtBytes(buffer.size_bytes)],
    ["Headroom", `${fmtBytes(buffer.headroom_bytes)} (cap ${fmtBytes(buffer.max_size_bytes)}, disk free ${fmtBytes(buffer.disk_free_bytes)})`],
    ["Refusing writes", buffer.refusing_writes || "no"],
    ["Dead letters", buffer.dead_letters],
    ["Held by sequencing", held.count ? `${held.count} (oldest ${fmtSeconds(held.oldest_age_seconds)})` : "0"],
    ["Duplicates suppressed", buffer.duplicates_suppressed],
    ["Last sequence", buffer.last_sequence],
  ]);
  $("dead-count").textContent = buffer.dead_letters ? String(buffer.dead_letters) : "";
  const fixed = buffer.replayable_dead_letters;
  const hint = $("dead-replayable");
  hint.hidden = !(fixed && fixed.count);
  hint.textContent = fixed && fixed.count
    ? `${fixed.count} dead letter(s) made before any sink pass the mappings reloaded at ${fixed.mappings_reloaded_at}: they can be replayed now.`
    : "";
}

// --- Tags ---------------------------------------------------------------------------------------

function renderTags(force) {
  const data = state.tags;
  if (!data || (!changed("tags", data) && !force)) return;
  const filter = state.tagFilter.toLowerCase();
  const rows = [];
  for (const tag of data.tags) {
    const feeds = tag.feeds.map((f) => `${f.rule} (${f.as})`).join(", ");
    const haystack = `${tag.tag} ${tag.source} ${tag.kind} ${feeds}`.toLowerCase();
    if (filter && !haystack.includes(filter)) continue;
    rows.push(el("tr", { dataset: { tag: tag.tag } },
      cell(tag.tag, "mono"), cell(tag.source), cell(tag.kind),
      cell(valueText(tag.value), "value mono"),
      cell(tag.quality, tag.quality ? `quality-${tag.quality}` : ""),
      cell(tag.time), cell(feeds || "–")));
  }
  fillBody($("tags"), rows);
  fillBody($("rules"), data.rules.map((rule) => {
    const last = rule.last;
    return el("tr", { dataset: { rule: rule.name } },
      cell(rule.name), cell(rule.type), cell(rule.trigger), cell(rule.reads.join(", ") || "–"),
      cell(last ? last.id : "none yet", "mono"), cell(last ? last.subject : null), cell(last ? last.time : null));
  }));
}

// --- Events -------------------------------------------------------------------------------------

// Fetches ``path`` and shows its JSON (or why not) as text in ``pre``.
async function showJson(path, pre) {
  try {
    const answer = await read(path);
    pre.textContent = answer.ok ? JSON.stringify(answer.body, null, 2) : detailOf(answer);
  } catch (err) {
    pre.textContent = `not available: ${err.message || err}`;
  }
}

async function showEvent(id) {
  $("event-detail").hidden = false;
  $("event-detail-id").textContent = id;
  await showJson(`/v1/console/event?id=${encodeURIComponent(id)}`, $("event-json"));
}

function eventRow(e) {
  const row = el("tr", { class: "clickable", dataset: { id: e.id } },
    cell(e.id, "mono"), cell(e.type.replace(/^io\.plantgate\./, "")), cell(e.subject), cell(e.time), cell(e.sequence, "mono"));
  row.addEventListener("click", () => showEvent(e.id));
  return row;
}

function eventTable(events) {
  return el("table", { class: "grid" },
    el("thead", {}, el("tr", {}, el("th", {}, "Id"), el("th", {}, "Type"), el("th", {}, "Subject"),
      el("th", {}, "Time"), el("th", {}, "Sequence"))),
    el("tbody", {}, ...events.map(eventRow)));
}

function renderEvents(data) {
  if (!changed("events", data)) return;
  const blocks = [];
  for (const [lane, events] of Object.entries(data.lanes)) {
    blocks.push(el("h2", {}, `${lane} `, el("span", { class: "muted" }, `(last ${events.length} of at most ${data.per_lane})`)));
    const table = eventTable(events);
    table.dataset.lane = lane;
    blocks.push(table);
  }
  $("lanes").replaceChildren(...blocks);
}

function renderJourney(answer) {
  const box = $("journey");
  if (answer === null || !answer.ok || !answer.body || !Array.isArray(answer.body.entries)) {
    let why = "the agent has no journal endpoint";
    if (answer && answer.status === 404) why = "nothing known under this key";
    else if (answer && answer.status === 503) why = "the journal is disabled";
    else if (answer && answer.status === 401) why = "the journal needs the agent's token";
    else if (answer && answer.status) why = `${detailOf(answer)}`;
    const note = el("p", { class: "muted", id: "journey-missing" }, `journey not available: ${why}`);
    if (answer && answer.status === 401) {
      const button = el("button", { type: "button", id: "journey-token" }, "Enter the token");
      button.addEventListener("click", async () => {
        if (await askToken("The journey of an event needs the agent's token.")) search($("search-title").textContent);
      });
      note.append(" ", button);
    }
    box.replaceChildren(note);
    return;
  }
  const nodes = [];
  for (const entry of answer.body.entries) {
    nodes.push(el("h4", { class: "mono" }, `${entry.id} · ${entry.type} · ${entry.lane}`));
    const lines = [
      `committed ${fmtUnix(entry.committed)}`,
      entry.subject ? `subject ${entry.subject}` : null,
      entry.work_order ? `work order ${entry.work_order}` : null,
      entry.lot ? `lot ${entry.lot}` : null,
      entry.delivered ? `delivered ${fmtUnix(entry.delivered)}` : "not delivered yet",
      entry.outcome ? `${entry.outcome} ${fmtUnix(entry.outcome_at)}${entry.reference ? ` ref ${entry.reference}` : ""}${entry.reason ? `: ${entry.reason}` : ""}` : null,
    ].filter(Boolean);
    nodes.push(el("p", {}, lines.join(" · ")));
    nodes.push(el("ol", { class: "steps" }, ...(entry.steps || []).map((s) =>
      el("li", {}, [fmtUnix(s.at), s.step, s.sink, s.status, s.reference, s.detail].filter(Boolean).join(" · ")))));
  }
  box.replaceChildren(...nodes);
}

async function search(key) {
  $("search-result").hidden = false;
  $("search-title").textContent = key;
  const [local, trace] = await Promise.all([
    read(`/v1/console/search?key=${encodeURIComponent(key)}`).catch(() => null),
    call(`/v1/trace/${encodeURIComponent(key)}`).catch(() => null),
  ]);
  const events = local && local.ok ? local.body.events : [];
  $("search-events").replaceChildren(events.length
    ? eventTable(events)
    : el("p", { class: "muted" }, "none of the recent events the console keeps matches"));
  renderJourney(trace);
}

// --- Dead letters -------------------------------------------------------------------------------

function setResult(text, refused) {
  const box = $("dead-result");
  box.textContent = text;
  box.classList.toggle("refused", Boolean(refused));
}

function renderActions(actions) {
  state.actions = actions;
  const offered = actions && actions.offered;
  const note = $("dead-access");
  note.hidden = offered;
  note.textContent = offered ? "" : `Replay and purge are not offered here: ${actions ? actions.detail : "unknown"}`;
  const any = state.deadLetters.length > 0;
  $("replay-selected").disabled = !offered || state.selected.size === 0;
  $("replay-reason").disabled = !offered || !any;
  $("purge-dead").disabled = !offered || !any;
  $("replay-one").disabled = !offered || !state.deadLetters.some((d) => d.id === state.shownDead);
}

async function showDeadLetter(id) {
  state.shownDead = id;
  renderActions(state.actions);
  $("dead-detail").hidden = false;
  $("dead-detail-id").textContent = id;
  await showJson(`/v1/console/dead-letter?id=${encodeURIComponent(id)}`, $("dead-json"));
}

function renderDeadLetters(data) {
  if (!changed("dead", data)) return;
  state.deadLetters = data.dead_letters;
  const present = new Set(data.dead_letters.map((d) => d.id));
  for (const id of [...state.selected]) if (!present.has(id)) state.selected.delete(id);
  fillBody($("dead"), data.dead_letters.map((d) => {
    const box = el("input", { type: "checkbox", "aria-label": `Select ${d.id}` });
    box.checked = state.selected.has(d.id);
    box.addEventListener("click", (e) => e.stopPropagation());
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(d.id); else state.selected.delete(d.id);
      renderActions(state.actions);
    });
    const row = el("tr", { class: "clickable", dataset: { id: d.id } },
      el("td", {}, box), cell(d.id, "mono"), cell(d.type.replace(/^io\.plantgate\./, "")), cell(d.subject),
      cell(d.sink), cell(d.reason, "reason"), cell(`${fmtUnix(d.time)} (${ago(d.time)})`));
    row.addEventListener("click", () => showDeadLetter(d.id));
    return row;
  }));
  const select = $("reason-select");
  const chosen = select.value;
  select.replaceChildren(...Object.entries(data.reasons).map(([reason, n]) =>
    el("option", { value: reason }, `${reason} (${n})`)));
  if (chosen && data.reasons[chosen] !== undefined) select.value = chosen;
  if (data.total > data.dead_letters.length) {
    setResult(`showing the oldest ${data.dead_letters.length} of ${data.total} dead letters`);
  }
  renderActions(data.actions);
}

async function act(path, body, describe) {
  const send = () => call(path, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
  let answer;
  try {
    answer = await send();
  } catch (err) {
    setResult(`The agent did not answer: ${err}`, true);
    return null;
  }
  if (answer.status === 401) {
    const which = state.actions && state.actions.token ? state.actions.token : "admin";
    const hadToken = Boolean(token());
    sessionStorage.removeItem(TOKEN_KEY);
    setResult(`Refused: ${hadToken ? "the token was not accepted" : "no token given"}; this needs the agent's ${which} token.`, true);
    if (await askToken(`Replay and purge need the agent's ${which} token ([http] ${which}_token_file).`)) {
      answer = await send();
    }
  }
  if (answer.status === 401) {
    setResult(`Refused: ${detailOf(answer)}. Nothing was changed.`, true);
    return null;
  }
  if (answer.status === 403) {
    setResult(`Refused by the agent: ${detailOf(answer)}`, true);
    renderActions({ offered: false, token: null, detail: detailOf(answer) });
    return null;
  }
  if (!answer.ok) {
    setResult(`Failed: ${detailOf(answer)}`, true);
    return null;
  }
  setResult(describe(answer.body), false);
  await pollDeadLetters();
  return answer.body;
}

function replayed(result) {
  return `Replayed ${result.replayed}; ${result.failed} failed again${result.failed ? " (still dead letters, with the new reason)" : ""}.`;
}

function confirmPurge(text) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const finish = (yes) => { dialog.close(); resolve(yes); };
    $("confirm-ok").onclick = () => finish(true);
    $("confirm-cancel").onclick = () => finish(false);
    dialog.oncancel = (e) => { e.preventDefault(); finish(false); };
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

function wireDeadLetters() {
  $("replay-selected").addEventListener("click", async () => {
    const ids = [...state.selected];
    if (!ids.length) return;
    const result = await act("/v1/buffer/replay", { ids }, replayed);
    if (result) state.selected.clear();
  });
  $("replay-one").addEventListener("click", () => {
    if (state.shownDead) act("/v1/buffer/replay", { ids: [state.shownDead] }, replayed);
  });
  $("replay-reason").addEventListener("click", () => {
    const reason = $("reason-select").value;
    if (reason) act("/v1/buffer/replay", { reason }, replayed);
  });
  $("purge-dead").addEventListener("click", async () => {
    const n = state.deadLetters.length;
    const yes = await confirmPurge(`This deletes all ${n} dead letter(s) for good; they cannot be replayed afterwards.`);
    if (!yes) {
      setResult("Purge cancelled: nothing was removed.", false);
      return;
    }
    await act("/v1/buffer/purge", { dead_letters: true }, (r) => `Purged ${r.dead_letters} dead letter(s).`);
  });
  $("dead-all").addEventListener("change", (e) => {
    for (const d of state.deadLetters) {
      if (e.target.checked) state.selected.add(d.id); else state.selected.delete(d.id);
    }
    for (const box of $("dead").tBodies[0].querySelectorAll("input[type=checkbox]")) box.checked = e.target.checked;
    renderActions(state.actions);
  });
}

// --- polling ------------------------------------------------------------------------------------

async function pollDeadLetters() {
  const answer = await read("/v1/console/dead-letters").catch(() => ({ ok: false }));
  if (answer.ok) renderDeadLetters(answer.body);
  return answer;
}

async function poll() {
  try {
    const [status, overview] = await Promise.all([call("/status"), read("/v1/console/overview")]);
    if (!status.ok) throw new Error(`/status answered ${status.status}`);
    state.status = status.body;
    if (overview.ok) state.overview = overview.body;
    renderOverview();
    if (state.tab === "tags") {
      const tags = await read("/v1/console/tags");
      if (tags.ok) { state.tags = tags.body; renderTags(); }
    } else if (state.tab === "events") {
      const events = await read("/v1/console/events");
      if (events.ok) renderEvents(events.body);
    } else if (state.tab === "dead") {
      await pollDeadLetters();
    }
    markLive();
  } catch (err) {
    markStale(err instanceof TypeError ? "the agent does not answer" : String(err.message || err));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll("[role=tab]")) {
    const on = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(on));
    $(`page-${button.dataset.tab}`).hidden = !on;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function start() {
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.addEventListener("click", () => { showTab(button.dataset.tab); poll.now(); });
  }
  $("tag-filter").addEventListener("input", (e) => { state.tagFilter = e.target.value; renderTags(true); });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("search-key").value.trim();
    if (key) search(key);
  });
  wireDeadLetters();
  const wanted = location.hash.replace(/^#/, "");
  if (["overview", "tags", "events", "dead"].includes(wanted)) showTab(wanted);
  poll();
}

// A tab switch fetches at once instead of waiting for the next tick.
poll.now = () => {
  const run = async () => {
    try {
      if (state.tab === "tags") {
        const tags = await read("/v1/console/tags");
        if (tags.ok) { state.tags = tags.body; renderTags(); }
      } else if (state.tab === "events") {
        const events = await read("/v1/console/events");
        if (events.ok) renderEvents(events.body);
      } else if (state.tab === "dead") {
        await pollDeadLetters();
      } else {
        renderOverview();
      }
    } catch (_) { /* the regular poll marks the page stale */ }
  };
  run();
};

document.addEventListener("DOMContentLoaded", start);
