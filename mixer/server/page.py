"""The built-in page: the jobs at /, one job's live charts at /jobs/NAME.

No build step and no data in the HTML: a small hand-written script polls the JSON API
(http.py) every 1.5 s and redraws SVG, so the page honours the same reader tokens as any
other client (it asks for one when the API answers 401/403 and keeps it for the tab only).
Every domain's series is an SVG element with `data-domain="NAME"`; the weights chart carries
`data-version` (the newest version drawn), which tests and curious readers can look at.
Links are relative, so the page also works behind a reverse proxy under a path prefix.
"""

from __future__ import annotations

from html import escape

_CSS = """
:root{--fg:#1d2430;--muted:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;--bad:#b42318}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:baseline;gap:16px;padding:14px 24px;background:var(--card);border-bottom:1px solid var(--line)}
header h1{font-size:18px;margin:0}header a{color:inherit;text-decoration:none}
#status{margin-left:auto;color:var(--muted);font-size:12px}#status.bad{color:var(--bad)}
main{max-width:1180px;margin:0 auto;padding:18px 24px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin-bottom:16px}
.card h2{font-size:14px;margin:0 0 8px}.note{color:var(--muted);font-weight:normal;font-size:12px}
.facts{display:flex;flex-wrap:wrap;gap:8px 28px}.facts div{display:flex;flex-direction:column}
.facts b{font-size:18px}.facts span{color:var(--muted);font-size:12px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}@media(max-width:1000px){.grid{grid-template-columns:1fr}}
svg.chart{width:100%;height:auto;display:block}
.axes line{stroke:var(--line)}.axes text,.empty{fill:var(--muted);font-size:11px}
.bands path{stroke:#fff;stroke-width:.4}.lines path{stroke-width:1.6;fill:none}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:2px 0 10px}
.legend span{display:inline-flex;align-items:center;gap:6px}.legend i,.bar span{display:inline-block}
.legend i{width:11px;height:11px;border-radius:2px}.legend em{color:var(--muted);font-style:normal}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
th{color:var(--muted);font-weight:600;font-size:12px}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:flex;width:220px;height:12px;border-radius:3px;overflow:hidden;background:var(--line)}
a{color:#175cd3}form#login{display:flex;gap:8px;align-items:center}form#login input{flex:1;padding:6px}
"""

_JS_COMMON = r"""
"use strict";
const PALETTE = ["#4e79a7","#f28e2b","#e15759","#76b7b2","#59a14f","#edc948","#b07aa1","#ff9da7","#9c755f","#bab0ac"];
const color = i => i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360},55%,55%)`;
const SVGNS = "http://www.w3.org/2000/svg";
function make(ns, tag, attrs, kids) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
  for (const k of kids || []) e.append(k);  // strings become text nodes: names are never parsed as markup
  return e;
}
const h = (t, a, k) => make(null, t, a, k), s = (t, a, k) => make(SVGNS, t, a, k);
const fmt = x => x === null || x === undefined ? "–" : Number.isInteger(x) || Math.abs(x) >= 1000 ? Math.round(x).toLocaleString() : x.toPrecision(3);
const pct = w => (w * 100).toFixed(1) + "%";
const r1 = v => Math.round(v * 10) / 10;

// Bearer tokens: asked for when the API refuses, kept in sessionStorage (this tab only).
const TOKEN = "mixer-token";
async function api(path) {
  const token = sessionStorage.getItem(TOKEN), headers = token ? {Authorization: "Bearer " + token} : {};
  const res = await fetch(path, {headers, cache: "no-store"});
  const body = await res.json().catch(() => ({error: res.statusText}));
  if (res.status === 401 || res.status === 403) {
    const form = document.getElementById("login");
    form.hidden = false;
    form.querySelector(".why").textContent = body.error + ": paste a reader token";
  }
  if (!res.ok) throw new Error(body.error || "HTTP " + res.status);
  return body;
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN, ev.target.elements.token.value.trim());
  ev.target.hidden = true;
});
function poll(fn, ms) {
  const status = document.getElementById("status");
  const run = async () => {
    try { await fn(); status.textContent = "live · " + new Date().toLocaleTimeString(); status.className = ""; }
    catch (e) { status.textContent = "not updating: " + e.message; status.className = "bad"; }
    setTimeout(run, ms);
  };
  run();
}
function weightBar(domains, weights) {
  return h("div", {class: "bar"}, domains.map((d, i) => h("span", {"data-domain": d, title: d + " " + pct(weights[i]),
    style: `width:${weights[i] * 100}%;background:${color(i)}`})));
}
"""

