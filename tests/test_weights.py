"""Tests for :mod:`samkit.weights` against a local HTTP server (never the real URLs)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from samkit import cli, weights
from samkit.errors import SamkitError
from samkit.weights import OfficialWeights

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FILE_PATH = "/tiny.bin"


@dataclass
class Served:
    """What the test server serves, how it misbehaves, and a log of (Range header, bytes sent)."""

    mode: str = "range"  # "range" | "ignore_range" | "drop" | "stall"
    requests: list[tuple[str | None, int]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at FILE_PATH, honouring ``Range: bytes=N-`` unless told otherwise."""

    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        served = self.server.served
        if served.mode == "stall":
            time.sleep(1.0)  # Longer than the client's patched timeout.
        if self.path != FILE_PATH:
            self.send_error(404)
            return
        byte_range = self.headers.get("Range")
        start = 0
        if byte_range and served.mode != "ignore_range":
            start = int(byte_range.removeprefix("bytes=").removesuffix("-"))
            if start >= len(PAYLOAD):
                served.requests.append((byte_range, 0))
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if served.mode == "drop":
            body = body[: len(body) // 2]  # Promise everything, then hang up halfway.
        served.requests.append((byte_range, len(body)))
        # The client may already have given up (timeout test); that is not a server failure.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # Keep test output clean.


class _Server(ThreadingHTTPServer):
    served: Served

    def url(self, path: str = FILE_PATH) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Private cache, no proxies, and a hard failure if anything but loopback is contacted."""
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real_urlopen = urllib.request.urlopen

    def loopback_only(request: urllib.request.Request, *args: Any, **kwargs: Any) -> Any:
        host = urllib.parse.urlsplit(request.full_url).hostname
        assert host == "127.0.0.1", f"test tried to contact {host}"
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", loopback_only)


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.served = Served()
    # A short poll interval keeps shutdown (once per test) from costing half a second.
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def register(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str | None = PAYLOAD_SHA256) -> None:
    """Add a ``tiny`` entry to the registry for the duration of one test."""
    entry = OfficialWeights("tiny", "vit_t", "tiny.bin", url, sha256, len(PAYLOAD))
    monkeypatch.setitem(weights.REGISTRY, "tiny", entry)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, server: _Server) -> Path:
    """Register ``tiny`` at the server; return where it will be cached."""
    register(monkeypatch, server.url())
    return weights.cached_path("tiny")


def part_of(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def test_registry_pins_official_files() -> None:
    assert sorted(weights.REGISTRY) == ["vit_b", "vit_h", "vit_l", "vit_t"]
    for spec in weights.REGISTRY.values():
        assert spec.url.endswith("/" + spec.filename)
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256 or "")


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SAMKIT_CACHE")
    assert weights.cache_dir() == tmp_path / "xdg" / "samkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert weights.cache_dir() == Path.home() / ".cache" / "samkit"


def test_fresh_download_is_verified(server: _Server, tiny: Path) -> None:
    path = weights.fetch("tiny", progress=False)
    assert path == tiny
    assert path.read_bytes() == PAYLOAD
    assert not part_of(path).exists()
    assert path.with_name("tiny.bin.sha256").exists()
    assert server.served.requests == [(None, len(PAYLOAD))]


def test_cache_hit_needs_no_network_and_no_rehash(
    monkeypatch: pytest.MonkeyPatch, server: _Server, tiny: Path
) -> None:
    weights.fetch("tiny", progress=False)
    server.shutdown()
    server.server_close()

    def no_rehash(path: Path) -> str:
        raise AssertionError("verified file was hashed again")

    monkeypatch.setattr(weights, "_sha256_file", no_rehash)
    assert weights.fetch("tiny", progress=False) == tiny


def test_corrupted_cache_is_downloaded_again(server: _Server, tiny: Path) -> None:
    weights.fetch("tiny", progress=False)
    tiny.write_bytes(b"x" * len(PAYLOAD))  # New mtime invalidates the sidecar.
    assert weights.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    assert len(server.served.requests) == 2


def test_resume_requests_only_the_remainder(server: _Server, tiny: Path) -> None:
    tiny.parent.mkdir(parents=True)
    part_of(tiny).write_bytes(PAYLOAD[:100_000])
    assert weights.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    assert server.served.requests == [("bytes=100000-", len(PAYLOAD) - 100_000)]


def test_server_ignoring_range_restarts_from_zero(server: _Server, tiny: Path) -> None:
    server.served.mode = "ignore_range"
    tiny.parent.mkdir(parents=True)
    part_of(tiny).write_bytes(PAYLOAD[:100_000])
    assert weights.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    assert server.served.requests == [("bytes=100000-", len(PAYLOAD))]


def test_unservable_range_restarts_from_zero(server: _Server, tiny: Path) -> None:
    tiny.parent.mkdir(parents=True)
    part_of(tiny).write_bytes(PAYLOAD + b"stale tail")  # Longer than the file: 416.
    assert weights.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    assert server.served.requests == [(f"bytes={len(PAYLOAD) + 10}-", 0), (None, len(PAYLOAD))]


def test_dropped_connection_leaves_a_resumable_part(server: _Server, tiny: Path) -> None:
    server.served.mode = "drop"
    with pytest.raises(SamkitError, match="run again to resume"):
        weights.fetch("tiny", progress=False)
    half = len(PAYLOAD) // 2
    assert not tiny.exists()
    assert part_of(tiny).read_bytes() == PAYLOAD[:half]

    server.served.mode = "range"
    assert weights.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    assert server.served.requests[-1] == (f"bytes={half}-", len(PAYLOAD) - half)


def test_sha256_mismatch_deletes_the_download(monkeypatch: pytest.MonkeyPatch, server: _Server) -> None:
    register(monkeypatch, server.url(), sha256="0" * 64)
    with pytest.raises(SamkitError) as caught:
        weights.fetch("tiny", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"expected {'0' * 64}, got {PAYLOAD_SHA256}" in message
    assert list(weights.cache_dir().iterdir()) == []


def test_unpublished_hash_downloads_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], server: _Server
) -> None:
    register(monkeypatch, server.url(), sha256=None)
    path = weights.fetch("tiny", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert "could not be verified" in capsys.readouterr().err
    assert not path.with_name("tiny.bin.sha256").exists()


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(SamkitError, match="valid names: vit_b, vit_h, vit_l, vit_t"):
        weights.fetch("vit_x")


def test_http_error_is_one_line(monkeypatch: pytest.MonkeyPatch, server: _Server) -> None:
    register(monkeypatch, server.url("/missing.bin"))
    with pytest.raises(SamkitError, match=r"^could not download .*HTTP Error 404[^\n]*$"):
        weights.fetch("tiny", progress=False)


def test_refused_connection_is_one_line(monkeypatch: pytest.MonkeyPatch, server: _Server) -> None:
    url = server.url()
    server.shutdown()
    server.server_close()
    register(monkeypatch, url)
    with pytest.raises(SamkitError, match=r"^could not download [^\n]*refused"):
        weights.fetch("tiny", progress=False)


def test_stalled_server_times_out(monkeypatch: pytest.MonkeyPatch, server: _Server, tiny: Path) -> None:
    server.served.mode = "stall"
    monkeypatch.setattr(weights, "TIMEOUT_S", 0.2)
    with pytest.raises(SamkitError, match="timed out"):
        weights.fetch("tiny", progress=False)


# --- command line -------------------------------------------------------------------------


CliMain = Callable[[list[str]], int]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> CliMain:
    """``samkit.cli.main`` with only this module's commands, so other features cannot interfere."""
    monkeypatch.setattr(cli, "COMMANDS", ("weights",))
    return cli.main


def test_cli_list(run_cli: CliMain, capsys: pytest.CaptureFixture[str], server: _Server, tiny: Path) -> None:
    assert run_cli(["weights", "list"]) == 0
    before = capsys.readouterr().out.splitlines()
    assert before[0].split() == ["NAME", "MODEL", "SIZE", "CACHED"]
    assert re.search(r"^vit_h\s+vit_h\s+2\.4 GiB\s+-$", "\n".join(before), re.M)
    assert re.search(r"^tiny\s+vit_t\s+293 KiB\s+-$", "\n".join(before), re.M)
    assert f"cache: {weights.cache_dir()}" in before
    bundled = (Path(weights.__file__).parent / "weights" / "samkit_tiny.safetensors").is_file()
    status = "trained: bundled samkit_tiny.safetensors" if bundled else "UNTRAINED"
    assert before[-1].startswith("default model: samkit-tiny, " + status)

    weights.fetch("tiny", progress=False)
    assert run_cli(["weights", "list"]) == 0
    assert f" {tiny}" in capsys.readouterr().out


def test_cli_fetch_prints_the_path(
    monkeypatch: pytest.MonkeyPatch,
    run_cli: CliMain,
    capsys: pytest.CaptureFixture[str],
    server: _Server,
    tmp_path: Path,
) -> None:
    register(monkeypatch, server.url("/moved.bin"))  # Only the --url mirror has the file.
    target = tmp_path / "elsewhere"
    argv = ["weights", "fetch", "tiny", "--cache-dir", str(target), "--url", server.url()]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out == f"{target / 'tiny.bin'}\n"
    assert (target / "tiny.bin").read_bytes() == PAYLOAD


def test_cli_bad_name_is_one_error_line(run_cli: CliMain, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["weights", "fetch", "vit_x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("samkit: error: unknown weights 'vit_x'; valid names:")
