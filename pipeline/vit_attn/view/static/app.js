// vit-attn view: plain JavaScript, no build step, no third-party code.
// Routes (in the URL hash): #/grid?FILTER, #/image/I?FILTER&MAP, #/stats?stat=NAME.
// The server draws every picture; this file only asks for them and lays them out.
"use strict";

const $ = (id) => document.getElementById(id);
const FILTER_KEYS = ["status", "top1", "stat", "slayer", "shead", "min", "max", "sort", "order"];
const MAP_KEYS = ["source", "layer", "head", "token", "mask"];
const PAGE_SIZE = 60;
const THUMB_PART = 15;  // thumbnails per request: a page is read by several server threads
const THUMB_BOX = 128;
const HEAD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
  "#c5b0d5", "#c49c94"];

let META = null;
let META_P = null;  // the /api/meta request, started first thing
let COUNTS = null;
let COUNTS_P = null;
let renderSeq = 0;  // a newer navigation makes older async work drop its result

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    // An <img> learns nothing of why it failed; the server's JSON says (e.g. the source
    // file changed since the run), so ask once more and show that instead.
    img.onerror = async () => {
      let why = "could not load " + url;
      try {
        const r = await fetch(url);
        if (!r.ok) why = (await r.json()).error || why;
      } catch (e) { /* keep the plain reason */ }
      reject(new Error(why));
    };
    img.src = url;
  });
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return a >= 100 ? v.toFixed(1) : v.toPrecision(3);
}

function parseHash() {
  const h = location.hash.replace(/^#/, "") || "/grid";
  const [path, query] = h.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query || "") };
}

function pick(params, keys) {
  const out = new URLSearchParams();
  for (const k of keys) {
    const v = params.get(k);
    if (v !== null && v !== "") out.set(k, v);
  }
  return out;
}

function setOptions(select, options, value) {
  select.replaceChildren(...options.map(([v, label]) => el("option", { value: String(v), text: label })));
  if (value !== null && value !== undefined && options.some(([v]) => String(v) === String(value))) {
    select.value = String(value);
  }
}

// The blocks' heads, or a map source's own (an attention pool with its own head count).
function headOptions(info) {
  const heads = info && info.head_count ? [...Array(info.head_count).keys()] : META.heads;
  return [["mean", "mean"], ["max", "max"], ["min", "min"], ...heads.map((h, k) => [k, `head ${h}`])];
}

function layerOptions() {
  return META.layers.map((b, k) => [k, `block ${b}`]);
}

function defaultLayer() {
  return String(META.layers.length - 1);
}

// A layer index as the selects show it: 0..L-1 (the server also takes -1 for the last).
function layerIndex(value) {
  const L = META.layers.length;
  const v = parseInt(value ?? "", 10);
  if (Number.isNaN(v) || v < -L || v >= L) return defaultLayer();
  return String(((v % L) + L) % L);
}

function statUnit(name) {
  const s = META.stats.find((x) => x.name === name);
  return s ? s.unit : "";
}

function show(id) {
  for (const s of ["grid-view", "image-view", "stats-view"]) $(s).hidden = s !== id;
  $("nav-grid").classList.toggle("active", id !== "stats-view");
  $("nav-stats").classList.toggle("active", id === "stats-view");
}

// ------------------------------------------------------------------ grid

function filterFromForm() {
  const p = new URLSearchParams();
  p.set("status", $("f-status").value);
  if ($("f-top1").value !== "") p.set("top1", $("f-top1").value);
  const stat = $("f-stat").value;
  if (stat) {
    p.set("stat", stat);
    p.set("slayer", $("f-slayer").value);
    p.set("shead", $("f-shead").value);
    if ($("f-min").value !== "") p.set("min", $("f-min").value);
    if ($("f-max").value !== "") p.set("max", $("f-max").value);
  }
  const [sort, order] = $("f-sort").value.split(":");
  p.set("sort", sort);
  p.set("order", order);
  return p;
}

