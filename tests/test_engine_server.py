"""``samkit annotate`` as a real server (uvicorn in a subprocess): access token off loopback,
and durability — masks answered with 200 survive ``kill -9`` and the database stays intact."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("uvicorn", reason="the annotation server needs `pip install samkit[engine]`")

from samkit.engine.project import open_project  # noqa: E402

STARTUP_S = 120.0  # importing torch and building the model on a busy 2-core CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(project: Path, log: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "samkit.cli", "annotate", str(project), "--port", str(port),
         "--device", "cpu", *args],
        stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return process, port


def request(port: int, method: str, path: str, body: dict | None = None,
            token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["X-Samkit-Token"] = token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_ready(process: subprocess.Popen, port: int, log: Path, token: str | None = None) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if request(port, "GET", "/api/project", token=token)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"server not ready after {STARTUP_S} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rect_rle(height: int, width: int, i: int) -> dict:
    mask = np.zeros((height, width), np.uint8)
    mask[i:i + 10, 2 * i:2 * i + 15] = 1
    return {"size": [height, width],
            "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode()}


def test_token_off_loopback_and_accepts_survive_kill_9(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)).save(images / f"p{i}.png")
    project_dir = tmp_path / "project"
    open_project(project_dir, images, None, None).close()

    # Bound to all interfaces without --token: one is generated, printed, and required.
    log = tmp_path / "server1.log"
    process, port = start_server(project_dir, log, "--host", "0.0.0.0")
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (match := re.search(r"\?token=([\w-]+)", log.read_text())):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.2)
        token = match[1]
        wait_ready(process, port, log, token)
        status, body = request(port, "GET", "/api/images")
        assert status == 401 and "token" in body["error"]
        assert request(port, "GET", "/api/images", token="x" * 32)[0] == 401

        accepted = []
        for i in range(5):
            status, body = request(port, "POST", "/api/images/1/annotations", token=token, body={
                "segmentation": rect_rle(48, 64, i), "seconds": 2.0, "annotator": "durable"})
            assert status == 201, body
            accepted.append((body["id"], body["area"]))
        process.send_signal(signal.SIGKILL)  # right after the last 200
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()

    log = tmp_path / "server2.log"
    process, port = start_server(project_dir, log)  # default: loopback, no token
    try:
        wait_ready(process, port, log)
        status, rows = request(port, "GET", "/api/images/1/annotations")
        assert status == 200
        assert [(r["id"], r["area"]) for r in rows] == accepted
        assert {r["annotator"] for r in rows} == {"durable"}
    finally:
        stop(process)
    with sqlite3.connect(project_dir / "project.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
