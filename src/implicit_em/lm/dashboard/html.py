"""The dashboard's static files: they open from the file system, with no server and nothing from the network.

``index.html`` loads ``data/index.js`` (one row per component: density, mean and max value, top tokens, a
sparkline of the activation histogram, dead marked) and builds the table in the page: sortable by clicking a
column, filterable by text, density and dead. Its rows are plain ``div`` grids in chunks of 200 with
``content-visibility: auto``, so of 16,384 rows only those near the screen are styled and laid out. Each row
links to ``component.html#J``, which loads ``data/meta.js`` and the one block file ``data/blocks/bNNNNNN.js``
holding component J (and its block's other components) and draws its page: top contexts with each token
highlighted by the component's value (the value on hover), samples from each activation quantile, the
histogram, the density, logit effects and the nearest components. Data files are ``<script>`` files (``fetch``
is refused on ``file://``); so is the pages' code (``data/index-page.js``, ``data/component-page.js``), which
keeps the DOM free of script text.

:func:`standalone_page` renders one component as a single self-contained HTML file (for W&B).
"""

from __future__ import annotations

import json
from pathlib import Path

CSS = r"""
:root { --fg:#1d2330; --muted:#687083; --line:#e3e6ec; --bg:#fafbfc; --accent:#d9480f; --link:#1c5fb8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { padding:14px 22px 10px; background:#fff; border-bottom:1px solid var(--line); }
h1 { font-size:19px; margin:0 0 4px; } h2 { font-size:15px; margin:18px 0 8px; }
.sub { color:var(--muted); font-size:13px; }
a { color:var(--link); text-decoration:none; } a:hover { text-decoration:underline; }
main { padding:12px 22px 40px; }
.controls { display:flex; gap:14px; align-items:center; flex-wrap:wrap; margin:4px 0 10px; font-size:13px; }
.controls input[type=search] { width:260px; padding:5px 8px; border:1px solid #c9ced8; border-radius:5px; font-size:13px; }
.controls input[type=number] { width:80px; padding:4px 6px; border:1px solid #c9ced8; border-radius:5px; }
.grid { display:grid; grid-template-columns: 70px 170px 110px 80px 150px minmax(200px,1fr); align-items:center; gap:0 10px; }
.head { position:sticky; top:0; background:#eef1f5; font-weight:600; font-size:12px; padding:6px 8px; border:1px solid var(--line); z-index:2; }
.head span { cursor:pointer; user-select:none; } .head span.on { color:var(--accent); }
.chunk { content-visibility:auto; }
.row { padding:3px 8px; border-bottom:1px solid var(--line); background:#fff; height:27px; overflow:hidden; }
.row:hover { background:#fff6ef; }
.row.dead { background:#f4f4f6; color:#9aa0ac; }
.num { font-variant-numeric: tabular-nums; text-align:right; }
.dens { display:flex; align-items:center; gap:6px; }
.bar { height:8px; background:#f1d3c2; border-radius:2px; flex:0 0 auto; }
.spark { font-family: ui-monospace,Menlo,Consolas,monospace; color:#c2551a; letter-spacing:-1px; white-space:pre; }
.toks { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; font-family: ui-monospace,Menlo,Consolas,monospace; font-size:12.5px; }
.badge { display:inline-block; font-size:11px; padding:0 5px; border-radius:3px; background:#e9ecf1; color:#4b5262; margin-left:4px; }
.badge.dead { background:#f3d6d6; color:#9b1c1c; }
.cards { display:flex; gap:12px; flex-wrap:wrap; margin:6px 0 4px; }
.card { background:#fff; border:1px solid var(--line); border-radius:7px; padding:8px 12px; min-width:130px; }
.card b { display:block; font-size:18px; } .card span { color:var(--muted); font-size:12px; }
.cols { display:grid; grid-template-columns: 340px minmax(0,1fr); gap:22px; align-items:start; }
.panel { background:#fff; border:1px solid var(--line); border-radius:7px; padding:10px 12px; margin-bottom:14px; }
.ctx { font-family: ui-monospace,Menlo,Consolas,monospace; font-size:12.5px; white-space:pre-wrap; word-break:break-word;
       padding:5px 6px; border-bottom:1px solid #f0f1f4; line-height:1.7; }
.ctx .val { display:inline-block; min-width:54px; color:var(--muted); font-size:11px; }
.ctx .lab { color:#6b4fbb; font-size:11px; margin-right:6px; }
.tok { border-radius:2px; padding:1px 0; }
.tok.max { outline:1.5px solid #b8430c; }
.tok:hover { outline:1.5px solid #1d2330; }
.qhead { font-size:12.5px; color:var(--muted); margin:10px 0 2px; }
.logits { display:grid; grid-template-columns: 1fr 1fr; gap:10px; font-size:12.5px; }
.logits div.l { display:flex; justify-content:space-between; gap:8px; padding:1px 5px; border-radius:3px; margin:1px 0;
                font-family: ui-monospace,Menlo,Consolas,monospace; white-space:pre; }
.logits div.l span:first-child { overflow:hidden; text-overflow:ellipsis; min-width:0; }
.logits div.l span:last-child { flex:0 0 auto; font-variant-numeric: tabular-nums; }
.near .nb { display:inline-block; margin:2px 12px 2px 0; white-space:nowrap; }
.nav { display:flex; gap:10px; align-items:center; font-size:13px; margin-top:6px; }
.nav input { width:90px; padding:3px 6px; border:1px solid #c9ced8; border-radius:5px; }
#tip { position:fixed; pointer-events:none; background:#1d2330; color:#fff; padding:3px 7px; border-radius:4px;
       font:12px ui-monospace,Menlo,Consolas,monospace; display:none; z-index:9; white-space:pre; }
.imgs { display:flex; flex-wrap:wrap; gap:6px; }
.imgs figure { margin:0; text-align:center; font-size:11px; color:var(--muted); }
canvas.px { image-rendering: pixelated; border:1px solid var(--line); }
.note { color:var(--muted); font-size:12px; }
"""