// The status and class selects, with counts once /api/counts has answered.
function fillCountSelects(params) {
  const c = COUNTS || {};
  const count = (k) => (c[k] === undefined ? "" : ` (${c[k]})`);
  setOptions($("f-status"), [["all", "all" + (COUNTS ? ` (${META.n_images})` : "")], ["ok", "ok" + count("ok")],
    ["failed", "failed" + count("failed")], ["pending", "pending" + count("pending")]], params.get("status") || "all");
  $("f-class-label").hidden = META.topk === 0;
  const classes = [];
  for (let k = 0; k < META.num_classes; k++) {
    const n = c.classes ? c.classes[String(k)] || 0 : null;
    classes.push([k, `class ${k}` + (n === null ? "" : ` (${n})`)]);
  }
  setOptions($("f-top1"), [["", "any"], ...classes], params.get("top1") ?? "");
}

function fillFilterForm(params) {
  fillCountSelects(params);
  $("f-stat-group").hidden = META.stats.length === 0;
  setOptions($("f-stat"), [["", "none"], ...META.stats.map((s) => [s.name, `${s.name} [${s.unit}]`])], params.get("stat") || "");
  setOptions($("f-slayer"), layerOptions(), layerIndex(params.get("slayer")));
  setOptions($("f-shead"), headOptions(), params.get("shead") || "mean");
  $("f-min").value = params.get("min") || "";
  $("f-max").value = params.get("max") || "";
  const hasStat = Boolean(params.get("stat"));
  for (const id of ["f-slayer", "f-shead", "f-min", "f-max"]) $(id).disabled = !hasStat;
  const sorts = [["index:asc", "index ↑"], ["index:desc", "index ↓"]];
  if (hasStat) sorts.push(["stat:asc", "statistic ↑ (lowest first)"], ["stat:desc", "statistic ↓ (highest first)"]);
  setOptions($("f-sort"), sorts, `${params.get("sort") || "index"}:${params.get("order") || "asc"}`);
}

// Tiles that fit in the window before any scrolling (the tile grid's own geometry).
function visibleTiles() {
  const cols = Math.max(1, Math.floor((window.innerWidth - 32 + 10) / (140 + 10)));
  const rows = Math.max(1, Math.ceil((window.innerHeight - 140) / (190 + 10)));
  return Math.min(PAGE_SIZE, cols * rows);
}

async function renderGrid(params, seq) {
  const page = Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
  const query = pick(params, FILTER_KEYS);
  const first = page * PAGE_SIZE;
  // Captions and the pictures of the tiles in view are asked for at once, before the store's
  // metadata has answered; the rest of the page's pictures after those, in parallel parts.
  const listQuery = new URLSearchParams(query);
  listQuery.set("offset", String(first));
  listQuery.set("limit", String(PAGE_SIZE));
  const listP = getJSON("/api/list?" + listQuery);
  const thumbsUrl = (offset, limit) => {
    const q = new URLSearchParams(query);
    q.set("offset", String(offset));
    q.set("limit", String(limit));
    q.set("box", String(THUMB_BOX));
    return "/api/thumbs?" + q;
  };
  const inView = visibleTiles();
  const firstPart = fetchThumbs(thumbsUrl(first, inView));
  const restParts = firstPart.then(() => {
    const parts = [];
    for (let k = inView; k < PAGE_SIZE; k += THUMB_PART) {
      parts.push(fetchThumbs(thumbsUrl(first + k, Math.min(THUMB_PART, PAGE_SIZE - k))));
    }
    return parts;
  });
  restParts.catch(() => {});
  await ensureMeta();
  if (seq !== renderSeq) return;
  show("grid-view");
  fillFilterForm(params);
  let list, thumbs;
  try {
    [list, thumbs] = await Promise.all([listP, firstPart]);
  } catch (e) {
    if (seq !== renderSeq) return;
    $("tiles").replaceChildren(el("p", { class: "error", text: e.message }));
    $("page-info").textContent = "";
    markReady("grid-painted");
    return;
  }
  if (seq !== renderSeq) return;
  const pages = Math.max(1, Math.ceil(list.total / PAGE_SIZE));
  $("page-info").textContent = `${list.total} image${list.total === 1 ? "" : "s"}` +
    (list.total ? ` · page ${page + 1} of ${pages}` : "");
  $("page-info").dataset.total = String(list.total);
  $("page-prev").disabled = page === 0;
  $("page-next").disabled = page + 1 >= pages;
  $("page-prev").onclick = () => gotoGrid(params, page - 1);
  $("page-next").onclick = () => gotoGrid(params, page + 1);
  const slots = new Map();
  for (const item of list.items) slots.set(item.i, null);
  thumbs.ids.forEach((i, k) => slots.set(i, [thumbs, k]));
  const tiles = list.items.map((item) => gridTile(item, params, slots.get(item.i)));
  $("tiles").replaceChildren(...tiles);
  // What is in view is drawn: the grid's first paint. The rest fills in below the fold.
  performance.mark("grid-visible");
  try {
    for (const part of await Promise.all(await restParts)) {
      if (seq !== renderSeq) return;
      part.ids.forEach((i, k) => {
        const tile = $("tiles").querySelector(`.tile[data-i="${i}"] canvas`);
        if (tile) { sizeCanvas(tile, part); paintThumb(tile, part, k); }
      });
    }
  } catch (e) {
    $("tiles").append(el("p", { class: "error", text: e.message }));
  }
  if (seq !== renderSeq) return;
  markReady("grid-painted");
}