_JS_INDEX = r"""
poll(async () => {
  const {jobs} = await api("api/jobs");
  const rows = jobs.map(j => h("tr", {"data-job": j.name}, [
    h("td", {}, [h("a", {href: "jobs/" + encodeURIComponent(j.name)}, [j.name])]),
    h("td", {}, [j.strategy]), h("td", {}, [j.status]), h("td", {}, [j.source_job || ""]),
    h("td", {class: "num"}, [fmt(j.version)]), h("td", {class: "num"}, [fmt(j.effective_step)]),
    h("td", {class: "num"}, [fmt(j.max_step)]), h("td", {class: "num"}, [fmt(j.reports)]),
    h("td", {}, [weightBar(j.domains, j.weights)])]));
  document.querySelector("#jobs tbody").replaceChildren(...rows);
  document.getElementById("empty").hidden = jobs.length > 0;
}, 2000);
"""

_JS_JOB = r"""
const JOB = document.body.dataset.job, BASE = "../api/jobs/" + encodeURIComponent(JOB);
const M = {l: 44, r: 12, t: 8, b: 24}, KEEP_VERSIONS = 2000, KEEP_STEPS = 4000;
const versions = new Map(), loss = new Map();  // version -> record; step -> {sum, tok}
let seq = null;

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * mag).find(x => x >= raw), out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}
// The viewBox is the chart's size in CSS pixels at its usual width, so 11px labels stay readable.
function frame(svg, x0, x1, y0, y1, yfmt, whole = false) {
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height");
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const X = v => r1(M.l + (x1 > x0 ? (v - x0) / (x1 - x0) : 0) * (W - M.l - M.r));
  const Y = v => r1(H - M.b - (y1 > y0 ? (v - y0) / (y1 - y0) : 0) * (H - M.t - M.b));
  const axes = s("g", {class: "axes"});
  for (const t of ticks(y0, y1, 4).filter(t => !whole || Number.isInteger(t))) axes.append(s("line", {x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t)}),
    s("text", {x: M.l - 6, y: Y(t) + 4, "text-anchor": "end"}, [yfmt(t)]));
  for (const t of ticks(x0, x1, Math.round(W / 90)).filter(t => !whole || Number.isInteger(t))) axes.append(s("text", {x: X(t), y: H - 8, "text-anchor": "middle"}, [fmt(t)]));
  svg.append(axes);
  return {X, Y};
}
function empty(svg, text) {
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren(s("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, [text]));
}

// Stacked areas, one band per domain: a version's weights hold from its effective step to the next one's.
function drawWeights(svg, domains, vs, end) {
  const first = vs[0].effective_step, last = vs[vs.length - 1].effective_step, x1 = Math.max(end ?? last, last, first + 1);
  const {X, Y} = frame(svg, first, x1, 0, 1, v => Math.round(v * 100) + "%");
  const cum = vs.map(v => { let c = 0; return [0, ...v.weights.map(w => c += w)]; });
  const xs = vs.map(v => X(v.effective_step)).concat([X(x1)]), n = vs.length, g = s("g", {class: "bands"});
  domains.forEach((d, i) => {
    let p = `M${xs[0]},${Y(cum[0][i + 1])}`;
    for (let k = 0; k < n; k++) p += `H${xs[k + 1]}` + (k + 1 < n ? `V${Y(cum[k + 1][i + 1])}` : "");
    p += `V${Y(cum[n - 1][i])}`;
    for (let k = n - 1; k >= 0; k--) p += `H${xs[k]}` + (k > 0 ? `V${Y(cum[k - 1][i])}` : "");
    g.append(s("path", {d: p + "Z", fill: color(i), "data-domain": d}, [s("title", {}, [d])]));
  });
  svg.append(g);
  svg.dataset.version = vs[n - 1].version;
}
function drawLoss(svg, domains, steps) {
  if (!steps.length) return empty(svg, "no loss reported yet");
  const mean = steps.map(st => { const a = loss.get(st); return a.sum.map((x, i) => a.tok[i] > 0 ? x / a.tok[i] : null); });
  const vals = mean.flat().filter(v => v !== null);
  let lo = Math.min(...vals), hi = Math.max(...vals);
  const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.06 || 1;
  const {X, Y} = frame(svg, steps[0], Math.max(steps[steps.length - 1], steps[0] + 1), lo - pad, hi + pad, fmt);
  const g = s("g", {class: "lines"});
  domains.forEach((d, i) => {
    let p = "";  // a step whose batches held none of a domain measured nothing there: the line goes across
    steps.forEach((st, k) => { const v = mean[k][i]; if (v !== null) p += `${p ? "L" : "M"}${X(st)},${Y(v)}`; });
    g.append(s("path", {d: p || "M0,0", stroke: color(i), "data-domain": d}, [s("title", {}, [d])]));
  });
  svg.append(g);
}
function drawLag(svg, vs) {
  const pts = vs.filter(v => v.applied_lag_steps !== null);
  if (!pts.length) return empty(svg, "no worker has reported applying a version yet");
  const hi = Math.max(1, ...pts.map(v => v.applied_lag_steps)), v0 = vs[0].version, v1 = Math.max(vs[vs.length - 1].version, v0 + 1);
  const {X, Y} = frame(svg, v0, v1, 0, hi, fmt, true), g = s("g", {class: "lines"});
  g.append(s("path", {d: pts.map((v, k) => `${k ? "L" : "M"}${X(v.version)},${Y(v.applied_lag_steps)}`).join(""), stroke: color(0)}));
  svg.append(g);
}
function legend(domains, job) {
  return domains.map((d, i) => h("span", {"data-domain": d}, [h("i", {style: "background:" + color(i)}), d,
    h("em", {}, [pct(job.weights[i]) + (job.loss && job.loss[i] !== null ? " · loss " + fmt(job.loss[i]) : "")])]));
}
const fact = (label, value) => h("div", {}, [h("b", {}, [String(value)]), h("span", {}, [label])]);

poll(async () => {
  const vq = versions.size ? "?after=" + Math.max(-1, Math.max(...versions.keys()) - 20) : "?tail=" + KEEP_VERSIONS;
  const [job, vr, lr] = await Promise.all([api(BASE), api(BASE + "/versions" + vq), api(BASE + "/loss" + (seq === null ? "" : "?after_seq=" + seq))]);
  for (const v of vr.versions) versions.set(v.version, v);  // recent ones again: their applied step may be new
  for (const k of [...versions.keys()].sort((a, b) => a - b).slice(0, -KEEP_VERSIONS)) versions.delete(k);
  if (lr.reset) loss.clear();
  for (const p of lr.points) {
    const a = loss.get(p.step) || {sum: p.loss_sum.map(() => 0), tok: p.tokens.map(() => 0)};
    p.loss_sum.forEach((x, i) => { a.sum[i] += x; a.tok[i] += p.tokens[i]; });
    loss.set(p.step, a);
  }
  seq = lr.next_seq;
  const steps = [...loss.keys()].sort((a, b) => a - b);
  for (const st of steps.slice(0, -KEEP_STEPS)) loss.delete(st);
  const vs = [...versions.values()].sort((a, b) => a.version - b.version), newest = vs[vs.length - 1];

  document.getElementById("title").textContent = job.name;
  document.getElementById("facts").replaceChildren(fact("strategy", job.strategy), fact("status", job.status),
    fact("version", job.version), fact("effective step", fmt(job.effective_step)), fact("newest step", fmt(job.max_step)),
    fact("reports", fmt(job.reports)), fact("applied-version lag (steps)", fmt(job.applied_lag_steps)),
    ...(job.source_job ? [h("div", {}, [h("b", {}, [h("a", {href: encodeURIComponent(job.source_job)}, [job.source_job])]), h("span", {}, ["derived from"])])] : []),
    ...(job.lineage ? [h("div", {id: "lineage"}, [h("b", {}, [job.lineage.source === "server" ? h("a", {href: encodeURIComponent(job.lineage.source_job)}, [job.lineage.source_job]) : job.lineage.source_job]),
      h("span", {}, [`prior from proxy (${job.lineage.average}, up to version ${job.lineage.final_version}, step ${fmt(job.lineage.max_step)}${job.lineage.source === "server" ? "" : ", " + job.lineage.source})`])])] : []));
  document.getElementById("legend").replaceChildren(...legend(job.domains, job));
  document.getElementById("loss-note").textContent = lr.log_job !== job.name ? `(from the log of ${lr.log_job})` : "";
  if (vs.length) drawWeights(document.getElementById("weights"), job.domains, vs, Math.max(job.max_step ?? 0, steps[steps.length - 1] ?? 0));
  drawLoss(document.getElementById("loss"), job.domains, steps.slice(-KEEP_STEPS));
  drawLag(document.getElementById("lag"), vs);
  document.querySelector("#versions tbody").replaceChildren(...vs.slice(-30).reverse().map(v => h("tr", {"data-version": v.version}, [
    h("td", {class: "num"}, [String(v.version)]), h("td", {class: "num"}, [fmt(v.effective_step)]),
    h("td", {class: "num"}, [v.trigger_step < 0 ? "–" : fmt(v.trigger_step)]), h("td", {class: "num"}, [fmt(v.applied_step)]),
    h("td", {class: "num"}, [fmt(v.applied_lag_steps)]), h("td", {}, [new Date(v.created_at * 1000).toLocaleTimeString()]),
    h("td", {}, [weightBar(job.domains, v.weights)])])));
  const topics = newest && newest.topic_weights_top, tcard = document.getElementById("topics");
  tcard.hidden = !topics;
  if (topics) tcard.querySelector("tbody").replaceChildren(...topics.map(([t, w]) => h("tr", {}, [h("td", {class: "num"}, [String(t)]), h("td", {class: "num"}, [fmt(w)])])));
}, 1500);
"""

