"""Per-click latency of the annotation page's own decoder, inside real Chromium, against the
server path (docs/engine.md, "Decoding in the page").

For each model: a temporary project with one 640x480 image, the real app (uvicorn in a
thread of this process), the page in Debian's Chromium (Playwright). Per row (graph fp32 /
int8, wasm threads 1 / 2): ``--clicks`` single clicks at seeded random places, each cleared
with Esc; the page records ``decode`` (performance.now around ``session.run``) and
``paint`` (the click's mouseup to the frame after its mask is drawn). Then the server path:
the same single-click decode over HTTP from 1 and from 8 concurrent clients. ``server CPU
s / 100 clicks`` is this process's CPU time (server threads plus this script's own small
share) per 100 clicks in each design.

Usage: python benchmarks/browser_decoder.py [--models samkit-tiny,vit_b] [--clicks 200]
Needs scripts/get_web_runtime.sh and /usr/bin/chromium. vit_b has random weights: decoder
cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from PIL import Image
from playwright.sync_api import sync_playwright

from samkit.build import build_sam
from samkit.engine.model_service import ModelService
from samkit.engine.project import open_project
from samkit.engine.server import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "grabcut" / "images"
ROWS = [("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)]


def image_folder(root: Path) -> Path:
    folder = root / "src"
    folder.mkdir()
    photos = sorted(PHOTO.glob("*.jpg"))[:1] if PHOTO.is_dir() else []
    if photos:
        Image.open(photos[0]).convert("RGB").resize((640, 480)).save(folder / "photo.png")
    else:
        pixels = np.full((480, 640, 3), 40, np.uint8)
        pixels[120:360, 160:480] = (220, 180, 60)
        Image.fromarray(pixels).save(folder / "photo.png")
    return folder


def serve(app: Any) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def pct(values: list[float]) -> str:
    return f"{np.percentile(values, 50):.1f} / {np.percentile(values, 95):.1f}"


def browser_rows(url: str, clicks: int) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for graph, threads in ROWS:
                page = browser.new_page(viewport={"width": 1180, "height": 640})
                page.set_default_timeout(600_000)
                page.goto(f"{url}/?graph={graph}&threads={threads}")
                page.wait_for_selector("#canvas[data-decoder='browser'][data-local='1']")
                box = page.locator("#canvas").bounding_box()
                cpu = time.process_time()
                for i in range(clicks + 5):  # 5 warm-up clicks, not counted
                    fx, fy = rng.uniform(0.05, 0.95, 2)
                    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                    page.wait_for_function(
                        f"document.getElementById('canvas').dataset.decodes === '{i + 1}'")
                    page.keyboard.press("Escape")
                    if i == 4:
                        cpu = time.process_time()
                cpu = time.process_time() - cpu
                timings = page.evaluate("samkitTimings")[5:]
                assert all(t["decoder"] == "browser" for t in timings)
                rows.append({"graph": graph, "threads": threads, "clicks": len(timings),
                             "decode": [t["decode_ms"] for t in timings],
                             "paint": [t["paint_ms"] for t in timings],
                             "cpu_per_100": cpu / len(timings) * 100,
                             "bytes": page.evaluate("state.decoder.bytes")})
                page.close()
        finally:
            browser.close()
    return rows


def server_rows(url: str, width: int, height: int, clicks: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for clients in (1, 8):
        points = rng.uniform(0.05, 0.95, (clicks, 2)) * [width, height]

        def one(point: np.ndarray) -> float:
            body = json.dumps({"points": [[round(float(point[0]), 1),
                                           round(float(point[1]), 1), 1]]}).encode()
            request = urllib.request.Request(f"{url}/api/images/1/decode", data=body,
                                             method="POST",
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
            return (time.perf_counter() - start) * 1e3

        one(points[0])  # warm-up
        cpu = time.process_time()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(one, points))
        cpu = time.process_time() - cpu
        rows.append({"clients": clients, "clicks": clicks, "latency": latencies,
                     "cpu_per_100": cpu / clicks * 100})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="samkit-tiny,vit_b")
    parser.add_argument("--clicks", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| model | design | graph | threads | clicks | decode p50 / p95 ms "
             "| click-to-paint p50 / p95 ms | server CPU s / 100 clicks |",
             "|---|---|---|---|---|---|---|---|"]
    sizes = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # Registered as the default model: official names want their weights file,
            # and the loader below builds `name` with random weights anyway.
            project = open_project(root / "project", image_folder(root), None, None)
            service = ModelService(project, "cpu",
                                   loader=lambda p, v, d, name=name: build_sam(name))
            url, server = serve(create_app(project, service, prefetch=False))
            try:
                image = project.db.image(1)
                assert image is not None
                service.ensure_embedding(image)
                for row in browser_rows(url, args.clicks):
                    lines.append(
                        f"| {name} | page | {row['graph']} | {row['threads']} | {row['clicks']} "
                        f"| {pct(row['decode'])} | {pct(row['paint'])} "
                        f"| {row['cpu_per_100']:.3f} |")
                    if row["threads"] == 1:
                        sizes.append(f"{name} {row['graph']}: first visit graph "
                                     f"{row['bytes']['graph'] / 1e6:.2f} MB + embedding "
                                     f"{row['bytes']['embeddings'] / 1e6:.2f} MB")
                for row in server_rows(url, image.width, image.height, args.clicks):
                    lines.append(
                        f"| {name} | server, {row['clients']} client(s) | torch | 1 "
                        f"| {row['clicks']} | round trip {pct(row['latency'])} | - "
                        f"| {row['cpu_per_100']:.3f} |")
                print("\n".join(lines[-6:]), flush=True)
            finally:
                server.should_exit = True
    print("\n".join(lines))
    print("\n".join(sizes))


if __name__ == "__main__":
    main()
