// samkit annotate: the browser side of the data engine. Plain JS, no build step.
//
// With the browser runtime installed (scripts/get_web_runtime.sh), the page decodes every
// hover, click and box itself (decoder.js) from the image embedding the server computed
// once; otherwise each prompt is one small JSON request and masks come back as COCO RLE.
// Either way accepting sends the chosen mask's RLE back with the prompt that made it and the
// seconds spent; the server checks and stores it.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

const HOVER_DELAY_MS = 120; // debounce: preview once the pointer rests (server decoding)
const LOCAL_HOVER_DELAY_MS = 30; // decoding in the page costs the server nothing
const EXPORT_POLL_MS = 2000; // while the server exports the page's decoder graphs
const MAX_TIMINGS = 5000;
const DRAG_PX = 5; // a press that moves further is a box, not a click
const MAX_SECONDS = 600; // longer between two accepts is a break, not annotation time
const PREDICTION_RGBA = [30, 144, 255, 150];
const HOVER_RGBA = [30, 144, 255, 80];
const CANDIDATE_RGBA = [255, 196, 0, 110];

const state = {
  images: [], // summaries from /api/images
  index: -1,
  image: null, // HTMLImageElement of the current image
  info: null, // {id, width, height, file_name}
  points: [], // [x, y, label]
  box: null, // [x0, y0, x1, y1]
  text: "", // a text prompt (models with a text slot and a CLIP; always decoded on the server)
  dragStart: null,
  dragBox: null,
  // {masks: [{score, area, bbox, segmentation (server) or bits (page)}], choice,
  //  modelVersion, layers: [], lowRes: [Float32Array] (page only)}
  prediction: null,
  maskInputs: [], // per prompt step, the low-res logits the page refines from (or null)
  decoder: null, // SamkitDecoder.BrowserDecoder once ready; null: the server decodes
  decoderSeq: 0,
  hover: null, // {layer}
  annotations: [], // visible annotations of this image, each with .layer (a canvas)
  selected: null, // annotation id
  undo: [],
  shownAt: performance.now(),
  loadSeq: 0,
  decodeSeq: 0,
  hoverSeq: 0,
  hoverTimer: null,
  hoverAbort: null,
};

// ------------------------------------------------------------------------------ server calls
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, { signal, raw } = {}) {
  const init = { method, headers: {}, signal };
  if (raw !== undefined) {
    init.body = raw;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server (is `samkit annotate` still running?)");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || `HTTP ${response.status}`);
  }
  return data;
}

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
}

function report(err, what) {
  if (err.name === "AbortError") return;
  if (err.status === 503) setStatus(`Server busy — ${err.message}`, "busy");
  else setStatus(`${what} failed: ${err.message}`, "error");
}

