"""Where a page decode's time goes: onnxruntime-web's own profiler, per op type, inside
headless Chromium (docs/engine.md, "Latency in the page").

    python scripts/profile_page_decoder.py [--model samkit-tiny] [--graph fp32] [--runs 20]

Exports the page's graphs for ``--model`` exactly as ``samkit annotate`` does
(:func:`samkit.engine.web_decoder.export_graphs`), plus the official-interface
``decoder.onnx`` the page used before them (samkit-tiny with its bundled weights, the official
models with random ones, which do not change a decoder's cost). Loads them in Debian's
Chromium through Playwright (no server: requests are answered from the folder, with the
COOP/COEP headers, so the page is cross-origin isolated and its clock fine-grained) and runs
each ``--runs`` times (after ``--warmup`` uncounted runs) with ``enableProfiling``, on a
``--size`` image:

* ``decoder.onnx``: one foreground click, no mask prompt, all 4 masks upscaled (its fixed
  interface);
* ``decoder_prompts.onnx``: the same click, masks 1, 2, 3 upscaled (what the page shows);
* ``decoder_select.onnx``: a refinement, the click plus a background point and a mask
  prompt, mask 0 upscaled.

The profile events onnxruntime-web prints to the console at ``endProfiling()`` are summed
per op type and per node. What it is for: the shares. The profiler times every kernel,
which adds a little to each, and absolute milliseconds depend on what else the machine runs;
benchmarks/browser_decoder.py measures latency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from playwright.sync_api import Route, sync_playwright

from samkit.build import build_sam
from samkit.engine.server import RUNTIME_DIR
from samkit.engine.web_decoder import GRAPHS, RUNTIME_FILES, export_graphs
from samkit.onnx.export import export_decoder, quantize_int8
from samkit.onnx.names import DECODER_FILE, int8_file

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ORIGIN = "http://localhost"  # a trustworthy origin: COOP/COEP take effect
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
             "Cross-Origin-Embedder-Policy": "require-corp"}
PAGE = b"<!doctype html><meta charset='utf-8'><title>profile</title>"
TOP_NODES = 8

# In the page: load the runtime, make the image-side products once, then profile each graph.
PROFILE_JS = """async ({graphs, runs, warmup, threads, height, width, imageSize, embedding,
                        lowRes}) => {
  await new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "/ort.wasm.min.js";
    script.onload = resolve;
    script.onerror = reject;
    document.head.append(script);
  });
  ort.env.wasm.wasmPaths = "/";
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = false;
  const open = async (file, enableProfiling) => ort.InferenceSession.create(
    new Uint8Array(await (await fetch(`/${file}`)).arrayBuffer()),
    { executionProviders: ["wasm"], graphOptimizationLevel: "all", enableProfiling });
  let seed = 1;  // fixed pseudo-random values (they do not change the cost)
  const noise = (n) => new Float32Array(n).map(() => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed / 2147483648 - 0.5;
  });
  const tensor = (type, data, dims) => new ort.Tensor(type, data, dims);
  const image = tensor("float32", noise(embedding.reduce((a, b) => a * b, 1)), embedding);
  const products = await (await open(graphs.decoder_image, false)).run(
    { image_embeddings: image });
  const scale = imageSize / Math.max(height, width);
  const [x, y, bx, by] = [width * 0.4, height * 0.55, width * 0.6, height * 0.3].map(
    (v) => v * scale);
  const orig = tensor("float32", Float32Array.of(height, width), [2]);
  const click = {
    point_coords: tensor("float32", Float32Array.of(x, y, 0, 0), [1, 2, 2]),
    point_labels: tensor("float32", Float32Array.of(1, -1), [1, 2]),
    orig_im_size: orig,
  };
  const masks = (...index) => tensor("int64", BigInt64Array.from(index.map(BigInt)),
    [index.length]);
  const mask = (has) => ({
    image_embeddings: image,
    mask_input: tensor("float32", noise(lowRes[0] * lowRes[1]), [1, 1, ...lowRes]),
    has_mask_input: tensor("float32", Float32Array.of(has), [1]),
  });
  const feeds = {
    [graphs.decoder]: { ...click, ...mask(0) },
    [graphs.decoder_prompts]: { ...click, ...products, mask_index: masks(1, 2, 3) },
    [graphs.decoder_select]: { ...mask(1), orig_im_size: orig, mask_index: masks(0),
      point_coords: tensor("float32", Float32Array.of(x, y, bx, by, 0, 0), [1, 3, 2]),
      point_labels: tensor("float32", Float32Array.of(1, 0, -1), [1, 3]) },
  };
  const wall = {};
  for (const [file, feed] of Object.entries(feeds)) {
    const session = await open(file, true);
    const times = [];
    for (let i = 0; i < warmup + runs; i++) {
      const start = performance.now();
      await session.run(feed);
      if (i >= warmup) times.push(performance.now() - start);
    }
    console.log(`samkit-profile-begin ${file}`);
    await session.endProfiling();
    console.log(`samkit-profile-end ${file}`);
    await session.release();
    wall[file] = times;
  }
  return wall;
}"""


def serve_folder(folders: list[Path]) -> Callable[[Route], None]:
    """A Playwright route handler answering every request from ``folders`` (the page itself
    at ``/``), with the isolation headers."""

    def handle(route: Route) -> None:
        name = route.request.url.removeprefix(ORIGIN).lstrip("/")
        if name == "":
            route.fulfill(body=PAGE, content_type="text/html", headers=ISOLATION)
            return
        for folder in folders:
            if "/" not in name and (folder / name).is_file():
                kind = ("application/wasm" if name.endswith(".wasm") else "text/javascript"
                        if name.endswith((".js", ".mjs")) else "application/octet-stream")
                route.fulfill(body=(folder / name).read_bytes(), content_type=kind,
                              headers=ISOLATION)
                return
        route.fulfill(status=404, body=b"")

    return handle


def parse_profiles(lines: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Console lines -> the profile events of each graph (between the begin / end markers)."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    graph = None
    for line in lines:
        if line.startswith("samkit-profile-begin "):
            graph = line.split()[1]
        elif line.startswith("samkit-profile-end "):
            graph = None
        elif graph is not None and line.lstrip().startswith("{"):
            events[graph].append(json.loads(line.strip().rstrip(",")))
    return events


def summarise(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Kernel time per op type and per node, per counted run (``model_run`` events after the
    first ``warmup``), and the runs' mean."""
    runs = sorted((e for e in events if e["cat"] == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])[warmup:]
    if not runs:
        raise SystemExit("no profiled runs found in the console output")
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    count: dict[str, set[str]] = defaultdict(set)
    shapes: dict[str, Any] = {}
    for e in events:
        if e["cat"] != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            continue
        op = e["args"]["op_name"]
        node = e["name"].removesuffix("_kernel_time")
        by_op[op] += e["dur"] / 1e3 / len(runs)
        by_node[node] += e["dur"] / 1e3 / len(runs)
        count[op].add(node)
        shapes[node] = (op, e["args"].get("output_type_shape"))
    return {"runs": len(runs), "run_ms": sum(r["dur"] for r in runs) / 1e3 / len(runs),
            "by_op": dict(by_op), "by_node": dict(by_node),
            "nodes": {op: len(nodes) for op, nodes in count.items()}, "shapes": shapes}


