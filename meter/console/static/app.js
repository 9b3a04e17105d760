// meter console: reads the admin API (/api/report, /api/budgets, /api/requests) and draws
// the page.  Every value from the ledger goes in as text (textContent), never as HTML:
// key names, models and tags are chosen by clients.
"use strict";
(function () {
  const TOKEN_KEY = "meter-admin-token";
  const $ = (id) => document.getElementById(id);
  const needsToken = document.body.dataset.auth === "token";

  class Unauthorized extends Error {}

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  // A report that cannot see every record says how many it misses (Meter-Report-Pending:
  // the ledger is failing or behind); `notes.pending` keeps the largest count seen.
  async function api(path, notes) {
    const headers = {};
    if (needsToken) headers.Authorization = "Bearer " + (token() || "");
    const res = await fetch(path, { headers });
    if (res.status === 401) throw new Unauthorized("the admin token was refused");
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || res.statusText);
    const pending = res.headers.get("Meter-Report-Pending");
    if (notes && pending !== null) notes.pending = Math.max(notes.pending || 0, Number(pending));
    return body;
  }

  function showPending(count) {
    const note = $("pending");
    note.hidden = count === undefined;
    note.textContent = count === undefined ? ""
      : count > 0 ? `${fmtInt(count)} requests are not in the ledger yet (it is failing or behind): they are not in these figures.`
      : "The ledger is failing: requests meter could not write yet are not in these figures.";
  }

  // ---- formatting ----------------------------------------------------------
  const int = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => int.format(n || 0);
  // A cost as `meter report`'s table writes it: every digit to the ninth decimal (the
  // ledger's), trailing zeros dropped down to two.  Held as whole nano-dollars (a BigInt)
  // so a total is exact: a float sum, or 6 decimals, differed from the report's figure.
  const NANO = 1000000000n;
  function nanos(v) {
    // The report's JSON numbers arrive as floats; 9 decimals of any cost below a million
    // dollars are within a float's digits, so toFixed(9) gives back the ledger's value.
    const text = typeof v === "number" ? v.toFixed(9) : String(v);
    const negative = text.startsWith("-");
    const [whole, frac = ""] = text.replace("-", "").split(".");
    const n = BigInt(whole || "0") * NANO + BigInt((frac + "000000000").slice(0, 9));
    return negative ? -n : n;
  }
  function fmtNanos(n) {
    const negative = n < 0n, size = negative ? -n : n;
    const frac = String(size % NANO).padStart(9, "0").replace(/0+$/, "").padEnd(2, "0");
    return (negative ? "-" : "") + String(size / NANO) + "." + frac;
  }
  const fmtCost = (v) => (v === null || v === undefined ? "" : fmtNanos(nanos(v)));
  const fmtMoney = (v) => "$" + (v >= 100 ? v.toFixed(2) : v.toFixed(4));
  const pct = (part, whole) => (whole > 0 ? ((100 * part) / whole).toFixed(1) + "%" : "–");
  function fmtShort(v) {
    if (v >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return String(Math.round(v * 1e4) / 1e4);
  }
  function fmtLatency(ms) {
    if (ms === null || ms === undefined) return "";
    return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms";
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function keyCell(tr, name, hint) {
    const td = cell(tr, name === null ? "(no key)" : name);
    td.dataset.key = name === null ? "" : name;
    if (hint) {
      const span = document.createElement("span");
      span.className = "hint";
      span.textContent = hint;
      td.appendChild(span);
    }
  }

  // ---- the view's arguments -----------------------------------------------
  function query(extra) {
    const p = new URLSearchParams();
    // Dates, when given, replace the range (as `meter report --since/--until`: a bare
    // `until` date includes that day).
    const from = $("f-since").value, to = $("f-until").value;
    const since = from || to ? from : $("range").value;
    if (since) p.append("since", since);
    if (to) p.append("until", to);
    const key = $("f-key").value.trim(), model = $("f-model").value.trim(), tag = $("f-tag").value.trim();
    if (key) p.append("where", "key=" + key);
    if (model) p.append("where", "model=" + model);
    if (tag) p.append("where", "tag:" + tag);
    for (const [k, v] of extra) p.append(k, v);
    return p;
  }

  function bucket() {
    const chosen = $("bucket").value;
    if (chosen !== "auto") return chosen;
    if ($("f-since").value || $("f-until").value) {
      const from = Date.parse($("f-since").value || "1970-01-01"), to = $("f-until").value ? Date.parse($("f-until").value) : Date.now();
      return to - from < 3 * 86400e3 ? "hour" : "day";
    }
    return ["1h", "24h"].includes($("range").value) ? "hour" : "day";
  }

  // Every hour or day from the range's start (or the first row's) to now (or the last row's).
  function bucketLabels(kind, rows) {
    const seen = rows.map((r) => r[kind]).filter((b) => b !== null).sort();
    const stepMs = kind === "hour" ? 3600e3 : 86400e3;
    const floor = (ms) => Math.floor(ms / stepMs) * stepMs;
    const parse = (b) => Date.parse(kind === "hour" ? b : b + "T00:00:00Z");
    const spans = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3, "90d": 90 * 86400e3 };
    const custom = $("f-since").value || $("f-until").value;
    const span = custom ? undefined : spans[$("range").value];
    let start = span ? floor(Date.now() - span) : seen.length ? parse(seen[0]) : null;
    let end = span ? floor(Date.now()) : seen.length ? parse(seen[seen.length - 1]) : null;
    if (custom) {
      const from = $("f-since").value, to = $("f-until").value;
      if (from) start = floor(Date.parse(from));
      end = to ? floor(Date.parse(to) + 86400e3 - 1) : floor(Date.now());
      if (start === null) start = end;
    }
    if (start === null) return [];
    if ((end - start) / stepMs > 2000) return seen.filter((b, i) => seen.indexOf(b) === i);
    const out = [];
    for (let t = start; t <= end; t += stepMs) {
      const iso = new Date(t).toISOString();
      out.push(kind === "hour" ? iso.slice(0, 13) + ":00:00Z" : iso.slice(0, 10));
    }
    return out;
  }

  const metricOf = {
    cost_usd: (r) => Number(r.cost_usd || 0),
    tokens: (r) => (r.input_tokens || 0) + (r.output_tokens || 0),
    requests: (r) => r.requests,
  };

  function drawChart(rows, kind, split) {
    const metric = $("metric").value;
    const value = metricOf[metric];
    const labels = bucketLabels(kind, rows);
    const index = new Map(labels.map((b, i) => [b, i]));
    const groupName = (r) => (r[split] === null ? "(none)" : String(r[split]));
    const sums = new Map();
    for (const r of rows) sums.set(groupName(r), (sums.get(groupName(r)) || 0) + value(r));
    // The eight largest groups by name; the rest as one "other".
    const ranked = [...sums.entries()].sort((a, b) => b[1] - a[1]).map(([n]) => n);
    const shown = ranked.slice(0, 8);
    const series = shown.map((name) => ({ name, values: new Array(labels.length).fill(0) }));
    const other = { name: "other", values: new Array(labels.length).fill(0) };
    for (const r of rows) {
      const i = index.get(r[kind]);
      if (i === undefined) continue;
      const s = shown.indexOf(groupName(r));
      (s >= 0 ? series[s] : other).values[i] += value(r);
    }
    if (ranked.length > shown.length) series.push(other);
    const fmt = metric === "cost_usd" ? (v) => "$" + fmtShort(v) : fmtShort;
    const what = { cost_usd: "Cost", tokens: "Tokens", requests: "Requests" }[metric];
    $("chart-title").textContent = `${what} per ${kind} by ${split}`;
    // An hour's axis label without its date's year and zone: "11-30 14:00".
    const shownLabels = kind === "hour" ? labels.map((b) => b.slice(5, 10) + " " + b.slice(11, 16)) : labels;
    window.meterChart.drawStackedBars($("chart"), { buckets: shownLabels, series, format: fmt });
  }

  function drawTable(rows) {
    const body = $("by-key-model").tBodies[0];
    body.textContent = "";
    const total = { requests: 0, input_tokens: 0, cached_tokens: 0, output_tokens: 0, reasoning_tokens: 0, cost: 0n, priced: false, unpriced: 0, errors: 0 };
    for (const r of rows) {
      const tr = document.createElement("tr");
      keyCell(tr, r.key, r.key_hint);
      const model = cell(tr, r.model === null ? "(none)" : r.model, "clip");
      model.dataset.model = r.model === null ? "" : r.model;
      model.title = model.textContent;
      cell(tr, fmtInt(r.requests), "num");
      cell(tr, fmtInt(r.input_tokens), "num");
      cell(tr, fmtInt(r.output_tokens), "num");
      cell(tr, pct(r.cached_tokens, r.input_tokens), "num");
      cell(tr, pct(r.reasoning_tokens, r.output_tokens), "num");
      cell(tr, fmtCost(r.cost_usd), "num").dataset.cost = r.cost_usd === null ? "" : String(r.cost_usd);
      cell(tr, fmtInt(r.unpriced_requests), "num");
      cell(tr, fmtInt(r.errors), r.errors ? "num outcome-bad" : "num");
      body.appendChild(tr);
      for (const k of ["requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"]) total[k] += r[k];
      if (r.cost_usd !== null) { total.cost += nanos(r.cost_usd); total.priced = true; }
      total.unpriced += r.unpriced_requests;
      total.errors += r.errors;
    }
    const foot = $("by-key-model").tFoot;
    foot.textContent = "";
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "No requests in this range.", "empty").colSpan = 10;
      body.appendChild(tr);
    }
    const tr = document.createElement("tr");
    cell(tr, "Total");
    cell(tr, "");
    cell(tr, fmtInt(total.requests), "num");
    cell(tr, fmtInt(total.input_tokens), "num");
    cell(tr, fmtInt(total.output_tokens), "num");
    cell(tr, pct(total.cached_tokens, total.input_tokens), "num");
    cell(tr, pct(total.reasoning_tokens, total.output_tokens), "num");
    cell(tr, total.priced ? fmtNanos(total.cost) : "", "num");
    cell(tr, fmtInt(total.unpriced), "num");
    cell(tr, fmtInt(total.errors), "num");
    foot.appendChild(tr);
    $("total-cost").textContent = total.priced ? fmtMoney(Number(total.cost) / 1e9) : "–";
    $("total-requests").textContent = fmtInt(total.requests);
    $("total-tokens").textContent = fmtInt(total.input_tokens + total.output_tokens);
    $("total-errors").textContent = fmtInt(total.errors);
    fillList("keys", rows.map((r) => r.key));
    fillList("models", rows.map((r) => r.model));
  }

  function fillList(id, values) {
    const list = $(id);
    const have = new Set([...list.options].map((o) => o.value));
    for (const v of values) {
      if (v === null || have.has(v)) continue;
      have.add(v);
      const o = document.createElement("option");
      o.value = v;
      list.appendChild(o);
    }
  }

  function drawBudgets(rows) {
    const box = $("budgets");
    box.textContent = "";
    if (!rows.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No budgets configured ([[budgets]] in the config file).";
      box.appendChild(p);
      return;
    }
    for (const b of rows) {
      const row = document.createElement("div");
      row.className = "budget";
      const name = document.createElement("div");
      name.textContent = `${b.budget} (${b.window}, ${b.mode})`;
      const bar = document.createElement("div");
      bar.className = "bar" + (b.state !== "ok" ? " over" : b.share >= 0.8 ? " warn" : "");
      const fill = document.createElement("div");
      fill.style.width = Math.min(100, 100 * b.share).toFixed(1) + "%";
      bar.appendChild(fill);
      const text = document.createElement("div");
      text.textContent = `$${fmtCost(b.spend_usd)} of $${fmtCost(b.limit_usd)} (${(100 * b.share).toFixed(1)}%) ${b.state}`;  // the report's digits: $0.001 is not $0.00
      row.append(name, bar, text);
      box.appendChild(row);
    }
  }

  function drawLatest(rows) {
    const body = $("latest").tBodies[0];
    body.textContent = "";
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "No requests in this range.", "empty").colSpan = 11;
      body.appendChild(tr);
    }
    for (const r of rows) {
      const tr = document.createElement("tr");
      cell(tr, r.started_at ? r.started_at.replace("T", " ").slice(0, 19) : "");
      keyCell(tr, r.key, r.key_hint);
      cell(tr, r.model, "clip").title = r.model || "";
      cell(tr, r.service_tier);
      cell(tr, r.input_tokens === null ? "" : fmtInt(r.input_tokens), "num");
      cell(tr, r.cached_tokens === null ? "" : fmtInt(r.cached_tokens), "num");
      cell(tr, r.output_tokens === null ? "" : fmtInt(r.output_tokens), "num");
      cell(tr, r.reasoning_tokens === null ? "" : fmtInt(r.reasoning_tokens), "num");
      cell(tr, fmtCost(r.cost_usd), "num");
      cell(tr, fmtLatency(r.duration_ms), "num");
      const ok = r.outcome === "completed" || r.outcome === "in_progress";
      const outcome = [r.outcome, r.status_code, r.error_type].filter((x) => x !== null && x !== undefined).join(" ");
      cell(tr, outcome, ok ? "outcome-ok" : "outcome-bad");
      body.appendChild(tr);
    }
  }

  let last = null; // the latest over-time rows, redrawn when only the metric changes

  async function load() {
    const kind = bucket();
    // As the report names its column: `Model` or `tag:Team` typed is `model`, `tag:team`.
    const split = ($("split").value.trim() || "key").toLowerCase();
    $("status").textContent = "loading…";
    $("error").hidden = true;
    const notes = {};
    try {
      const [series, table, budgets, latest] = await Promise.all([
        api("/api/report?" + query([["by", kind], ["by", split]]), notes),
        api("/api/report?" + query([["by", "key"], ["by", "model"]]), notes),
        api("/api/budgets"),
        api("/api/requests?" + query([["limit", "50"]])),
      ]);
      last = { series, kind, split };
      drawChart(series, kind, split);
      drawTable(table);
      drawBudgets(budgets);
      drawLatest(latest);
      showPending(notes.pending);
      $("status").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
    } catch (err) {
      if (err instanceof Unauthorized) return signOut("The admin token was refused; sign in again.");
      $("status").textContent = "";
      showPending(undefined);
      $("error").textContent = err.message;
      $("error").hidden = false;
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
    }
  }

  // ---- signing in ------------------------------------------------------------
  function showConsole() {
    $("signin").hidden = true;
    $("console").hidden = false;
    $("signout").hidden = !needsToken;
    load();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("console").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    try {
      await api("/api/budgets");
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("signin-error").textContent = err instanceof Unauthorized ? "Wrong token: meter refused it." : err.message;
      return;
    }
    $("signin-error").textContent = "";
    showConsole();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signOut(""));
    $("filters").addEventListener("submit", (e) => { e.preventDefault(); load(); });
    for (const id of ["range", "bucket"]) $(id).addEventListener("change", load);
    $("metric").addEventListener("change", () => last && drawChart(last.series, last.kind, last.split));
    if (needsToken && !token()) signOut("");
    else showConsole();
  });
})();