// Calls that need the model wait politely while it is busy (e.g. embedding another image).
async function withRetry(fn, what, attempts = 5) {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (err.status !== 503 || i >= attempts) throw err;
      setStatus(`Server busy — ${err.message} (retry ${i} of ${attempts - 1})`, "busy");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

// ------------------------------------------------------------------------------------ masks
// Compressed COCO RLE string -> run lengths (pycocotools' rleFrString).
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A mask as a canvas the size of its bounding box, filled with rgba where the mask is set.
// Built once per mask, so redrawing many masks is only drawImage calls.
function maskLayer(segmentation, bbox, rgba) {
  const [h] = segmentation.size;
  const [bx, by, bw, bh] = bbox;
  const layer = document.createElement("canvas");
  layer.width = Math.max(1, bw);
  layer.height = Math.max(1, bh);
  const pixels = new ImageData(layer.width, layer.height);
  const data = pixels.data;
  let pos = 0, value = 0;
  for (const run of rleCounts(segmentation.counts)) {
    if (value) {
      // Runs go down the columns (column-major).
      let x = Math.floor(pos / h), y = pos % h;
      for (let i = 0; i < run; i++) {
        const o = ((y - by) * layer.width + (x - bx)) * 4;
        data[o] = rgba[0]; data[o + 1] = rgba[1]; data[o + 2] = rgba[2]; data[o + 3] = rgba[3];
        if (++y === h) { y = 0; x++; }
      }
    }
    pos += run;
    value ^= 1;
  }
  layer.getContext("2d").putImageData(pixels, 0, 0);
  layer.bbox = bbox;
  return layer;
}

// Distinct colours for accepted masks, stepping hue by the golden ratio (as
// samkit.overlay.palette does), starting at purple: blue is the live prediction.
function colour(i) {
  const hue = (0.8 + i * 0.618033988749895) % 1;
  const [r, g, b] = hsvToRgb(hue, 0.78, 0.94);
  return [r, g, b, 130];
}

function hsvToRgb(h, s, v) {
  const i = Math.floor(h * 6), f = h * 6 - i;
  const p = v * (1 - s), q = v * (1 - f * s), t = v * (1 - (1 - f) * s);
  const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return rgb.map((c) => Math.round(c * 255));
}

// ---------------------------------------------------------------------------------- drawing
function render() {
  if (!state.image) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(state.image, 0, 0);
  for (const a of state.annotations) {
    drawLayer(a.layer);
    if (a.id === state.selected) outline(a.layer.bbox, "#1e73e8");
  }
  if (state.hover) drawLayer(state.hover.layer);
  const p = state.prediction;
  if (p && p.layers[p.choice]) drawLayer(p.layers[p.choice]);
  drawPrompt();
  // The cycle button names the mask shown and how many there are ("Mask 2 of 3 ▸").
  const cycle = $("cycle");
  cycle.disabled = !p || p.masks.length < 2;
  cycle.textContent = p && p.masks.length > 1
    ? `Mask ${p.choice + 1} of ${p.masks.length} ▸` : "Other masks";
  canvas.dataset.prediction = p ? String(p.masks.length) : "0";
  canvas.dataset.annotations = String(state.annotations.length);
}

// Show the image as large as the work area allows (up or down), keeping its aspect ratio.
function fitCanvas() {
  const wrap = $("canvas-wrap");
  const scale = Math.min(wrap.clientWidth / canvas.width, wrap.clientHeight / canvas.height);
  canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
  canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
}

function drawLayer(layer) {
  if (layer) ctx.drawImage(layer, layer.bbox[0], layer.bbox[1]);
}

function outline(bbox, style) {
  ctx.save();
  ctx.strokeStyle = style;
  ctx.lineWidth = screenPx(2);
  ctx.strokeRect(bbox[0], bbox[1], bbox[2], bbox[3]);
  ctx.restore();
}

function drawPrompt() {
  const box = state.dragBox || state.box;
  if (box) {
    ctx.save();
    ctx.strokeStyle = "#00e000";
    ctx.lineWidth = screenPx(2);
    ctx.setLineDash([screenPx(6), screenPx(4)]);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.restore();
  }
  const r = screenPx(6);
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = label === 1 ? "#00c800" : "#e00000";
    ctx.fill();
    ctx.lineWidth = screenPx(2);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

// Image pixels for `px` pixels on screen (the canvas is scaled to fit the window).
function screenPx(px) {
  const rect = canvas.getBoundingClientRect();
  return rect.width ? (px * canvas.width) / rect.width : px;
}

function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  // The server wants 0 <= x < width; keep one decimal (sub-pixel clicks mean nothing).
  const clamp = (v, max) => Math.round(Math.min(Math.max(v, 0), max - 0.1) * 10) / 10;
  return [clamp(x, canvas.width), clamp(y, canvas.height)];
}

// A mask the page decoded, as a layer like maskLayer's (no RLE round trip).
function bitsLayer(mask, width, rgba) {
  const [bx, by, bw, bh] = mask.bbox;
  const layer = document.createElement("canvas");
  layer.width = Math.max(1, bw);
  layer.height = Math.max(1, bh);
  const pixels = new ImageData(layer.width, layer.height);
  const data = pixels.data;
  for (let y = 0; y < bh; y++) {
    const row = (by + y) * width + bx;
    for (let x = 0; x < bw; x++) {
      if (mask.bits[row + x]) {
        const o = (y * layer.width + x) * 4;
        data[o] = rgba[0]; data[o + 1] = rgba[1]; data[o + 2] = rgba[2]; data[o + 3] = rgba[3];
      }
    }
  }
  layer.getContext("2d").putImageData(pixels, 0, 0);
  layer.bbox = mask.bbox;
  return layer;
}

// ------------------------------------------------------------------------------- prompting
function promptBody(extraPoint) {
  const points = extraPoint ? [...state.points, extraPoint] : state.points;
  return state.text ? { points, box: state.box, text: state.text } : { points, box: state.box };
}

// The server's rule (samkit.prompts.wants_multimask) for the prompts the page decodes: 3
// masks for an ambiguous prompt, one point alone or one box alone (text, which the server
// decodes, follows the server's rule there).
function wantsMultimask(points, box) {
  return box ? points.length === 0 : points.length === 1;
}

// The page's decoder, when it holds the current image's embedding and the prompt has no
// text (its graphs have no text slot: text goes to the server, which holds the CLIP).
function localDecoder() {
  const d = state.decoder;
  return d && d.image && state.info && d.image.id === state.info.id && !state.text ? d : null;
}

function argmax(values) {
  return values.reduce((best, v, i) => (v > values[best] ? i : best), 0);
}

// Per-click timings, for benchmarks/browser_decoder.py: the decode alone, and from the
// click (the mouseup event) to the frame that shows its mask.
window.samkitTimings = [];

function recordTiming(since, entry) {
  requestAnimationFrame(() => setTimeout(() => {
    if (since !== undefined) entry.paint_ms = performance.now() - since;
    window.samkitTimings.push(entry);
    if (window.samkitTimings.length > MAX_TIMINGS) window.samkitTimings.shift();
    canvas.dataset.decodes = String(Number(canvas.dataset.decodes || 0) + 1);
  }));
}

// `since`: the click's event time (performance.now clock), for click-to-paint.
async function decode(since) {
  const seq = ++state.decodeSeq;
  if (!state.points.length && !state.box && !state.text) {
    state.prediction = null;
    render();
    return;
  }
  const id = state.info.id;
  const local = localDecoder();
  try {
    let prediction, ms, entry;
    if (local) {
      const maskInput = state.maskInputs.length ? state.maskInputs[state.maskInputs.length - 1]
        : null;
      const result = await local.decode({
        points: state.points, box: state.box, maskInput,
        multimask: wantsMultimask(state.points, state.box),
      });
      if (seq !== state.decodeSeq || !state.info || state.info.id !== id) return; // stale
      const scores = result.masks.map((m) => m.score);
      prediction = {
        masks: result.masks, choice: argmax(scores), modelVersion: local.version,
        lowRes: result.lowRes,
        layers: result.masks.map((m) => bitsLayer(m, state.info.width, PREDICTION_RGBA)),
      };
      ms = result.ms;
      entry = { decoder: "browser", graph: local.graph, threads: local.threads,
        session: result.session, decode_ms: result.ms };
    } else {
      const result = await api("POST", `/api/images/${id}/decode`, promptBody());
      if (seq !== state.decodeSeq || !state.info || state.info.id !== id) return; // stale
      prediction = {
        masks: result.masks, choice: result.best, modelVersion: result.model_version,
        layers: result.masks.map((m) => maskLayer(m.segmentation, m.bbox, PREDICTION_RGBA)),
      };
      ms = result.server_ms;
      entry = { decoder: "server", decode_ms: result.decode_ms, server_ms: result.server_ms };
    }
    state.prediction = prediction;
    state.hover = null;
    const n = prediction.masks.length, best = prediction.choice;
    const many = n > 1 ? ` — Tab for the other ${n - 1}` : "";
    const where = local ? "in this page" : "on the server";
    setStatus(`Mask ${best + 1} of ${n} (score ${prediction.masks[best].score.toFixed(2)}, ` +
      `${ms.toFixed(0)} ms ${where})${many}; Enter accepts.`);
    render();
    recordTiming(since, entry);
  } catch (err) {
    if (local && local.released) return; // a model switch replaced it mid-decode
    report(err, "Segmenting");
  }
}

// A new point refines the mask shown now (its low-res logits become the mask prompt, as in
// the paper's demo); a new box starts afresh.
function pushMaskInput(refine) {
  const p = state.prediction;
  state.maskInputs.push(refine && p && p.lowRes ? p.lowRes[p.choice] : null);
}

function schedulePreview(point) {
  clearTimeout(state.hoverTimer);
  const delay = localDecoder() ? LOCAL_HOVER_DELAY_MS : HOVER_DELAY_MS;
  state.hoverTimer = setTimeout(() => preview(point), delay);
}

async function preview(point) {
  if (!state.info || state.dragStart) return;
  if (state.hoverAbort) state.hoverAbort.abort();
  state.hoverAbort = new AbortController();
  const seq = ++state.hoverSeq;
  const id = state.info.id;
  const local = localDecoder();
  if (local) {
    if (local.busy()) return; // a click is being decoded: the preview would be stale anyway
    try {
      const p = state.prediction;
      const result = await local.decode({
        ...promptBody([point[0], point[1], 1]), multimask: false,
        maskInput: p && p.lowRes && state.points.length ? p.lowRes[p.choice] : null,
      });
      if (seq !== state.hoverSeq || !state.info || state.info.id !== id) return;
      state.hover = { layer: bitsLayer(result.masks[0], state.info.width, HOVER_RGBA) };
      render();
    } catch (err) {
      report(err, "Preview");
    }
    return;
  }
  try {
    const body = { ...promptBody([point[0], point[1], 1]), preview: true, multimask: false };
    const result = await api("POST", `/api/images/${id}/decode`, body,
      { signal: state.hoverAbort.signal });
    if (seq !== state.hoverSeq || !state.info || state.info.id !== id) return;
    const m = result.masks[0];
    state.hover = { layer: maskLayer(m.segmentation, m.bbox, HOVER_RGBA) };
    render();
  } catch (err) {
    // A preview the server is too busy for is simply skipped; real failures are shown.
    if (err.name !== "AbortError" && err.status !== 503) report(err, "Preview");
  }
}

function cancelPreview() {
  clearTimeout(state.hoverTimer);
  state.hoverSeq++;
  if (state.hoverAbort) state.hoverAbort.abort();
  if (state.hover) {
    state.hover = null;
    render();
  }
}

function setText(text) {
  state.text = text;
  $("text-prompt").value = text;
}

function clearPrompt() {
  state.points = [];
  state.box = null;
  setText("");
  state.prediction = null;
  state.maskInputs = [];
  state.decodeSeq++;
  state.undo = state.undo.filter((u) => u.type !== "point" && u.type !== "box");
  render();
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());

canvas.addEventListener("mousedown", (e) => {
  if (!state.info) return;
  state.dragStart = { x: e.clientX, y: e.clientY, point: imagePoint(e), button: e.button };
});

canvas.addEventListener("mousemove", (e) => {
  if (!state.info) return;
  const start = state.dragStart;
  if (start && start.button === 0 &&
      Math.hypot(e.clientX - start.x, e.clientY - start.y) > DRAG_PX) {
    const [x0, y0] = start.point, [x1, y1] = imagePoint(e);
    state.dragBox = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    cancelPreview();
    render();
  } else if (!start) {
    schedulePreview(imagePoint(e));
  }
});

canvas.addEventListener("mouseup", (e) => {
  const start = state.dragStart;
  state.dragStart = null;
  if (!start || !state.info) return;
  cancelPreview();
  if (state.dragBox) {
    const box = state.dragBox;
    state.dragBox = null;
    if (box[2] - box[0] < 1 || box[3] - box[1] < 1) return render();
    state.undo.push({ type: "box", previous: state.box });
    pushMaskInput(false);
    state.box = box;
  } else {
    const label = e.button === 2 || e.altKey ? 0 : 1;
    pushMaskInput(true);
    state.points.push([...start.point, label]);
    state.undo.push({ type: "point" });
  }
  render();
  decode(e.timeStamp);
});

canvas.addEventListener("mouseleave", () => {
  cancelPreview();
  if (state.dragStart) {
    state.dragStart = null;
    state.dragBox = null;
    render();
  }
});

// ------------------------------------------------------------------------------ annotations
function annotator() {
  const name = $("annotator").value.trim() || "anonymous";
  localStorage.setItem("samkit-annotator", name);
  return name;
}

function secondsSpent() {
  return Math.min((performance.now() - state.shownAt) / 1000, MAX_SECONDS);
}

function withLayer(a, i) {
  const rgba = a.status === "candidate" ? CANDIDATE_RGBA : colour(i);
  a.layer = maskLayer(a.segmentation, a.bbox, rgba);
  return a;
}

async function loadAnnotations() {
  const id = state.info.id;
  const list = await api("GET", `/api/images/${id}/annotations`);
  if (!state.info || state.info.id !== id) return;
  state.annotations = list.map(withLayer);
  showMasks();
  render();
}

async function accept() {
  const p = state.prediction;
  if (!p) {
    setStatus("Nothing to accept yet: click on an object first.", "error");
    return;
  }
  const mask = p.masks[p.choice];
  const body = {
    // A mask decoded in the page is encoded here; the server checks it like any other.
    segmentation: mask.segmentation ||
      SamkitDecoder.rleEncode(mask.bits, state.info.height, state.info.width),
    prompts: promptBody(),
    score: mask.score,
    seconds: secondsSpent(),
    annotator: annotator(),
    model_version: p.modelVersion,
  };
  try {
    const saved = await api("POST", `/api/images/${state.info.id}/annotations`, body);
    state.annotations.push(withLayer(saved, state.annotations.length));
    state.undo.push({ type: "accept", id: saved.id });
    state.shownAt = performance.now();
    state.points = [];
    state.box = null;
    setText("");
    state.prediction = null;
    state.maskInputs = [];
    state.undo = state.undo.filter((u) => u.type !== "point" && u.type !== "box");
    setStatus(`Accepted mask #${saved.id} (${saved.area} px). Click the next object.`);
    afterChange();
  } catch (err) {
    report(err, "Accepting");
  }
}

async function deleteAnnotation(id, { undoable = true } = {}) {
  try {
    await api("DELETE", `/api/annotations/${id}`);
    state.annotations = state.annotations.filter((a) => a.id !== id);
    if (state.selected === id) state.selected = null;
    if (undoable) state.undo.push({ type: "delete", id });
    setStatus(`Deleted mask #${id}${undoable ? " (Ctrl+Z restores it)" : ""}.`);
    afterChange();
  } catch (err) {
    report(err, "Deleting");
  }
}

async function keepCandidate(id) {
  try {
    const kept = await api("POST", `/api/annotations/${id}/keep`,
      { seconds: secondsSpent(), annotator: annotator() });
    state.shownAt = performance.now();
    const i = state.annotations.findIndex((a) => a.id === id);
    if (i >= 0) state.annotations[i] = withLayer(kept, i);
    setStatus(`Kept candidate #${id}.`);
    afterChange();
  } catch (err) {
    report(err, "Keeping");
  }
}

async function undo() {
  const last = state.undo.pop();
  if (!last) {
    setStatus("Nothing to undo.");
    return;
  }
  if (last.type === "point") {
    state.points.pop();
    state.maskInputs.pop();
    decode();
  } else if (last.type === "box") {
    state.box = last.previous;
    state.maskInputs.pop();
    decode();
  } else if (last.type === "accept") {
    await deleteAnnotation(last.id, { undoable: false });
  } else if (last.type === "delete") {
    try {
      await api("POST", `/api/annotations/${last.id}/restore`);
      await loadAnnotations();
      setStatus(`Restored mask #${last.id}.`);
      refreshSummary();
    } catch (err) {
      report(err, "Restoring");
    }
  }
  render();
}

function afterChange() {
  showMasks();
  render();
  refreshSummary();
}

function showMasks() {
  const list = $("mask-list");
  list.replaceChildren();
  const candidates = state.annotations.filter((a) => a.status === "candidate").length;
  $("mask-count").textContent = `(${state.annotations.length - candidates} accepted` +
    (candidates ? `, ${candidates} candidates)` : ")");
  state.annotations.forEach((a, i) => {
    const li = document.createElement("li");
    li.className = a.status + (a.id === state.selected ? " selected" : "");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const rgba = a.status === "candidate" ? CANDIDATE_RGBA : colour(i);
    swatch.style.background = `rgb(${rgba[0]}, ${rgba[1]}, ${rgba[2]})`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `#${a.id} ${a.status === "candidate" ? "candidate" : "stage " + a.stage}` +
      ` · ${a.area} px`;
    li.append(swatch, label);
    if (a.status === "candidate") li.append(button("Keep", () => keepCandidate(a.id)));
    li.append(button("×", () => deleteAnnotation(a.id), "Delete this mask"));
    li.addEventListener("click", () => {
      state.selected = state.selected === a.id ? null : a.id;
      showMasks();
      render();
    });
    list.append(li);
  });
}

function button(text, onClick, title) {
  const b = document.createElement("button");
  b.textContent = text;
  if (title) b.title = title;
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return b;
}

// ----------------------------------------------------------------------------------- images
async function loadImages() {
  state.images = await api("GET", "/api/images");
  showImages();
}

function showImages() {
  const list = $("image-list");
  list.replaceChildren();
  state.images.forEach((img, i) => {
    const li = document.createElement("li");
    li.setAttribute("aria-current", String(i === state.index));
    const name = document.createElement("span");
    name.textContent = img.file_name;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = img.candidates ? `${img.accepted} +${img.candidates}?` : `${img.accepted}`;
    li.append(name, count);
    li.addEventListener("click", () => openImage(i));
    list.append(li);
  });
  $("position").textContent = state.images.length ?
    `${state.index + 1} / ${state.images.length}` : "no images";
  $("prev").disabled = state.index <= 0;
  $("next").disabled = state.index >= state.images.length - 1;
}

async function openImage(index) {
  if (index < 0 || index >= state.images.length) return;
  const seq = ++state.loadSeq;
  const summary = state.images[index];
  cancelPreview();
  Object.assign(state, {
    index, info: null, points: [], box: null, prediction: null, hover: null,
    annotations: [], selected: null, undo: [], maskInputs: [],
  });
  setText("");
  showImages();
  showMasks();
  setStatus(`Loading ${summary.file_name}…`);
  try {
    const image = new Image();
    image.src = `/api/images/${summary.id}/file`;
    await image.decode();
    if (seq !== state.loadSeq) return;
    state.image = image;
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    fitCanvas();
    render();
    setStatus(`Preparing ${summary.file_name} (computing its embedding once)…`);
    const ready = await withRetry(
      () => api("POST", `/api/images/${summary.id}/prepare`), "Preparing");
    if (seq !== state.loadSeq) return;
    state.info = summary;
    state.shownAt = performance.now();
    await attachImage();
    if (seq !== state.loadSeq) return;
    await loadAnnotations();
    const found = ready.candidates_added ? ` ${ready.candidates_added} candidate masks added.` : "";
    setStatus(`Ready: click an object (hover to preview).${found}`);
    canvas.dataset.ready = String(summary.id);
    if (found) refreshSummary();
  } catch (err) {
    if (seq === state.loadSeq) report(err, `Opening ${summary.file_name}`);
  }
}

async function segmentEverything() {
  if (!state.info) return;
  setStatus("Segmenting everything (this takes a few seconds)…");
  try {
    const result = await withRetry(
      () => api("POST", `/api/images/${state.info.id}/everything`), "Segment everything");
    await loadAnnotations();
    setStatus(`${result.candidates_added} candidate masks added: Keep or × each.`);
    refreshSummary();
  } catch (err) {
    report(err, "Segment everything");
  }
}

// The server accepts only plain names (letters, digits, . _ -); make a file's name one, as
// `samkit annotate --images` does for imported files.
function safeName(name) {
  return name.replace(/[^A-Za-z0-9._-]/g, "_").replace(/\.\./g, "_").replace(/^[^A-Za-z0-9]+/, "");
}

async function upload(files) {
  for (const file of files) {
    const name = safeName(file.name);
    try {
      setStatus(`Uploading ${name}…`);
      await api("POST", `/api/images?name=${encodeURIComponent(name)}`, undefined, { raw: file });
      setStatus(`Added ${name}.`);
    } catch (err) {
      report(err, `Uploading ${file.name}`);
    }
  }
  await loadImages();
  if (state.index < 0 && state.images.length) openImage(0);
}

// The data-engine numbers (paper §4) as a table that fits the side panel: short headings,
// the full names in their tooltips.
const STATS_COLUMNS = [
  ["stage", "stage", "Stage (1 manual, 2 semi-auto, 3 auto)"],
  ["model_version", "model", "Model version"],
  ["images", "img", "Images with accepted masks"],
  ["masks", "masks", "Accepted masks"],
  ["masks_per_image", "/img", "Masks per image"],
  ["seconds_per_mask", "s/mask", "Seconds per mask (annotation time; compute for stage 3)"],
  ["masks_per_hour", "/hour", "Masks per hour"],
];
const STAGE_NAMES = { 1: "1 manual", 2: "2 semi", 3: "3 auto" };

function statsCell(key, value) {
  if (value === null || value === undefined) return "-";
  if (key === "stage") return STAGE_NAMES[value] || String(value);
  if (key === "model_version") return typeof value === "number" ? `v${value}` : String(value);
  if (key === "masks_per_image") return value.toFixed(1);
  if (key === "seconds_per_mask") return value.toFixed(1);
  if (key === "masks_per_hour") return value.toFixed(0);
  return String(value);
}

function showStats(rows) {
  const table = $("stats");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const [, label, title] of STATS_COLUMNS) {
    const th = document.createElement("th");
    th.textContent = label;
    th.title = title;
    head.append(th);
  }
  const body = table.createTBody();
  for (const r of rows) {
    const tr = body.insertRow();
    for (const [key] of STATS_COLUMNS) tr.insertCell().textContent = statsCell(key, r[key]);
  }
}

