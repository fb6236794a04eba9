/**
 * The operator page served at /ui: one self-contained HTML document (inline CSS and JS, no
 * external requests; the server's Content-Security-Policy allows nothing else). It polls
 * ./ui/api/state every second and renders tables and SVG loss curves. Text from the server is
 * inserted with textContent only.
 */
export const UI_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qlora · operator</title>
<style>
  :root { --bg:#0f1419; --panel:#171e26; --fg:#e6e6e6; --dim:#8b98a5; --accent:#4fb3ff; --ok:#3fb950; --bad:#f85149; --warn:#d29922; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--fg); }
  header { display:flex; align-items:baseline; gap:16px; padding:12px 20px; border-bottom:1px solid #263040; }
  header h1 { font-size:18px; margin:0; }
  header .dim { color:var(--dim); }
  main { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap:16px; padding:16px 20px; }
  section { background:var(--panel); border-radius:8px; padding:12px 16px; }
  section h2 { font-size:14px; text-transform:uppercase; letter-spacing:.06em; color:var(--dim); margin:0 0 8px; }
  .figures { display:flex; gap:24px; flex-wrap:wrap; }
  .figure .v { font-size:28px; font-weight:600; color:var(--accent); font-variant-numeric: tabular-nums; }
  .figure .l { color:var(--dim); font-size:12px; }
  table { width:100%; border-collapse:collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align:left; padding:4px 6px; border-bottom:1px solid #222c38; white-space:nowrap; }
  th { color:var(--dim); font-weight:500; font-size:12px; }
  td.num, th.num { text-align:right; }
  .empty { color:var(--dim); font-style:italic; padding:6px 0; }
  .state-running { color:var(--accent); } .state-succeeded { color:var(--ok); } .state-failed { color:var(--bad); }
  .state-queued { color:var(--warn); } .state-cancelled { color:var(--dim); }
  .pill { display:inline-block; padding:0 8px; border-radius:10px; font-size:12px; }
  .SERVING { background:#12351d; color:var(--ok); } .NOT_SERVING { background:#3d1214; color:var(--bad); }
  #status { margin-left:auto; font-size:12px; }
  #status.err { color:var(--bad); }
  .job { border-top:1px solid #222c38; padding:8px 0; }
  .job .head { display:flex; gap:12px; align-items:baseline; flex-wrap:wrap; }
  svg.curve { width:100%; height:120px; background:#11171e; border-radius:4px; margin-top:4px; }
  svg.curve .loss { fill:none; stroke:var(--accent); stroke-width:1.5; }
  svg.curve .eval { fill:none; stroke:var(--warn); stroke-width:1.5; stroke-dasharray:4 3; }
  svg.curve text { fill:var(--dim); font-size:10px; }
  form#login { display:none; gap:8px; padding:12px 20px; }
  form#login input { flex:1; background:#0b0f14; color:var(--fg); border:1px solid #263040; border-radius:4px; padding:6px; }
</style>
</head>
<body>
<header>
  <h1>qlora</h1><span class="dim" id="services"></span>
  <span id="status">connecting…</span>
</header>
<form id="login"><input id="token" type="password" placeholder="bearer token (needs qlora.http.Operator/View)" autocomplete="off"><button>use token</button></form>
<main>
  <section id="overview">
    <h2>Inference</h2>
    <div class="figures">
      <div class="figure"><div class="v" id="tps">–</div><div class="l">tokens/s (10 s)</div></div>
      <div class="figure"><div class="v" id="running">–</div><div class="l">generating</div></div>
      <div class="figure"><div class="v" id="waiting">–</div><div class="l">waiting for first token</div></div>
      <div class="figure"><div class="v" id="requests">–</div><div class="l">requests</div></div>
      <div class="figure"><div class="v" id="tokens">–</div><div class="l">tokens generated</div></div>
    </div>
    <div id="health" style="margin-top:8px"></div>
  </section>
  <section>
    <h2>Base models</h2>
    <table><thead><tr><th>model</th><th>quant</th><th>type</th><th class="num">context</th><th class="num">resident</th></tr></thead><tbody id="models"></tbody></table>
    <div class="empty" id="models-empty">no base model loaded yet</div>
  </section>
  <section>
    <h2>Adapters</h2>
    <table><thead><tr><th>adapter</th><th>base</th><th class="num">rank</th><th class="num">in use</th><th class="num">resident</th><th class="num">load</th></tr></thead><tbody id="adapters"></tbody></table>
    <div class="empty" id="adapters-empty">no adapter resident</div>
  </section>
  <section>
    <h2>Live requests</h2>
    <table><thead><tr><th>#</th><th>model</th><th class="num">age</th><th class="num">tokens</th><th class="num">tok/s</th></tr></thead><tbody id="live"></tbody></table>
    <div class="empty" id="live-empty">idle</div>
  </section>
  <section id="trainer-section">
    <h2>Training jobs</h2>
    <div id="jobs"></div>
    <div class="empty" id="jobs-empty">no trainer on this server</div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
let token = sessionStorage.getItem("qlora-token") || "";
const m = /[#&]token=([^&]+)/.exec(location.hash);
if (m) { token = decodeURIComponent(m[1]); sessionStorage.setItem("qlora-token", token); history.replaceState(null, "", location.pathname); }

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = String(text); if (cls) e.className = cls; return e; }
function row(cells) { const tr = document.createElement("tr"); for (const [t, num] of cells) tr.appendChild(el("td", t, num ? "num" : "")); return tr; }
function fill(id, rows) { const tb = $(id); tb.replaceChildren(...rows); $(id + "-empty").style.display = rows.length ? "none" : "block"; }
function bytes(n) { if (n >= 1 << 30) return (n / (1 << 30)).toFixed(2) + " GiB"; if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB"; if (n >= 1024) return (n / 1024).toFixed(1) + " KiB"; return n + " B"; }
function num(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
function ms(x) { return x >= 1000 ? (x / 1000).toFixed(1) + " s" : Math.round(x) + " ms"; }

function curve(points, evalPoints) {
  const svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("class", "curve");
  svg.setAttribute("viewBox", "0 0 400 120");
  svg.setAttribute("preserveAspectRatio", "none");
  const all = points.concat(evalPoints);
  if (all.length === 0) { const t = document.createElementNS(SVGNS, "text"); t.setAttribute("x", "8"); t.setAttribute("y", "64"); t.textContent = "no loss logged yet"; svg.appendChild(t); return svg; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const px = (x) => 30 + (x - x0) / (x1 - x0) * 362, py = (y) => 110 - (y - y0) / (y1 - y0) * 100;
  for (const [pts, cls] of [[points, "loss"], [evalPoints, "eval"]]) {
    if (!pts.length) continue;
    const p = document.createElementNS(SVGNS, "polyline");
    p.setAttribute("class", cls);
    p.setAttribute("points", pts.map((q) => px(q[0]).toFixed(1) + "," + py(q[1]).toFixed(1)).join(" "));
    svg.appendChild(p);
  }
  for (const [y, v] of [[14, y1], [112, y0]]) { const t = document.createElementNS(SVGNS, "text"); t.setAttribute("x", "2"); t.setAttribute("y", String(y)); t.textContent = v.toFixed(2); svg.appendChild(t); }
  return svg;
}

function render(s) {
  $("services").textContent = s.services.filter((n) => n.startsWith("qlora.")).join(" · ") + " · up " + s.uptimeS + " s";
  const inf = s.inference;
  $("tps").textContent = num(inf.tokensPerSecond, 1);
  $("running").textContent = inf.running;
  $("waiting").textContent = inf.waiting;
  $("requests").textContent = inf.totalRequests;
  $("tokens").textContent = inf.totalTokens;
  $("health").replaceChildren(...Object.entries(s.health).map(([k, v]) => { const p = el("span", k.replace(/^qlora\\.v1\\./, "") + " " + v, "pill " + v); p.style.marginRight = "6px"; return p; }));
  fill("models", inf.models.map((x) => row([[x.name], [x.quant], [x.modelType], [x.maxContext, 1], [bytes(x.residentBytes), 1]])));
  fill("adapters", inf.adapters.map((a) => row([[a.name + (a.unloading ? " (unloading)" : "")], [a.model + "/" + a.quant], [a.rank, 1], [a.refs, 1], [bytes(a.residentBytes), 1], [ms(a.loadMs), 1]])));
  fill("live", inf.live.map((r) => row([[r.id], [r.adapter ? r.model + ":" + r.adapter : r.model], [ms(r.ageMs), 1], [r.tokens, 1], [num(r.tokensPerSecond, 1), 1]])));
  const jobs = $("jobs");
  if (!s.trainer) { jobs.replaceChildren(); $("jobs-empty").textContent = "no trainer on this server"; $("jobs-empty").style.display = "block"; return; }
  $("jobs-empty").textContent = s.trainer.error ? "trainer unreachable: " + s.trainer.error : "no jobs yet";
  $("jobs-empty").style.display = s.trainer.jobs.length ? "none" : "block";
  jobs.replaceChildren(...s.trainer.jobs.map((j) => {
    const d = el("div", undefined, "job");
    const h = el("div", undefined, "head");
    h.appendChild(el("strong", j.id));
    h.appendChild(el("span", j.state, "state-" + j.state));
    h.appendChild(el("span", j.baseModel + " → " + j.outputAdapter));
    h.appendChild(el("span", "step " + j.step + "/" + j.totalSteps));
    h.appendChild(el("span", "loss " + num(j.loss, 4)));
    if (j.evalLoss !== null) h.appendChild(el("span", "eval " + num(j.evalLoss, 4)));
    h.appendChild(el("span", num(j.tokensPerSecond, 0) + " tok/s"));
    d.appendChild(h);
    if (j.error) d.appendChild(el("div", j.error, "state-failed"));
    d.appendChild(curve(j.losses, j.evalLosses));
    return d;
  }));
}

async function poll() {
  try {
    const headers = token ? { authorization: "Bearer " + token } : {};
    const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
    const r = await fetch(base + "api/state", { headers, cache: "no-store" });
    if (r.status === 401 || r.status === 403) { $("login").style.display = "flex"; throw new Error(r.status === 401 ? "a token is needed" : "this token may not view the page"); }
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("status").textContent = "live · " + new Date().toLocaleTimeString();
    $("status").className = "";
  } catch (e) {
    $("status").textContent = String(e.message || e);
    $("status").className = "err";
  }
}
$("login").addEventListener("submit", (ev) => { ev.preventDefault(); token = $("token").value.trim(); sessionStorage.setItem("qlora-token", token); $("login").style.display = "none"; poll(); });
poll();
setInterval(poll, 1000);
</script>
</body>
</html>
`;