_LOGIN = ('<form id="login" class="card" hidden><span class="why"></span>'
          '<input name="token" type="password" placeholder="mx_..." autocomplete="off"><button>use token</button></form>')


def _doc(title: str, body: str, script: str, body_attrs: str = "") -> bytes:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body{body_attrs}>{body}"
        f"<script>{_JS_COMMON}{script}</script></body></html>"
    ).encode()


def index_html() -> bytes:
    body = (
        '<header><h1><a href="./">mixer</a></h1><span class="note">jobs on this server</span><span id="status">loading…</span></header>'
        f'<main>{_LOGIN}<div class="card"><table id="jobs"><thead><tr><th>job</th><th>strategy</th><th>status</th>'
        '<th>derived from</th><th class="num">version</th><th class="num">effective step</th><th class="num">newest step</th>'
        '<th class="num">reports</th><th>weights</th></tr></thead><tbody></tbody></table>'
        '<p id="empty" class="note" hidden>No jobs yet: create one with <code>mixer job create SPEC.yaml</code>.</p></div></main>'
    )
    return _doc("mixer", body, _JS_INDEX)


def _chart(id_: str, label: str, width: int, height: int) -> str:
    return f'<svg class="chart" id="{id_}" width="{width}" height="{height}" role="img" aria-label="{label}"></svg>'