async function refreshSummary() {
  try {
    await loadImages();
    showStats((await api("GET", "/api/stats")).rows);
  } catch (err) {
    report(err, "Refreshing");
  }
}

// ----------------------------------------------------------------------- settings and models
async function loadModels() {
  const models = await api("GET", "/api/models");
  const select = $("model-version");
  select.replaceChildren();
  for (const v of models.versions) {
    const option = document.createElement("option");
    option.value = v.id;
    const how = v.note && v.note.steps ? `, retrained ${v.note.steps} steps` : "";
    option.textContent = `v${v.id} ${v.model}${how}`;
    option.selected = v.id === models.loaded;
    select.append(option);
  }
  // Random weights give patterned masks with made-up scores: say so where masks are shown.
  const badge = $("model-badge");
  badge.textContent = models.trained
    ? `${models.model} · trained · weights: ${models.weights}`
    : `${models.model} · UNTRAINED (weights: ${models.weights}) — masks mean nothing`;
  badge.className = models.trained ? "trained" : "untrained";
  showTextPrompt(models.text);
}

// The text box: shown for a model with a text slot, usable once the server has its CLIP.
function showTextPrompt(text) {
  const row = $("text-row"), input = $("text-prompt");
  row.hidden = !text.slot;
  input.disabled = !text.ready;
  input.title = text.ready ? `Describe the object (Enter); CLIP: ${text.clip}` : text.reason;
  if (!text.ready && state.text) setText("");
}

