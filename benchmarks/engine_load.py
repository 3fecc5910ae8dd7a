"""Load, soak and kill -9 of ``samkit annotate`` with simulated annotators on loopback.

Run by hand (never in CI, never beside a training run or the tests):

    python benchmarks/engine_load.py [--clients 8] [--requests 2000] [--images DIR]

Each simulated annotator loops over the project's images: a hover preview, a click
(decode), a second click, accept the best mask (COCO RLE back to the server), next image.
Three phases against a real ``samkit annotate`` process (the default model, one model shared
by all clients, as in production):

1. load: ``--clients`` annotators for ``--seconds``; latency p50 / p95 / p99 per request
   kind and the error count (anything but 2xx, or 503 "busy" for previews, is an error);
2. soak: the same until ``--requests`` requests in all, the server's RSS sampled every 100;
   growth after the first 20 % (warm-up: embeddings, allocator) must stay under 5 %;
3. kill: annotators running, ``kill -9`` of the server, a restart on the same port; while
   it is down clients get connection errors (counted, never a wrong answer); at the end
   every accept that got 201 is in the store and ``PRAGMA integrity_check`` is ok. (The
   restarted server embeds its images again on first use: those clicks are slower.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "grabcut" / "images"
SAMKIT = [sys.executable, "-m", "samkit.cli"]


class Server:
    """``samkit annotate PROJECT`` in a child process."""

    def __init__(self, project: Path, port: int = 0) -> None:
        self.process = subprocess.Popen(
            [*SAMKIT, "annotate", str(project), "--port", str(port), "--threads", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = re.search(r"open http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise SystemExit(f"samkit annotate did not start (exit {self.process.wait()})")
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def call(url: str, method: str = "GET", body: object | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


class Annotator(threading.Thread):
    """One simulated annotator: preview, click, click, accept, next image."""

    def __init__(self, index: int, server: Server, images: list[dict], stats: Stats) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(index)
        self.server, self.images, self.stats = server, images, stats
        self.position = index
        self.accepted: list[int] = []
        self.stop_event = threading.Event()

    def timed(self, kind: str, method: str, path: str, body: object = None) -> object | None:
        start = time.perf_counter()
        try:
            status, answer = call(self.server.url + path, method, body)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            self.stats.down(kind, err)
            time.sleep(0.2)  # a page retries, it does not hammer
            return None
        self.stats.add(kind, (time.perf_counter() - start) * 1e3, status)
        return answer if 200 <= status < 300 else None

    def run(self) -> None:
        while not self.stop_event.is_set() and not self.stats.done():
            image = self.images[self.position % len(self.images)]
            w, h = image["width"], image["height"]
            point = [self.rng.uniform(0.3, 0.7) * w, self.rng.uniform(0.3, 0.7) * h, 1]
            base = f"/api/images/{image['id']}"
            self.timed("preview", "POST", f"{base}/decode", {"points": [point], "preview": True})
            self.timed("click", "POST", f"{base}/decode", {"points": [point]})
            second = [point, [self.rng.uniform(0, w - 1), self.rng.uniform(0, h - 1), 0]]
            answer = self.timed("click", "POST", f"{base}/decode", {"points": second})
            best = answer["masks"][answer["best"]] if answer else None
            if best and best["area"] > 0:  # an empty mask is refused (400): a page never sends one
                created = self.timed("accept", "POST", f"{base}/annotations", {
                    "segmentation": best["segmentation"], "score": best["score"],
                    "prompts": {"points": second}, "seconds": 1.0, "annotator": "bench"})
                if created:
                    self.accepted.append(created["id"])
            self.timed("next", "GET", "/api/images")
            self.position += 1


class Stats:
    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.unreachable = 0
        self.limit = limit
        self.count = 0

    def add(self, kind: str, ms: float, status: int) -> None:
        with self.lock:
            self.count += 1
            self.latency[kind].append(ms)
            if not (200 <= status < 300 or (kind == "preview" and status == 503)):
                self.errors[f"{kind} {status}"] += 1

    def down(self, kind: str, err: BaseException) -> None:
        with self.lock:
            self.count += 1
            self.unreachable += 1

    def done(self) -> bool:
        return self.count >= self.limit


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_clients(server: Server, images: list[dict], clients: int, stats: Stats,
                seconds: float | None = None,
                during: Callable[[list[Annotator]], None] | None = None) -> list[Annotator]:
    annotators = [Annotator(i, server, images, stats) for i in range(clients)]
    for annotator in annotators:
        annotator.start()
    if during is not None:
        during(annotators)
    deadline = None if seconds is None else time.monotonic() + seconds
    while any(a.is_alive() for a in annotators):
        if deadline is not None and time.monotonic() > deadline:
            for annotator in annotators:
                annotator.stop_event.set()
        time.sleep(0.2)
    return annotators


def report(title: str, stats: Stats) -> None:
    print(f"\n{title}: {stats.count} requests, errors {sum(stats.errors.values())}"
          f" {dict(stats.errors) or ''}, unreachable {stats.unreachable}")
    print("| request | n | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for kind, values in sorted(stats.latency.items()):
        print(f"| {kind} | {len(values)} | {statistics.median(values):.0f} | "
              f"{percentile(values, 0.95):.0f} | {percentile(values, 0.99):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the soak")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--limit-images", type=int, default=8)
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"no images folder {args.images}")
    work = Path(tempfile.mkdtemp(prefix="samkit-load-"))
    try:
        source = work / "source"
        source.mkdir()
        for path in sorted(args.images.iterdir())[: args.limit_images]:
            shutil.copy(path, source / path.name)
        project = work / "project"
        subprocess.run([*SAMKIT, "engine", "init", str(project), "--images", str(source)],
                       check=True, stdout=subprocess.DEVNULL)
        server = Server(project)
        images = call(server.url + "/api/images")[1]
        for image in images:  # embeddings first: the load phase measures clicks, not encoders
            call(server.url + f"/api/images/{image['id']}/prepare", "POST")
        print(f"{len(images)} images, {args.clients} clients, samkit annotate pid "
              f"{server.process.pid} on port {server.port}, {os.cpu_count()} cores")

        load = Stats(limit=10**9)
        run_clients(server, images, args.clients, load, seconds=args.seconds)
        report(f"load ({args.seconds:.0f} s)", load)

        soak = Stats(limit=args.requests)
        rss: list[float] = []
        sampler_stop = threading.Event()

        def sample() -> None:
            last = -1
            while not sampler_stop.is_set():
                if soak.count // 100 != last:
                    last = soak.count // 100
                    rss.append(server.rss_mb())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_clients(server, images, args.clients, soak)
        sampler_stop.set()
        report(f"soak ({args.requests} requests)", soak)
        rss.append(server.rss_mb())
        settled = rss[min(len(rss) - 1, max(1, len(rss) // 5))]
        growth = (rss[-1] - settled) / settled
        print(f"RSS: {rss[0]:.0f} MB at the start, {settled:.0f} MB after warm-up, "
              f"{rss[-1]:.0f} MB at the end: growth after warm-up {growth:+.1%}")

        killed = Stats(limit=10**9)

        def kill_and_restart(annotators: list[Annotator]) -> None:
            """5 s of work, kill -9, 2 s down, a restart on the same port, 10 s of work."""
            nonlocal server
            time.sleep(5)
            server.kill()
            time.sleep(2)
            server_new = Server(project, port=server.port)
            for annotator in annotators:
                annotator.server = server_new
            server = server_new
            time.sleep(10)
            for annotator in annotators:
                annotator.stop_event.set()

        annotators = run_clients(server, images, args.clients, killed,
                                 during=kill_and_restart)
        report("kill -9 and restart", killed)
        accepted = {i for a in annotators for i in a.accepted}
        stored = {a["id"] for image in images
                  for a in call(server.url + f"/api/images/{image['id']}/annotations")[1]}
        server.stop()
        with sqlite3.connect(project / "project.db") as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        print(f"accepted during the kill phase: {len(accepted)}, of them stored: "
              f"{len(accepted & stored)}; integrity_check: {integrity}")
        return 0 if accepted <= stored and integrity == "ok" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