async function fetchThumbs(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error((await r.json()).error || r.statusText);
  const [n, th, tw] = r.headers.get("X-Thumbs").split(",").map(Number);
  const idsText = r.headers.get("X-Ids");
  const ids = idsText ? idsText.split(",").map(Number) : [];
  return { n, th, tw, ids, bytes: new Uint8Array(await r.arrayBuffer()) };
}

function sizeCanvas(canvas, thumbs) {
  canvas.width = thumbs.tw;
  canvas.height = thumbs.th;
  const zoom = THUMB_BOX / Math.max(thumbs.tw, thumbs.th);
  canvas.style.width = `${Math.round(thumbs.tw * zoom)}px`;
  canvas.style.height = `${Math.round(thumbs.th * zoom)}px`;
}

function paintThumb(canvas, thumbs, k) {
  const { th, tw, bytes } = thumbs;
  const image = new ImageData(tw, th);
  const d = image.data;
  let src = k * th * tw * 3;
  for (let p = 0; p < th * tw * 4; p += 4) {
    d[p] = bytes[src]; d[p + 1] = bytes[src + 1]; d[p + 2] = bytes[src + 2]; d[p + 3] = 255;
    src += 3;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function gridTile(item, params, thumb) {
  const link = pick(params, FILTER_KEYS);
  const href = `#/image/${item.i}?${link}`;
  const canvas = el("canvas", { class: "pixelated" });
  if (thumb) {
    sizeCanvas(canvas, thumb[0]);
    paintThumb(canvas, thumb[0], thumb[1]);
  } else {
    sizeCanvas(canvas, { th: THUMB_BOX, tw: THUMB_BOX });  // a placeholder until its part arrives
  }
  const label = [`#${item.i}`];
  if (item.top1 !== undefined) label.push(`class ${item.top1}` + (item.prob !== undefined ? ` ${(100 * item.prob).toFixed(0)}%` : ""));
  if (item.value !== undefined) label.push(`${fmt(item.value)}`);
  const tile = el("a", { class: `tile ${item.status}`, href, "data-i": String(item.i), title: item.path },
    canvas, el("span", { class: "caption", text: label.join(" · ") }),
    el("span", { class: "path", text: item.path }));
  if (item.status === "failed") tile.append(el("span", { class: "error", text: item.error || "failed" }));
  if (item.status === "pending") tile.append(el("span", { class: "hint", text: "not processed yet" }));
  return tile;
}

function gotoGrid(params, page) {
  const p = pick(params, FILTER_KEYS);
  if (page) p.set("page", String(page));
  location.hash = "#/grid?" + p;
}

// ------------------------------------------------------------------ one image

function mapSelection(params) {
  const sources = META.sources.map((s) => s.name);
  let source = params.get("source") || sources[0] || (META.full_attention ? "row" : "");
  const sel = {
    source,
    layer: layerIndex(params.get("layer")),
    head: params.get("head") || "mean",
    token: params.get("token") || "0",
    mask: params.get("mask") || "",
  };
  return sel;
}

function selQuery(sel, withMask) {
  const q = new URLSearchParams({ source: sel.source, layer: sel.layer, head: sel.head });
  if (sel.source === "row") q.set("token", sel.token);
  if (withMask && sel.mask) q.set("mask", sel.mask);
  return q;
}

function sourceInfo(name) {
  if (name === "row" || name === "diag") return { has_layer: true, has_head: true };
  return META.sources.find((s) => s.name === name) || { has_layer: false, has_head: false };
}

function tokenLabel(t) {
  const p = META.num_prefix_tokens;
  if (t < p) return META.token_names[t] || `prefix ${t}`;
  const k = t - p;
  return `patch (${Math.floor(k / META.grid[1])}, ${k % META.grid[1]})`;
}

function fillMapControls(sel) {
  const sources = META.sources.map((s) => [s.name, s.label]);
  if (META.full_attention) sources.push(["row", "a token's row (full attention)"], ["diag", "diagonal: each patch's self-attention"]);
  setOptions($("m-source"), sources, sel.source);
  const info = sourceInfo(sel.source);
  setOptions($("m-layer"), layerOptions(), sel.layer);
  $("m-layer").disabled = !info.has_layer;
  setOptions($("m-head"), headOptions(info), sel.head);
  $("m-head").disabled = !info.has_head;
  const tokens = [];
  for (let t = 0; t < META.num_prefix_tokens; t++) tokens.push([t, tokenLabel(t)]);
  const t = parseInt(sel.token, 10);
  if (t >= META.num_prefix_tokens) tokens.push([t, tokenLabel(t)]);
  setOptions($("m-token"), tokens, sel.token);
  $("m-token-label").hidden = sel.source !== "row";
  $("m-mask").value = sel.mask || "0";
  $("m-mask-value").textContent = sel.mask ? sel.mask : "off";
  $("row-hint").textContent = META.full_attention
    ? "Click a patch on the overlay or the map to see that patch's attention row."
    : `Token rows: ${META.full_attention_hint}.`;
}

function imageHash(i, params, changes) {
  const p = pick(params, FILTER_KEYS);
  const m = pick(params, MAP_KEYS);
  for (const [k, v] of Object.entries(changes || {})) {
    if (v === null || v === "") m.delete(k); else m.set(k, String(v));
  }
  for (const [k, v] of m) p.set(k, v);
  return `#/image/${i}?${p}`;
}

async function renderImage(i, params, seq) {
  show("image-view");
  const sel = mapSelection(params);
  fillMapControls(sel);
  const filter = pick(params, FILTER_KEYS);
  $("back").href = "#/grid?" + filter;
  // The input, the facts and the neighbours are asked for at once; the maps once the facts
  // say the image has them (a failed or pending image's maps would answer 404: broken
  // pictures and console errors).
  const q = selQuery(sel, true);
  const qNoMask = selQuery(sel, false);
  const infoP = getJSON(`/api/info/${i}`).catch((e) => ({ error: e.message }));
  const nbP = getJSON(`/api/neighbours/${i}?${filter}`).catch(() => null);
  const inputLoad = loadImage($("p-input"), `/api/input/${i}.png`);
  const [info, nb] = await Promise.all([infoP, nbP]);
  if (seq !== renderSeq) return;
  const title = info.error ? info.error : `#${info.i} ${info.path} · ${info.status}` +
    (info.topk ? ` · top-${info.topk.length}: ` + info.topk.map((c, k) => `${c} (${(100 * info.topk_prob[k]).toFixed(1)}%)`).join(", ") : "");
  $("img-title").textContent = title;
  if (nb) {
    $("img-position").textContent = nb.position === null ? `not in the current filter (${nb.total})` : `${nb.position + 1} of ${nb.total}`;
    $("img-prev").disabled = nb.prev === null;
    $("img-next").disabled = nb.next === null;
    $("img-prev").onclick = () => { location.hash = imageHash(nb.prev, params); };
    $("img-next").onclick = () => { location.hash = imageHash(nb.next, params); };
  } else {  // no such image: nothing of the previous one's place stays
    $("img-position").textContent = "";
    $("img-prev").disabled = true;
    $("img-next").disabled = true;
  }
  const err = $("img-error");
  if (info.status !== "ok") {
    err.hidden = false;
    err.textContent = info.status === "failed" ? `This image failed: ${info.error}` :
      info.status === "pending" ? "This image has no attention yet (not processed)." : title;
    for (const id of ["p-overlay", "p-map", "p-grid"]) $(id).removeAttribute("src");
    $("img-stats").replaceChildren();
    $("map-readout").textContent = "";
    await inputLoad.catch(() => {});
    markReady("image-ready");
    return;
  }
  err.hidden = true;
  const pictures = Promise.all([
    loadImage($("p-overlay"), `/api/overlay/${i}.png?${q}`),
    loadImage($("p-map"), `/api/map/${i}.png?${qNoMask}`),
    getJSON(`/api/map/${i}.json?${q}`),
  ]);
  let values;
  try {
    [, [, , values]] = await Promise.all([inputLoad, pictures]);
  } catch (e) {
    if (seq !== renderSeq) return;
    err.hidden = false;
    err.textContent = e.message;
    markReady("image-ready");
    return;
  }
  if (seq !== renderSeq) return;
  document.body.dataset.map = `/api/map/${i}.png?${qNoMask}`;
  showMapFacts(values, sel);
  placeMarkers(sel);
  wirePatchClicks(i, params, values);
  markReady("image-ready");
  // Below the fold: the head grid and the statistics table come after the view is ready.
  loadImage($("p-grid"), `/api/grid/${i}.png?${qNoMask}`).catch(() => {});
  $("p-grid").onclick = (ev) => pickHeadFromGrid(ev, i, params);
  getJSON(`/api/imagestats/${i}`).then((st) => { if (seq === renderSeq) fillImageStats(st, sel); }).catch(() => {});
}

function showMapFacts(values, sel) {
  const layer = sourceInfo(sel.source).has_layer ? `block ${values.layer} · ` : "";
  let what = META.sources.find((s) => s.name === sel.source)?.label || sel.source;
  if (sel.source === "row") what = `row of ${tokenLabel(parseInt(sel.token, 10))} over the patches`;
  if (sel.source === "diag") what = "diagonal (each patch's attention to itself)";
  $("map-caption").textContent = `map: ${what}`;
  let text = `${layer}head ${sel.head} · colour scale ${fmt(values.min)} (dark) to ${fmt(values.max)} (bright), this map's own range`;
  if (values.prefix_mass !== null && values.prefix_mass !== undefined) text += ` · mass on prefix tokens (not shown): ${fmt(values.prefix_mass)}`;
  if (values.mask) text += ` · mask: ${values.mask.reduce((a, b) => a + b, 0)} patches hold ${sel.mask} of the mass`;
  $("map-readout").textContent = text;
  $("map-readout").dataset.base = text;
}

function placeMarkers(sel) {
  const t = parseInt(sel.token, 10);
  const p = META.num_prefix_tokens;
  for (const id of ["map-marker", "overlay-marker"]) {
    const m = $(id);
    if (sel.source !== "row" || t < p) { m.hidden = true; continue; }
    const [gh, gw] = META.grid;
    const k = t - p;
    m.hidden = false;
    m.style.left = `${(100 * (k % gw)) / gw}%`;
    m.style.top = `${(100 * Math.floor(k / gw)) / gh}%`;
    m.style.width = `${100 / gw}%`;
    m.style.height = `${100 / gh}%`;
  }
}

function patchAt(ev, box) {
  const r = box.getBoundingClientRect();
  const [gh, gw] = META.grid;
  const x = Math.min(gw - 1, Math.max(0, Math.floor(((ev.clientX - r.left) / r.width) * gw)));
  const y = Math.min(gh - 1, Math.max(0, Math.floor(((ev.clientY - r.top) / r.height) * gh)));
  return [y, x];
}

function wirePatchClicks(i, params, values) {
  for (const id of ["map-box", "overlay-box"]) {
    const box = $(id);
    box.onclick = (ev) => {
      if (!META.full_attention) {
        $("row-hint").classList.add("flash");
        setTimeout(() => $("row-hint").classList.remove("flash"), 600);
        return;
      }
      const [y, x] = patchAt(ev, box);
      const token = META.num_prefix_tokens + y * META.grid[1] + x;
      location.hash = imageHash(i, params, { source: "row", token });
    };
    box.onmousemove = (ev) => {
      const [y, x] = patchAt(ev, box);
      const v = values.values[y * META.grid[1] + x];
      $("map-readout").textContent = `patch (${y}, ${x}): ${fmt(v)} · ` + $("map-readout").dataset.base;
    };
    box.onmouseleave = () => { $("map-readout").textContent = $("map-readout").dataset.base; };
  }
}

function pickHeadFromGrid(ev, i, params) {
  const img = $("p-grid");
  const n = META.heads.length + 1;
  const cols = Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / cols);
  const r = img.getBoundingClientRect();
  const col = Math.floor(((ev.clientX - r.left) / r.width) * cols);
  const row = Math.floor(((ev.clientY - r.top) / r.height) * rows);
  const k = row * cols + col;
  if (k < 0 || k >= n) return;
  location.hash = imageHash(i, params, { head: k === 0 ? "mean" : String(k - 1) });
}

function fillImageStats(info, sel) {
  const table = $("img-stats");
  if (!info.stats || !Object.keys(info.stats).length) {
    table.replaceChildren(el("caption", { text: "no statistics stored (attention.stats: true stores them)" }));
    return;
  }
  const li = parseInt(sel.layer, 10);
  const L = META.layers.length;
  const idx = ((li % L) + L) % L;
  const head = el("tr", {}, el("th", { text: `block ${META.layers[idx]}` }), ...META.heads.map((h) => el("th", { text: `head ${h}` })));
  const rows = Object.entries(info.stats).map(([name, v]) =>
    el("tr", {}, el("th", { text: `${name} [${statUnit(name)}]` }), ...v[idx].map((x) => el("td", { text: fmt(x) }))));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

// ------------------------------------------------------------------ statistics

let SUMMARY = null;

async function renderStats(params, seq) {
  show("stats-view");
  const err = $("stats-error");
  if (!META.stats.length) {
    err.hidden = false;
    err.textContent = "This store holds no statistics: run with attention.stats: true " +
      "(or vit-attn stats --write STORE when full attention is stored).";
    $("plot").replaceChildren(); $("stats-table").replaceChildren(); $("extremes").replaceChildren();
    markReady("stats-ready");
    return;
  }
  const names = META.stats.map((s) => s.name);
  const stat = names.includes(params.get("stat")) ? params.get("stat") : (names.includes("attention_distance") ? "attention_distance" : names[0]);
  setOptions($("s-stat"), META.stats.map((s) => [s.name, `${s.name} [${s.unit}]`]), stat);
  try {
    SUMMARY = SUMMARY || await getJSON("/api/summary");
  } catch (e) {
    if (seq !== renderSeq) return;
    err.hidden = false;
    err.textContent = e.message;
    markReady("stats-ready");
    return;
  }
  if (seq !== renderSeq) return;
  err.hidden = true;
  drawPlot(stat);
  drawTable(stat);
  const li = params.get("slayer"), hd = params.get("shead");
  if (li !== null && hd !== null) await showExtremes(stat, parseInt(li, 10), hd, seq);
  else $("extremes").replaceChildren(el("p", { class: "hint", text: "Click a dot or a table cell to list its most extreme images." }));
  markReady("stats-ready");
}

function statsHash(stat, li, head) {
  const p = new URLSearchParams({ stat });
  if (li !== undefined) { p.set("slayer", String(li)); p.set("shead", String(head)); }
  return "#/stats?" + p;
}

function drawPlot(stat) {
  const S = SUMMARY.stats[stat];
  const mean = S.mean;  // [layer][head]
  const L = META.layers.length, H = META.heads.length;
  const W = 640, Ht = 360, m = { l: 60, r: 150, t: 20, b: 44 };
  const ref = stat === "attention_distance" ? META.distance_reference : null;
  let ymax = 0;
  for (const row of mean) for (const v of row) if (v !== null) ymax = Math.max(ymax, v);
  if (ref) ymax = Math.max(ymax, ref.largest);
  ymax = ymax > 0 ? ymax * 1.05 : 1;
  const x = (k) => m.l + (L === 1 ? (W - m.l - m.r) / 2 : (k * (W - m.l - m.r)) / (L - 1));
  const y = (v) => Ht - m.b - (v / ymax) * (Ht - m.t - m.b);
  const NS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const svg = s("svg", { viewBox: `0 0 ${W} ${Ht}`, width: W, height: Ht, role: "img" });
  svg.append(s("line", { x1: m.l, y1: Ht - m.b, x2: W - m.r, y2: Ht - m.b, class: "axis" }));
  svg.append(s("line", { x1: m.l, y1: m.t, x2: m.l, y2: Ht - m.b, class: "axis" }));
  for (let k = 0; k < 5; k++) {
    const v = (ymax * k) / 4;
    svg.append(s("text", { x: m.l - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmt(v)));
    svg.append(s("line", { x1: m.l, y1: y(v), x2: W - m.r, y2: y(v), class: "gridline" }));
  }
  META.layers.forEach((b, k) => svg.append(s("text", { x: x(k), y: Ht - m.b + 16, class: "tick", "text-anchor": "middle" }, String(b))));
  svg.append(s("text", { x: (m.l + W - m.r) / 2, y: Ht - 6, class: "label", "text-anchor": "middle" }, "block (network depth)"));
  svg.append(s("text", { x: 14, y: (m.t + Ht - m.b) / 2, class: "label", "text-anchor": "middle", transform: `rotate(-90 14 ${(m.t + Ht - m.b) / 2})` }, `${stat} [${statUnit(stat)}]`));
  if (ref) {
    for (const [v, name, cls] of [[ref.uniform, "uniform attention", "ref-uniform"], [ref.largest, "largest possible", "ref-largest"]]) {
      svg.append(s("line", { x1: m.l, y1: y(v), x2: W - m.r, y2: y(v), class: cls }));
      svg.append(s("text", { x: W - m.r + 4, y: y(v) + 4, class: "tick" }, `${name} (${fmt(v)})`));
    }
  }
  const line = mean.map((row, k) => {
    const vals = row.filter((v) => v !== null);
    const avg = vals.reduce((a, b) => a + b, 0) / Math.max(1, vals.length);
    return `${k ? "L" : "M"}${x(k).toFixed(1)},${y(avg).toFixed(1)}`;
  }).join(" ");
  svg.append(s("path", { d: line, class: "mean-line" }));
  const jitter = (h) => (H > 1 ? ((h - (H - 1) / 2) / H) * Math.min(24, (W - m.l - m.r) / Math.max(L, 2) / 2) : 0);
  mean.forEach((row, k) => row.forEach((v, h) => {
    if (v === null) return;
    const dot = s("circle", { cx: x(k) + jitter(h), cy: y(v), r: 5, fill: HEAD_COLOURS[h % HEAD_COLOURS.length],
      class: "dot", "data-layer": k, "data-head": h });
    dot.append(s("title", {}, `block ${META.layers[k]}, head ${META.heads[h]}: ${fmt(v)} (p5 ${fmt(S.p5[k][h])}, p95 ${fmt(S.p95[k][h])})`));
    dot.addEventListener("click", () => { location.hash = statsHash(stat, k, h); });
    svg.append(dot);
  }));
  META.heads.slice(0, 16).forEach((hd, h) => {
    const yy = m.t + 10 + h * 15;
    svg.append(s("circle", { cx: W - m.r + 10, cy: yy + (ref ? 40 : 0), r: 4, fill: HEAD_COLOURS[h % HEAD_COLOURS.length] }));
    svg.append(s("text", { x: W - m.r + 18, y: yy + 4 + (ref ? 40 : 0), class: "tick" }, `head ${hd}`));
  });
  $("plot").replaceChildren(svg);
}

function drawTable(stat) {
  const S = SUMMARY.stats[stat];
  $("table-title").textContent = `${stat} [${statUnit(stat)}] per head: mean (p5 – p95) over ${SUMMARY.n} ok images`;
  const head = el("tr", {}, el("th", { text: "block" }), ...META.heads.map((h) => el("th", { text: `head ${h}` })), el("th", { text: "mean of heads" }));
  const rows = META.layers.map((b, k) => {
    const cells = META.heads.map((_, h) => el("td", { class: "clickable", text: `${fmt(S.mean[k][h])} (${fmt(S.p5[k][h])} – ${fmt(S.p95[k][h])})`,
      onclick: () => { location.hash = statsHash(stat, k, h); } }));
    const vals = S.mean[k].filter((v) => v !== null);
    return el("tr", {}, el("th", { text: String(b) }), ...cells,
      el("td", { class: "clickable", text: fmt(vals.reduce((a, c) => a + c, 0) / Math.max(1, vals.length)),
        onclick: () => { location.hash = statsHash(stat, k, "mean"); } }));
  });
  $("stats-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

async function showExtremes(stat, li, head, seq) {
  const headName = head === "mean" ? "mean of heads" : `head ${META.heads[parseInt(head, 10)]}`;
  const box = el("div", {}, el("h2", { text: `Most extreme images: ${stat}, block ${META.layers[li]}, ${headName}` }));
  $("extremes").replaceChildren(box);
  for (const order of ["desc", "asc"]) {
    const q = new URLSearchParams({ status: "ok", stat, slayer: String(li), shead: String(head), sort: "stat", order });
    const list = await getJSON(`/api/list?${q}&offset=0&limit=8`);
    if (seq !== renderSeq) return;
    let thumbs = null;
    if (list.items.length) thumbs = await fetchThumbs(`/api/thumbs?box=${THUMB_BOX}&ids=${list.items.map((x) => x.i).join(",")}`);
    if (seq !== renderSeq) return;
    const tiles = list.items.map((item, k) => gridTile(item, q, [thumbs, k]));
    box.append(el("h3", { text: order === "desc" ? "highest" : "lowest" }), el("div", { class: "tiles-row" }, ...tiles));
  }
}

// ------------------------------------------------------------------ wiring

function markReady(name) {
  performance.mark(name);
  document.body.dataset.state = "ready";
  document.body.dataset.view = name;
  document.body.dataset.shown = location.hash;
}

async function ensureMeta() {
  if (!META) {
    META = await META_P;
    $("store-name").textContent = `${META.store} · ${META.model || "model ?"} · ${META.n_images} images · grid ${META.grid.join("×")}`;
  }
  return META;
}

async function route() {
  const seq = ++renderSeq;
  document.body.dataset.state = "loading";
  const { parts, params } = parseHash();
  const image = parts[0] === "image" && /^\d+$/.test(parts[1] || "");
  if (!image && parts[0] !== "stats") return renderGrid(params, seq);
  await ensureMeta();
  if (image) return renderImage(parseInt(parts[1], 10), params, seq);
  return renderStats(params, seq);
}

function wireForms() {
  $("filters").addEventListener("change", (ev) => {
    if (ev.target.id === "f-stat" && !$("f-stat").value) { $("f-min").value = ""; $("f-max").value = ""; }
    const p = filterFromForm();
    if (!p.get("stat") && p.get("sort") === "stat") { p.set("sort", "index"); p.set("order", "asc"); }
    location.hash = "#/grid?" + p;
  });
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  $("map-controls").addEventListener("submit", (ev) => ev.preventDefault());
  $("map-controls").addEventListener("input", (ev) => {
    if (ev.target.id === "m-mask") $("m-mask-value").textContent = ev.target.value === "0" ? "off" : ev.target.value;
  });
  $("map-controls").addEventListener("change", () => {
    const { parts, params } = parseHash();
    const mask = $("m-mask").value;
    location.hash = imageHash(parseInt(parts[1], 10), params, {
      source: $("m-source").value, layer: $("m-layer").value, head: $("m-head").value,
      token: $("m-source").value === "row" ? ($("m-token").value || "0") : null,
      mask: mask === "0" ? null : mask,
    });
  });
  $("s-stat").addEventListener("change", () => { location.hash = statsHash($("s-stat").value); });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") return;
    if ($("image-view").hidden) return;
    if (ev.key === "ArrowLeft" && !$("img-prev").disabled) $("img-prev").click();
    if (ev.key === "ArrowRight" && !$("img-next").disabled) $("img-next").click();
  });
}

async function start() {
  META_P = getJSON("/api/meta");
  wireForms();
  window.addEventListener("hashchange", route);
  await route();
  // Counts read whole-store columns (one chunk per batch of the run): asked for when the
  // filters are first touched or after a quiet moment, never in the way of the first paint.
  const loadCounts = () => {
    if (COUNTS_P) return;
    COUNTS_P = getJSON("/api/counts").then((c) => {
      COUNTS = c;
      if (!$("grid-view").hidden) fillCountSelects(parseHash().params);
    }).catch(() => {});
  };
  $("filters").addEventListener("focusin", loadCounts);
  $("filters").addEventListener("pointerenter", loadCounts);
  setTimeout(loadCounts, 1500);
}

start().catch((e) => {
  document.body.replaceChildren(el("p", { class: "error", text: `vit-attn view: ${e.message}` }));
  document.body.dataset.state = "error";
});