$("text-prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter") {
    e.preventDefault();
    const text = e.target.value.trim();
    if (!state.info || text === state.text) return;
    cancelPreview();
    state.text = text;
    state.maskInputs = []; // a new text starts the object afresh
    decode(e.timeStamp);
  } else if (e.key === "Escape") {
    e.target.blur();
  }
});

$("model-version").addEventListener("focus", () => loadModels().catch((e) => report(e, "Models")));
$("model-version").addEventListener("change", async (e) => {
  setStatus(`Loading model version ${e.target.value}…`);
  try {
    await withRetry(() => api("POST", "/api/models/current", { version: Number(e.target.value) }),
      "Switching model");
    await loadModels();
    initDecoder(); // new graphs and embeddings (the old ones are dropped from the cache)
    openImage(state.index); // the new model needs this image's embedding
  } catch (err) {
    report(err, "Switching model");
    loadModels();
  }
});

$("stage").addEventListener("change", async (e) => {
  try {
    await api("PUT", "/api/settings", { stage: Number(e.target.value) });
    openImage(state.index); // stage 2 fills the image with candidates
  } catch (err) {
    report(err, "Changing stage");
  }
});

// ------------------------------------------------------------------------------ keyboard etc.
function cycleMask() {
  const p = state.prediction;
  if (p && p.masks.length > 1) {
    p.choice = (p.choice + 1) % p.masks.length;
    setStatus(`Mask ${p.choice + 1} of ${p.masks.length} (score ` +
      `${p.masks[p.choice].score.toFixed(2)}); Enter accepts.`);
    render();
  }
}

