"""Decode latency of ``samkit annotate``: one click, after the image embedding is cached,
through HTTP on 127.0.0.1.

Run by hand (never in CI):  python benchmarks/engine_latency.py [--requests 200] [--model NAME]

Starts the real server (``samkit annotate`` in a subprocess, as a user would) on a temporary
project holding one photo, prepares the image once, then sends single-point decode requests
(3 masks back, as COCO RLE) from 1 client and from 8 concurrent clients, each on its own
keep-alive connection. Reports p50 / p95 / p99 of

* ``client``: the round trip seen by the client (HTTP, JSON, queueing included);
* ``server``: the request handler's own time (validation, model, RLE encoding; includes the
  wait for the model lock, which dominates with 8 clients as the model serves one at a time);
* ``model``: prompt encoder + mask decoder + upscaling to the image size only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
STARTUP_S = 180.0


def photo(folder: Path) -> Path:
    """A COCO photo from ../shared when present, else a synthetic 480x640 image."""
    source = SHARED / "data" / "coco_tiny_val2017" / "images"
    files = sorted(source.glob("*.jpg")) if source.is_dir() else []
    folder.mkdir()
    if files:
        shutil.copy(files[0], folder / files[0].name)
        return folder / files[0].name
    print("(../shared/data absent: using a synthetic 480x640 image)")
    pixels = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "synthetic.png")
    return folder / "synthetic.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """One keep-alive connection, as a browser tab has."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())


def start_server(project: Path, images: Path, port: int, args: argparse.Namespace,
                 log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "samkit.cli", "annotate", str(project), "--images",
               str(images), "--port", str(port), "--model", args.model]
    if args.device:
        command += ["--device", args.device]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()}")
        try:
            if Client(port).call("GET", "/api/project")[0] == 200:
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    sys.exit(f"server not ready after {STARTUP_S} s:\n{log.read_text()}")


def run_clients(port: int, clients: int, total: int, size: tuple[int, int],
                seed: int) -> dict[str, list[float]]:
    """``total`` single-click decodes split over ``clients`` threads; per-request times."""
    height, width = size
    times: dict[str, list[float]] = {"client": [], "server": [], "model": []}
    lock = threading.Lock()
    failures: list[str] = []

    def work(index: int, count: int) -> None:
        rng = np.random.default_rng(seed + index)
        client = Client(port)
        for _ in range(count):
            point = [float(rng.uniform(0, width - 1)), float(rng.uniform(0, height - 1)), 1]
            start = time.perf_counter()
            status, body = client.call("POST", "/api/images/1/decode", {"points": [point]})
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                if status != 200:
                    failures.append(f"{status}: {body}")
                    continue
                times["client"].append(elapsed)
                times["server"].append(body["server_ms"])
                times["model"].append(body["decode_ms"])

    counts = [total // clients + (i < total % clients) for i in range(clients)]
    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(counts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(f"{len(failures)} request(s) failed, e.g. {failures[0]}")
    return times


def percentiles(values: list[float]) -> str:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return f"{p50:7.1f} {p95:7.1f} {p99:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per client setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--device", help="cpu or cuda (default: the server's choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="samkit-engine-bench-") as tmp:
        tmp_path = Path(tmp)
        image = photo(tmp_path / "images")
        with Image.open(image) as im:
            size = (im.height, im.width)
        port = free_port()
        log = tmp_path / "server.log"
        server = start_server(tmp_path / "project", tmp_path / "images", port, args, log)
        try:
            status, ready = Client(port).call("POST", "/api/images/1/prepare")
            assert status == 200, ready
            print(f"model {args.model}, image {image.name} {size[1]}x{size[0]}, embedding "
                  f"computed once in {ready['seconds']:.2f} s; {os.cpu_count()} CPU cores")
            run_clients(port, 1, 20, size, seed=999)  # warm-up
            print(f"\n{'clients':>7} {'requests':>8} {'what':>7}  {'p50':>7} {'p95':>7} "
                  f"{'p99':>7}  (ms)")
            for clients in args.clients:
                times = run_clients(port, clients, args.requests, size, seed=clients)
                for what in ("client", "server", "model"):
                    print(f"{clients:>7} {len(times[what]):>8} {what:>7}  "
                          f"{percentiles(times[what])}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