def report(file: str, summary: dict[str, Any], wall: list[float]) -> None:
    kernels = sum(summary["by_op"].values())
    wall_ms = sorted(wall)[len(wall) // 2]
    print(f"\n{file}: {summary['runs']} runs; per run: session {summary['run_ms']:.1f} ms, "
          f"kernels {kernels:.1f} ms, session.run median {wall_ms:.1f} ms")
    print("| op type | nodes | ms per decode | share of kernel time |")
    print("|---|---|---|---|")
    for op, ms in sorted(summary["by_op"].items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {summary['nodes'][op]} | {ms:.2f} | {100 * ms / kernels:.1f}% |")
    print(f"top {TOP_NODES} nodes:")
    for node, ms in sorted(summary["by_node"].items(), key=lambda kv: -kv[1])[:TOP_NODES]:
        op, shape = summary["shapes"][node]
        print(f"  {100 * ms / kernels:5.1f}%  {op:12s} {node}  -> {json.dumps(shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--graph", choices=list(GRAPHS), default="fp32")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", default="480x640", help="original image H x W")
    args = parser.parse_args()
    missing = [n for n in RUNTIME_FILES if not (RUNTIME_DIR / n).is_file()]
    if missing:
        raise SystemExit(f"onnxruntime-web is missing ({', '.join(missing)}): "
                         "bash scripts/get_web_runtime.sh")
    height, width = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "graphs"
        sam = build_sam(args.model).eval()
        manifest = export_graphs(sam, args.model, folder)
        official = export_decoder(sam, folder / DECODER_FILE, args.model)
        if args.graph == "int8":
            official = quantize_int8(official, folder / int8_file(DECODER_FILE))
        graphs = {**GRAPHS[args.graph], "decoder": official.name}
        lines: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page()
                page.on("console", lambda message: lines.append(message.text))
                page.route(f"{ORIGIN}/**", serve_folder([RUNTIME_DIR, folder]))
                page.goto(f"{ORIGIN}/")
                wall = page.evaluate(PROFILE_JS, {
                    "graphs": graphs, "runs": args.runs, "warmup": args.warmup,
                    "threads": args.threads, "height": height, "width": width,
                    "imageSize": manifest["image_size"],
                    "embedding": manifest["embedding_shape"],
                    "lowRes": manifest["mask_input_size"]})
            finally:
                browser.close()
    print(f"{args.model}, {args.graph}, {args.threads} thread(s), {height}x{width} image")
    for file, events in parse_profiles(lines).items():
        report(file, summarise(events, args.warmup), wall[file])


if __name__ == "__main__":
    main()