COMMON_JS = r"""
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c])); }
function fmt(v) { if (v === null || v === undefined || !isFinite(v)) return '–'; const a = Math.abs(v);
  if (a !== 0 && (a < 0.001 || a >= 1e5)) return v.toExponential(2); return v.toPrecision(3); }
function pct(p) { if (p === 0) return '0'; if (p < 1e-4) return (100 * p).toExponential(1) + '%'; return (100 * p).toPrecision(3) + '%'; }
"""

INDEX_JS = r"""
(function () {
  const t0 = performance.now();
  const D = window.DASH_INDEX, M = D.meta, rows = D.rows;  // [id, density, mean_active, max, top, spark, dead]
  document.title = 'Components · ' + M.title;
  document.getElementById('title').textContent = M.title;
  document.getElementById('sub').innerHTML = M.summary_html;
  const list = document.getElementById('list');
  let key = 1, desc = true;
  let order = rows.map((r, i) => i);
  const maxDens = Math.max(1e-12, ...rows.map(r => r[1]));
  function rowHtml(r) {
    const w = Math.max(1, Math.round(60 * Math.sqrt(r[1] / maxDens)));
    return '<div class="row grid' + (r[6] ? ' dead' : '') + '" data-component="' + r[0] + '">' +
      '<a href="component.html#' + r[0] + '">#' + r[0] + '</a>' +
      '<div class="dens"><div class="bar" style="width:' + (r[6] ? 0 : w) + 'px"></div>' + pct(r[1]) +
      (r[6] ? '<span class="badge dead">dead</span>' : '') + '</div>' +
      '<div class="num">' + fmt(r[2]) + '</div><div class="num">' + fmt(r[3]) + '</div>' +
      '<div class="spark" title="activation histogram, 0 to max">' + esc(r[5]) + '</div>' +
      '<div class="toks" title="' + esc(r[4]) + '">' + esc(r[4]) + '</div></div>';
  }
  function sortRows() {
    order.sort((a, b) => {
      const x = rows[a][key], y = rows[b][key];
      const c = typeof x === 'string' ? x.localeCompare(y) : x - y;
      return (desc ? -c : c) || rows[a][0] - rows[b][0];
    });
    document.querySelectorAll('.head span').forEach(s => {
      const on = +s.dataset.key === key; s.classList.toggle('on', on);
      s.textContent = s.dataset.label + (on ? (desc ? ' ▼' : ' ▲') : '');
    });
  }
  const q = document.getElementById('q'), hideDead = document.getElementById('hidedead'), minD = document.getElementById('mind');
  const shown = document.getElementById('shown');
  function keep(r) {
    const text = q.value.trim().toLowerCase(), lo = (parseFloat(minD.value) || 0) / 100;
    return (!hideDead.checked || !r[6]) && r[1] >= lo &&
      (!text || ('#' + r[0]) === text || String(r[0]) === text || r[4].toLowerCase().includes(text));
  }
  const CHUNK = 200, ROW = 27;
  function render() {
    sortRows();
    const ids = order.filter(i => keep(rows[i]));
    // rows in chunks that are styled and laid out only when near the screen (content-visibility: auto)
    const parts = [];
    for (let a = 0; a < ids.length; a += CHUNK) {
      const part = ids.slice(a, a + CHUNK);
      parts.push('<div class="chunk" style="contain-intrinsic-size:auto ' + (part.length * ROW) + 'px">' +
        part.map(i => rowHtml(rows[i])).join('') + '</div>');
    }
    list.innerHTML = parts.join('');
    shown.textContent = ids.length.toLocaleString() + ' of ' + rows.length.toLocaleString() + ' shown';
  }
  document.querySelectorAll('.head span').forEach(s => s.addEventListener('click', () => {
    const k = +s.dataset.key; if (k === key) desc = !desc; else { key = k; desc = k !== 0 && k !== 4; } render();
  }));
  let timer = null;
  [q, minD].forEach(el => el.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(render, 150); }));
  hideDead.addEventListener('change', render);
  render();
  void document.body.offsetHeight;  // style and layout included in the time
  const now = performance.now(), ms = now - t0;
  document.body.dataset.renderMs = ms.toFixed(0);  // building the table
  document.body.dataset.readyMs = now.toFixed(0);  // since the navigation started (data file loaded and parsed)
  document.getElementById('timing').textContent = 'table built in ' + ms.toFixed(0) + ' ms, page ready in ' + now.toFixed(0) + ' ms';
})();
"""

