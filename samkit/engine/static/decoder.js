// samkit annotate: the page's own mask decoder (paper §3, "Efficiency": the prompt encoder
// and mask decoder run in the browser once the image embedding is computed).
//
// onnxruntime-web (wasm; SIMD, and threads when the page is cross-origin isolated) runs the
// server's exported graphs (samkit.engine.web_decoder): `decoder_image.onnx` once per image
// turns the embedding into the decoder's shared image-side products (kept in memory for the
// current image), and `decoder_prompts.onnx` decodes each prompt without a mask prompt from
// them; a prompt with a mask prompt (refinement: the shown mask's low-res logits) changes
// the image side, so it goes through `decoder_select.onnx` (the official decoder.onnx graph
// with `mask_index`), which takes the embedding itself. Both take the prompts in the
// resized frame and the original size, and return logits already upscaled to the image for
// the masks asked for only, exactly as the server's predictor does. Graphs (by sha256) and
// float16 embeddings (by project, model version and image) are kept in IndexedDB, so a
// second visit downloads nothing; `decoder_select.onnx` is fetched at the first refinement.
// A replaced decoder (model switch) releases its sessions.
"use strict";

const SamkitDecoder = (() => {
  const DB_NAME = "samkit-annotate";
  const STORE = "blobs";

  // ---------------------------------------------------------------------------- IndexedDB
  let dbPromise = null;
  function openDb() {
    if (!dbPromise) {
      dbPromise = new Promise((resolve, reject) => {
        const request = indexedDB.open(DB_NAME, 1);
        request.onupgradeneeded = () => request.result.createObjectStore(STORE);
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
      }).catch((err) => {
        dbPromise = null;
        throw err;
      });
    }
    return dbPromise;
  }

  // A cache that cannot be opened (private mode, quota) only costs downloads: never fail.
  async function cached(key, fetcher) {
    let db = null;
    try {
      db = await openDb();
      const hit = await new Promise((resolve, reject) => {
        const request = db.transaction(STORE).objectStore(STORE).get(key);
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
      });
      if (hit !== undefined) return { value: hit, hit: true };
    } catch (err) {
      db = null;
    }
    const value = await fetcher();
    if (db) {
      try {
        db.transaction(STORE, "readwrite").objectStore(STORE).put(value, key);
      } catch (err) { /* not cached: next time it is fetched again */ }
    }
    return { value, hit: false };
  }

  // Drop what a new model version made stale: other versions' embeddings of this project,
  // and graphs no longer in the manifest.
  async function prune(keep) {
    try {
      const db = await openDb();
      const store = db.transaction(STORE, "readwrite").objectStore(STORE);
      const request = store.openKeyCursor();
      await new Promise((resolve, reject) => {
        request.onsuccess = () => {
          const cursor = request.result;
          if (!cursor) return resolve();
          if (!keep(String(cursor.key))) store.delete(cursor.key);
          cursor.continue();
        };
        request.onerror = () => reject(request.error);
      });
    } catch (err) { /* nothing cached, nothing to prune */ }
  }

  // ------------------------------------------------------------------------------ helpers
  async function fetchBytes(url) {
    const response = await fetch(url);
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).error || message;
      } catch (err) { /* not JSON */ }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return { bytes: await response.arrayBuffer(), headers: response.headers };
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`cannot load ${src}`));
      document.head.append(script);
    });
  }

  let halfTable = null;
  // IEEE half -> float, through a 64 Ki-entry table (built once; exact for every value).
  function halfToFloat(half) {
    if (!halfTable) {
      halfTable = new Float32Array(65536);
      for (let h = 0; h < 65536; h++) {
        const sign = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
        halfTable[h] = e === 0 ? sign * m * 2 ** -24
          : e === 31 ? (m ? NaN : sign * Infinity) : sign * (1 + m / 1024) * 2 ** (e - 15);
      }
    }
    const out = new Float32Array(half.length);
    for (let i = 0; i < half.length; i++) out[i] = halfTable[half[i]];
    return out;
  }

  // The resized frame of samkit.images.preprocess_shape: long side = imageSize, rounded as
  // Python's int(x * scale + 0.5) in float64.
  function resizedShape(h, w, imageSize) {
    const scale = imageSize / Math.max(h, w);
    return [Math.floor(h * scale + 0.5), Math.floor(w * scale + 0.5)];
  }

  // Logits of mask `index` (of a 1 x M x H x W output) -> {bits, area, bbox} at logit >
  // threshold; bbox is COCO's [x, y, w, h] like pycocotools' toBbox.
  function threshold(logits, index, h, w, limit) {
    const n = h * w, offset = index * n, bits = new Uint8Array(n);
    let area = 0, x0 = w, y0 = h, x1 = -1, y1 = -1;
    for (let y = 0; y < h; y++) {
      const row = offset + y * w, out = y * w;
      let any = false;
      for (let x = 0; x < w; x++) {
        if (logits[row + x] > limit) {
          bits[out + x] = 1;
          area++;
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          any = true;
        }
      }
      if (any) {
        if (y < y0) y0 = y;
        y1 = y;
      }
    }
    const bbox = area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0];
    return { bits, area, bbox };
  }

  // A row-major 0/1 mask -> compressed COCO RLE (pycocotools' rleEncode + rleToString):
  // runs down the columns, starting with a run of zeros.
  function rleEncode(bits, h, w) {
    const counts = [];
    let previous = 0, run = 0;
    for (let x = 0; x < w; x++) {
      for (let i = x; i < h * w; i += w) {
        if (bits[i] !== previous) {
          counts.push(run);
          run = 0;
          previous = bits[i];
        }
        run++;
      }
    }
    counts.push(run);
    let s = "";
    for (let i = 0; i < counts.length; i++) {
      let x = counts[i];
      if (i > 2) x -= counts[i - 2];
      let more = true;
      while (more) {
        let c = x & 0x1f;
        x >>= 5;
        more = c & 0x10 ? x !== -1 : x !== 0;
        if (more) c |= 0x20;
        s += String.fromCharCode(c + 48);
      }
    }
    return { size: [h, w], counts: s };
  }

  // -------------------------------------------------------------------------- the decoder
  // Masks of a decode: the 3 multimask outputs, or the single-mask one (samkit.onnx.export).
  const MULTIMASK = [1, 2, 3], SINGLE = [0];
  // Graphs loaded with the decoder; decoder_select (refinements) on first use.
  const EAGER = ["decoder_image", "decoder_prompts"];

  class BrowserDecoder {
    // manifest: GET /api/decoder (available); options: {graph: "fp32"|"int8", threads}.
    static async create(manifest, { graph = "fp32", threads = 1 } = {}) {
      const chosen = manifest.graphs[graph];
      if (!chosen) throw new Error(`no ${graph} graphs (have ${Object.keys(manifest.graphs)})`);
      if (typeof ort === "undefined") await loadScript(`${manifest.runtime}ort.wasm.min.js`);
      ort.env.wasm.wasmPaths = manifest.runtime;
      ort.env.wasm.numThreads = threads;
      ort.env.wasm.proxy = false;
      const shas = new Set(Object.values(manifest.graphs).flatMap(
        (roles) => Object.values(roles).map((g) => g.sha256)));
      const prefix = `emb:${manifest.cache_id}:`;
      const current = `${prefix}v${manifest.model_version}:`;
      await prune((key) => key.startsWith("graph:") ? shas.has(key.slice(6))
        : !key.startsWith(prefix) || key.startsWith(current));
      const decoder = new BrowserDecoder(manifest, graph, threads, chosen);
      // The refinement graph waits for the first refinement: a session of boxes and first
      // clicks never downloads it.
      await Promise.all(EAGER.map((role) => decoder.session(role)));
      return decoder;
    }

    constructor(manifest, graph, threads, graphs) {
      this.manifest = manifest;
      this.version = manifest.model_version;
      this.graph = graph;
      this.threads = threads;
      this.graphs = graphs; // by role: {url, sha256, bytes}
      this.sessions = {}; // by role: a promise of its ort.InferenceSession, once asked for
      this.released = false;
      this.imageSize = manifest.image_size;
      this.lowRes = manifest.mask_input_size; // [h, w] of the mask prompt
      this.limit = manifest.mask_threshold;
      this.bytes = { graph: 0, embeddings: 0 }; // fetched (not from IndexedDB)
      this.image = null; // {id, height, width, embedding (ort.Tensor), products (by name)}
      this.imageSeq = 0; // the latest setImage call: an earlier one finishing later is stale
      this.running = null; // the sessions run one at a time
      this.hasMask = new ort.Tensor("float32", Float32Array.of(1), [1]);
    }

    // Make image `id` (original size height x width) current: its embedding from IndexedDB,
    // else from the server (computed there first if needed), and its image-side products.
    // Returns whether the embedding came from IndexedDB.
    async setImage(id, height, width) {
      const seq = ++this.imageSeq;
      const key = `emb:${this.manifest.cache_id}:v${this.version}:${id}`;
      const got = await cached(key, async () => {
        const { bytes, headers } = await fetchBytes(
          `/api/images/${id}/embedding?version=${this.version}`);
        const shape = headers.get("X-Samkit-Shape");
        if (shape !== this.manifest.embedding_shape.join(",")) {
          throw new Error(`embedding shape ${shape}, the decoder wants ` +
            this.manifest.embedding_shape.join(","));
        }
        return bytes;
      });
      if (!got.hit) this.bytes.embeddings += got.value.byteLength;
      const embedding = new ort.Tensor("float32", halfToFloat(new Uint16Array(got.value)),
        this.manifest.embedding_shape);
      const imageSession = await this.session("decoder_image");
      const products = await this.exclusive(
        () => imageSession.run({ image_embeddings: embedding }));
      if (seq === this.imageSeq) this.image = { id, height, width, embedding, products };
      return got.hit;
    }

    busy() {
      return this.running !== null;
    }

    // The session of graph `role`: from IndexedDB (by sha256) or downloaded, created once.
    session(role) {
      if (this.released) return Promise.reject(new Error("this decoder was replaced"));
      if (!this.sessions[role]) {
        const info = this.graphs[role];
        this.sessions[role] = (async () => {
          const got = await cached(`graph:${info.sha256}`,
            async () => (await fetchBytes(info.url)).bytes);
          if (!got.hit) this.bytes.graph += info.bytes;
          return ort.InferenceSession.create(new Uint8Array(got.value), {
            executionProviders: ["wasm"], graphOptimizationLevel: "all",
          });
        })();
        this.sessions[role].catch(() => { delete this.sessions[role]; }); // retried next time
      }
      return this.sessions[role];
    }

    // Free the wasm memory of every session (a model switch replaces this decoder), after
    // the run in flight.
    async release() {
      this.released = true;
      while (this.running) await this.running.catch(() => {});
      const sessions = Object.values(this.sessions);
      this.sessions = {};
      for (const pending of sessions) {
        try {
          await (await pending).release();
        } catch (err) { /* never created: nothing to free */ }
      }
    }

    // Run `job` (a session run) once the previous one has finished.
    async exclusive(job) {
      while (this.running) await this.running.catch(() => {});
      const run = job();
      this.running = run;
      try {
        return await run;
      } finally {
        if (this.running === run) this.running = null;
      }
    }

    // Prompts in image pixels, as the server takes them: points [[x, y, label]], box
    // [x0, y0, x1, y1] or null, maskInput (a previous mask's low-res logits) or null.
    // Returns {masks: [{bits, area, bbox, score}], lowRes: [Float32Array], ms, session}: the
    // 3 multimask outputs, or the single-mask one, and the graph that decoded them.
    async decode({ points, box, maskInput = null, multimask }) {
      if (maskInput) await this.session("decoder_select"); // the first refinement loads it
      return this.exclusive(() => this.run(points, box, maskInput, multimask));
    }

    async run(points, box, maskInput, multimask) {
      const { height: h, width: w, embedding, products } = this.image;
      const [newH, newW] = resizedShape(h, w, this.imageSize);
      const sx = newW / w, sy = newH / h;
      const coords = [], labels = [];
      for (const [x, y, label] of points) {
        coords.push(x * sx, y * sy);
        labels.push(label);
      }
      if (box) {
        coords.push(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy);
        labels.push(2, 3); // box corners
      } else {
        coords.push(0, 0); // the padding point the prompt encoder adds without a box
        labels.push(-1);
      }
      const n = labels.length;
      const [mh, mw] = this.lowRes;
      const picks = multimask ? MULTIMASK : SINGLE;
      const prompt = {
        point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
        point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, n]),
        orig_im_size: new ort.Tensor("float32", Float32Array.of(h, w), [2]),
        mask_index: new ort.Tensor("int64", BigInt64Array.from(picks.map(BigInt)),
          [picks.length]),
      };
      // Without a mask prompt the image side is the same for every prompt: the pair's
      // per-prompt graph reads it from the products setImage computed.
      const [session, feeds] = maskInput
        ? ["decoder_select", { ...prompt, image_embeddings: embedding,
          mask_input: new ort.Tensor("float32", maskInput, [1, 1, mh, mw]),
          has_mask_input: this.hasMask }]
        : ["decoder_prompts", { ...prompt, ...products }];
      const start = performance.now();
      const out = await (await this.session(session)).run(feeds);
      const ms = performance.now() - start;
      // masks holds the picked masks only (1 x picks.length x h x w); the scores and low-res
      // logits all 4.
      const logits = out.masks.data, iou = out.iou_predictions.data;
      const low = out.low_res_masks.data;
      const masks = picks.map((i, k) => ({ ...threshold(logits, k, h, w, this.limit),
        score: iou[i] }));
      const lowRes = picks.map((i) => low.slice(i * mh * mw, (i + 1) * mh * mw));
      return { masks, lowRes, ms, session };
    }
  }

  return { BrowserDecoder, rleEncode };
})();