document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, select, textarea")) return;
  if (e.key === "Tab") {
    e.preventDefault();
    cycleMask();
  } else if (e.key === "Enter") {
    e.preventDefault();
    accept();
  } else if (e.key === "Escape") {
    clearPrompt();
  } else if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  } else if (e.key === "Delete" || e.key === "Backspace") {
    if (state.selected !== null) deleteAnnotation(state.selected);
  } else if (e.key.toLowerCase() === "k") {
    const a = state.annotations.find((x) => x.id === state.selected);
    if (a && a.status === "candidate") keepCandidate(a.id);
  } else if (e.key === "ArrowRight") {
    openImage(state.index + 1);
  } else if (e.key === "ArrowLeft") {
    openImage(state.index - 1);
  }
});

$("accept").addEventListener("click", accept);
$("cycle").addEventListener("click", cycleMask);
$("clear").addEventListener("click", clearPrompt);
$("undo").addEventListener("click", undo);
$("everything").addEventListener("click", segmentEverything);
$("prev").addEventListener("click", () => openImage(state.index - 1));
$("next").addEventListener("click", () => openImage(state.index + 1));
$("upload").addEventListener("change", (e) => upload([...e.target.files]));
$("annotator").value = localStorage.getItem("samkit-annotator") || "anonymous";
window.addEventListener("resize", () => {
  fitCanvas();
  render();
});