COMPONENT_JS = r"""
(function () {
  const M = window.DASH_META, cache = {};
  let want = null;
  const root = document.getElementById('root'), tip = document.getElementById('tip');
  function idNow() { if (M.only !== undefined) return M.only; const i = parseInt(location.hash.slice(1), 10); return isNaN(i) ? 0 : Math.max(0, Math.min(M.k - 1, i)); }
  window.DASH_BLOCK = function (b) { cache[b.first] = b; if (want !== null && want === b.first) show(); };
  function blockName(first) { return 'data/blocks/b' + String(first).padStart(6, '0') + '.js'; }
  function show() {
    const id = idNow(), first = Math.floor(id / M.block) * M.block;
    if (cache[first]) { want = null; draw(cache[first], cache[first].components[id - first]); return; }
    if (M.standalone) { root.textContent = 'component ' + id + ' is not in this page'; return; }
    want = first;
    const s = document.createElement('script');
    s.src = blockName(first);
    s.onerror = () => { root.textContent = 'could not load ' + blockName(first) + ' (is the data folder beside this page?)'; };
    document.head.appendChild(s);
  }
  function labelName(b, lab) { return b.labels && b.labels[lab] !== undefined ? b.labels[lab] : 'label ' + lab; }
  function link(j, text) { return M.standalone ? esc(text) : '<a href="#' + j + '">' + esc(text) + '</a>'; }
  function color(v, top) {
    if (!(top > 0) || v === 0) return '';
    const a = Math.min(1, Math.abs(v) / top);
    const alpha = (0.04 + 0.86 * Math.pow(a, 1.3)).toFixed(3);
    return v > 0 ? 'background:rgba(255,110,20,' + alpha + ')' : 'background:rgba(40,110,230,' + alpha + ')';
  }
  function shownText(s) { return s.replace(/\n/g, '↵').replace(/\t/g, '⇥'); }
  function ctxHtml(c, b, top) {
    let h = '<div class="ctx"><span class="val" title="the component\'s largest value here">' + fmt(c.v) + '</span>';
    if (c.lab !== undefined && c.lab >= 0) h += '<span class="lab">' + esc(labelName(b, c.lab)) + '</span>';
    const vocab = b.vocab;
    for (let i = 0; i < c.t.length; i++) {
      const v = c.a[i] * c.s / 1000, s = vocab[c.t[i]];
      h += '<span class="tok' + (i === c.p ? ' max' : '') + '" data-token="' + c.t[i] + '" data-v="' + v.toPrecision(4) +
        '" title="' + esc(JSON.stringify(s)) + ' ' + v.toPrecision(4) + '" style="' + color(v, top) + '">' + esc(shownText(s)) + '</span>';
    }
    return h + '</div>';
  }
  function imgCanvas(pixels, scale, signed) {
    const I = M.image, c = document.createElement('canvas');
    c.width = I.w; c.height = I.h; c.className = 'px'; c.style.width = (I.w * scale) + 'px'; c.style.height = (I.h * scale) + 'px';
    const ctx = c.getContext('2d'), img = ctx.createImageData(I.w, I.h), n = I.w * I.h;
    for (let p = 0; p < n; p++) {
      let rgb;
      if (signed) { const v = pixels[p] / 1000; rgb = v >= 0 ? [255, 255 * (1 - v), 255 * (1 - v)] : [255 * (1 + v), 255 * (1 + v), 255]; }
      else if (I.c === 3) rgb = I.layout === 'chw' ? [pixels[p], pixels[n + p], pixels[2 * n + p]] : [pixels[3 * p], pixels[3 * p + 1], pixels[3 * p + 2]];
      else rgb = [pixels[p], pixels[p], pixels[p]];
      img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * p);
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }
  function histSvg(hist, max) {
    const counts = hist.counts, n = counts.length;
    if (!n) return '<div class="note">never active</div>';
    const W = 310, H = 110, bw = W / n, top = Math.max(...counts), step = hist.top / hist.bins;
    let s = '<svg width="' + W + '" height="' + (H + 18) + '" role="img" aria-label="activation histogram">';
    counts.forEach((c, i) => {
      const h = c ? Math.max(1, H * c / top) : 0;
      s += '<rect x="' + (i * bw + 0.5).toFixed(1) + '" y="' + (H - h).toFixed(1) + '" width="' + Math.max(1, bw - 1).toFixed(1) +
        '" height="' + h.toFixed(1) + '" fill="#e8742f"><title>' + fmt(i * step) + '–' + fmt((i + 1) * step) + ': ' + c.toLocaleString() + ' rows</title></rect>';
    });
    s += '<line x1="0" y1="' + H + '" x2="' + W + '" y2="' + H + '" stroke="#999"/>';
    s += '<text x="0" y="' + (H + 14) + '" font-size="11" fill="#687083">0</text>';
    s += '<text x="' + W + '" y="' + (H + 14) + '" font-size="11" fill="#687083" text-anchor="end">' + fmt(n * step) + '</text></svg>';
    return s;
  }
  function logitsHtml(L) {
    const top = Math.max(1e-12, ...L.pos.map(x => Math.abs(x[1])), ...L.neg.map(x => Math.abs(x[1])));
    const col = (xs, sign) => xs.map(x => '<div class="l" style="' + color(sign * Math.abs(x[1]), top) + '"><span>' +
      esc(JSON.stringify(x[0])) + '</span><span>' + fmt(x[1]) + '</span></div>').join('');
    return '<div class="logits"><div><b>promotes</b>' + col(L.pos, 1) + '</div><div><b>suppresses</b>' + col(L.neg, -1) + '</div></div>';
  }
  function draw(b, c) {
    const j = c.i, dead = c.act === 0;
    document.title = 'Component ' + j + ' · ' + M.title;
    let h = '<header><div class="nav">' + (M.standalone ? '' : '<a href="index.html">← all components</a>') +
      (j > 0 ? link(j - 1, '‹ #' + (j - 1)) : '') + (j < M.k - 1 ? link(j + 1, '#' + (j + 1) + ' ›') : '') +
      (M.standalone ? '' : '<label>go to <input id="jump" type="number" min="0" max="' + (M.k - 1) + '" value="' + j + '"></label>') +
      '</div><h1>Component ' + j + (dead ? ' <span class="badge dead">dead</span>' : '') + '</h1><div class="sub">' + esc(M.title) + '</div>' +
      '<div class="cards"><div class="card"><b>' + pct(c.dens) + '</b><span>density: active on ' + c.act.toLocaleString() + ' of ' +
      M.rows.toLocaleString() + ' ' + M.unit + '</span></div><div class="card"><b>' + fmt(c.meanAct) + '</b><span>mean value when active</span></div>' +
      '<div class="card"><b>' + fmt(c.max) + '</b><span>max value</span></div><div class="card"><b>' + fmt(c.mean) + '</b><span>mean over all ' + M.unit + '</span></div></div></header><main>';
    h += '<div class="cols"><div>';
    h += '<div class="panel"><h2>Activation histogram</h2>' + histSvg(c.hist, c.max) + '<div class="note">active values (|value| > ' + M.threshold + '), ' + c.act.toLocaleString() + ' ' + M.unit + '</div></div>';
    if (M.image) h += '<div class="panel"><h2>Its weights</h2><div id="wimg"></div><div class="note">red positive, blue negative</div></div>';
    if (c.logits) h += '<div class="panel"><h2>Logit effects</h2>' + logitsHtml(c.logits) + '<div class="note">' + esc(M.logit_note) + '</div></div>';
    else if (M.logit_note) h += '<div class="panel"><h2>Logit effects</h2><div class="note">' + esc(M.logit_note) + '</div></div>';
    h += '<div class="panel near"><h2>Nearest components</h2>' + c.near.map(x => '<span class="nb">' + link(x[0], '#' + x[0]) + ' <span class="note">' + x[1].toFixed(2) + '</span></span>').join('') +
      '<div class="note">by the cosine of their weight rows</div></div>';
    h += '</div><div>';
    const top = c.max;
    if (M.image) {
      h += '<div class="panel"><h2>Top-activating ' + M.unit + '</h2><div class="imgs" id="topimgs"></div></div>';
      c.quant.forEach((g, gi) => { h += '<div class="panel"><h2>Quantile ' + (c.quant.length - gi) + ' of ' + c.quant.length + ': values ' + fmt(g.lo) + ' to ' + fmt(g.hi) + '</h2><div class="imgs" id="q' + gi + '"></div></div>'; });
    } else {
      const skipped = M.skip_first ? '<div class="note">never chosen and not counted: the first ' + (M.skip_first > 1 ? M.skip_first + ' tokens' : 'token') +
        ' of each context (a causal LM\'s attention sink, with outlier activations); shown with their values</div>' : '';
      h += '<div class="panel"><h2>Top contexts</h2>' + skipped + (c.top.length ? c.top.map(x => ctxHtml(x, b, top)).join('') : '<div class="note">never active</div>') + '</div>';
      if (c.quant.length) {
        h += '<div class="panel"><h2>Samples by activation quantile</h2><div class="note">a uniform sample of the ' + M.unit + ' where it is active, cut into quantiles; the highlighted token chose the context</div>';
        c.quant.forEach((g, gi) => { h += '<div class="qhead">quantile ' + (c.quant.length - gi) + ' of ' + c.quant.length + ': values ' + fmt(g.lo) + ' to ' + fmt(g.hi) + '</div>' + g.items.map(x => ctxHtml(x, b, top)).join(''); });
        h += '</div>';
      }
    }
    h += '</div></div></main>';
    root.innerHTML = h;
    if (M.image) {
      document.getElementById('wimg').appendChild(imgCanvas(c.wimg, 12, true));
      const fig = (x, where) => { const f = document.createElement('figure'); f.appendChild(imgCanvas(x.img, 6, false));
        f.insertAdjacentHTML('beforeend', '<div>' + fmt(x.v) + (x.lab >= 0 ? ' · ' + esc(labelName(b, x.lab)) : '') + '</div>'); where.appendChild(f); };
      c.top.forEach(x => fig(x, document.getElementById('topimgs')));
      c.quant.forEach((g, gi) => g.items.forEach(x => fig(x, document.getElementById('q' + gi))));
    }
    const jump = document.getElementById('jump');
    if (jump) jump.addEventListener('change', () => { location.hash = '#' + jump.value; });
    window.scrollTo(0, 0);
  }
  root.addEventListener('mouseover', e => {
    const t = e.target.closest('.tok'); if (!t) { tip.style.display = 'none'; return; }
    tip.textContent = t.title; tip.style.display = 'block';
  });
  root.addEventListener('mousemove', e => { tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 14) + 'px'; });
  window.addEventListener('hashchange', show);
  if (window.DASH_PRELOADED) window.DASH_BLOCK(window.DASH_PRELOADED);
  show();
})();
"""