def job_html(name: str) -> bytes:
    body = (
        f'<header><h1><a href="../">mixer</a> / <span id="title">{escape(name)}</span></h1><span id="status">loading…</span></header>'
        f'<main>{_LOGIN}<div class="card"><div class="facts" id="facts"></div></div>'
        '<div class="card"><div class="legend" id="legend"></div><div class="grid">'
        '<div><h2>Domain weights <span class="note">stacked · x: effective step</span></h2>' + _chart("weights", "domain weights", 520, 250) + "</div>"
        '<div><h2>Training loss per token <span class="note">x: step <span id="loss-note"></span></span></h2>' + _chart("loss", "loss per domain", 520, 250) + "</div>"
        "</div></div>"
        '<div class="grid"><div class="card"><h2>Versions <span class="note">newest 30</span></h2><table id="versions"><thead><tr>'
        '<th class="num">version</th><th class="num">effective step</th><th class="num">computed at step</th>'
        '<th class="num">applied at step</th><th class="num">lag</th><th>created</th><th>weights</th></tr></thead><tbody></tbody></table></div>'
        '<div><div class="card"><h2>Applied-version lag <span class="note">x: version · y: steps from its effective step to a worker first applying it</span></h2>'
        + _chart("lag", "applied-version lag", 320, 170)
        + '</div><div class="card" id="topics" hidden><h2>Top topic weights <span class="note">newest version</span></h2>'
        '<table><thead><tr><th class="num">topic</th><th class="num">weight</th></tr></thead><tbody></tbody></table></div></div></div></main>'
    )
    return _doc(f"mixer · {name}", body, _JS_JOB, f' data-job="{escape(name)}"')