// ---------------------------------------------------------------------- the page's decoder
function showDecoder(text, where) {
  const el = $("decoder");
  el.textContent = text;
  el.className = where;
  canvas.dataset.decoder = where;
}

// Decode in this page when the server offers graphs and the runtime loads; else (and until
// then) on the server. URL options: ?decoder=server, ?graph=int8, ?threads=N.
async function initDecoder() {
  const seq = ++state.decoderSeq;
  if (state.decoder) state.decoder.release(); // its graphs' wasm memory
  state.decoder = null;
  const params = new URLSearchParams(location.search);
  if (params.get("decoder") === "server") {
    showDecoder("Decoding on the server (?decoder=server)", "server");
    return;
  }
  try {
    let manifest = await api("GET", "/api/decoder");
    while (manifest.state === "exporting") {
      showDecoder(`Decoding on the server for now: ${manifest.reason}`, "server");
      await new Promise((resolve) => setTimeout(resolve, EXPORT_POLL_MS));
      if (seq !== state.decoderSeq) return;
      manifest = await api("GET", "/api/decoder");
    }
    if (seq !== state.decoderSeq) return;
    if (!manifest.available) {
      showDecoder(`Decoding on the server: ${manifest.reason}`, "server");
      return;
    }
    const isolated = window.crossOriginIsolated === true;
    const threads = params.has("threads") ? Math.max(1, Number(params.get("threads")) || 1)
      : isolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const decoder = await SamkitDecoder.BrowserDecoder.create(manifest,
      { graph: params.get("graph") || "fp32", threads });
    if (seq !== state.decoderSeq) {
      decoder.release(); // a newer initDecoder call has its own
      return;
    }
    state.decoder = decoder;
    showDecoder(`Decoding in this page (onnxruntime-web, ${decoder.graph}, ` +
      `${threads} thread${threads > 1 ? "s" : ""}, model v${decoder.version})`, "browser");
    await attachImage();
  } catch (err) {
    if (seq !== state.decoderSeq) return;
    state.decoder = null;
    showDecoder(`Decoding on the server: the page's decoder did not start (${err.message})`,
      "server");
  }
}

// Give the page's decoder the current image's embedding (from IndexedDB when seen before).
async function attachImage() {
  const decoder = state.decoder, info = state.info;
  if (!decoder || !info) return;
  try {
    await decoder.setImage(info.id, info.height, info.width);
    if (state.decoder === decoder && state.info === info) canvas.dataset.local = String(info.id);
  } catch (err) {
    if (err.status === 409) initDecoder(); // the server loaded another model version
    else report(err, "Fetching the embedding");
  }
}

async function start() {
  try {
    const project = await api("GET", "/api/project");
    $("project-name").textContent = project.name;
    $("stage").value = String(project.settings.stage);
    await loadModels();
    initDecoder();
    await refreshSummary();
    if (state.images.length) {
      const firstOpen = state.images.findIndex((img) => img.accepted === 0);
      await openImage(Math.max(firstOpen, 0));
    } else {
      setStatus("No images yet: add some with “Add images…”.");
    }
  } catch (err) {
    report(err, "Starting");
  }
}

start();