def _page(title: str, body: str, scripts: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{title}</title><style>{CSS}</style></head>\n'
        f"<body>{body}\n{scripts}\n</body></html>\n"
    )


INDEX_BODY = """<header><h1 id="title">Components</h1><div class="sub" id="sub"></div></header><main>
<div class="controls"><input id="q" type="search" placeholder="filter: top tokens, or a component number">
<label>density at least <input id="mind" type="number" min="0" max="100" step="any" value="0"> %</label>
<label><input id="hidedead" type="checkbox"> hide dead</label><span id="shown" class="note"></span>
<span id="timing" class="note"></span></div>
<div class="grid head"><span data-key="0" data-label="#">#</span><span data-key="1" data-label="density">density</span>
<span data-key="2" data-label="mean (active)" class="num">mean (active)</span><span data-key="3" data-label="max" class="num">max</span>
<span data-key="5" data-label="histogram">histogram</span><span data-key="4" data-label="top tokens">top tokens</span></div>
<div id="list"></div></main><div id="tip"></div>"""


def _js_data(name: str, value) -> str:
    return f"window.{name} = {json.dumps(value, separators=(',', ':'), allow_nan=False)};\n"


def write_index(out: Path, meta: dict, rows: list[list]) -> None:
    """index.html and data/index.js."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "index.js").write_text(_js_data("DASH_INDEX", {"meta": meta, "rows": rows}))
    (out / "data" / "index-page.js").write_text(COMMON_JS + INDEX_JS)
    scripts = '<script src="data/index.js"></script><script src="data/index-page.js"></script>'
    (out / "index.html").write_text(_page("Components", INDEX_BODY, scripts))


def write_component_page(out: Path, meta: dict) -> None:
    """component.html and data/meta.js."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "meta.js").write_text(_js_data("DASH_META", meta))
    (out / "data" / "component-page.js").write_text(COMMON_JS + COMPONENT_JS)
    scripts = '<script src="data/meta.js"></script><script src="data/component-page.js"></script>'
    (out / "component.html").write_text(
        _page("Component", '<div id="root">loading…</div><div id="tip"></div>', scripts)
    )


def block_file(out: Path, first: int) -> Path:
    return out / "data" / "blocks" / f"b{first:06d}.js"


def write_block(out: Path, block: dict) -> None:
    """data/blocks/bNNNNNN.js: ``DASH_BLOCK({first, vocab, labels, components})``."""
    path = block_file(out, block["first"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("DASH_BLOCK(" + json.dumps(block, separators=(",", ":"), allow_nan=False) + ");\n")


def standalone_page(meta: dict, block: dict, component: int) -> str:
    """One component as a self-contained page (its block's data inline; links to others are text)."""
    one = {**block, "first": component, "components": [block["components"][component - block["first"]]]}
    meta = {**meta, "standalone": True, "block": 1, "only": component}
    data = (_js_data("DASH_META", meta) + _js_data("DASH_PRELOADED", one)).replace("</", "<\\/")
    scripts = f"<script>{data}{COMMON_JS}{COMPONENT_JS}</script>"
    return _page(f"Component {component}", '<div id="root">loading…</div><div id="tip"></div>', scripts)
