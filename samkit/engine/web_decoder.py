"""The page's own decoder: the current model version's prompt encoder + mask decoder as ONNX
graphs, run in the browser by onnxruntime-web, so a click costs the server nothing.

* **Graphs.** Those of :mod:`samkit.onnx.export`: the shared-image pair
  (``decoder_image.onnx`` once per image, ``decoder_prompts.onnx`` per prompt) for prompts
  without a mask prompt, and ``decoder_select.onnx`` (``decoder.onnx``'s graph with the
  pair's ``mask_index``) for mask-prompt refinement: a mask prompt changes the image side,
  which the pair computes once. Both upscale only the masks the page shows (3 or 1) to the
  original image size inside the graph, exactly as the server's predictor does. The int8
  variant swaps in the int8 copies of ``decoder_select.onnx`` and ``decoder_prompts.onnx``;
  ``decoder_image.onnx`` stays float32 in both, as in ``samkit export-onnx --quantize
  int8``. They are exported once per model version, in a background thread from a copy of
  the model (the live one keeps serving), into ``cache/decoders/v<V>/`` beside the
  embeddings; the folder appears complete or not at all (written elsewhere, then renamed),
  with a ``manifest.json`` naming each graph's sha256 and size.
* **Runtime.** onnxruntime-web's files in ``static/ort/`` (``scripts/get_web_runtime.sh``,
  from npm). Without them, or with ``samkit annotate --decoder server``, or while a version's
  graphs are being exported, :meth:`WebDecoder.manifest` says why and the page decodes on the
  server as before.
* **Embeddings** go to the page as float16 bytes (:meth:`ModelService.embedding_f16`): half
  the bytes of float32; masks still agree with the server's (tests/test_engine_browser.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any

from samkit.engine.model_service import ModelService
from samkit.engine.project import Project
from samkit.io import write_bytes_atomic
from samkit.onnx.names import (
    DECODER_IMAGE_FILE, DECODER_PROMPTS_FILE, DECODER_SELECT_FILE, INT8_FILES, int8_file)

RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
RUNTIME_URL = "/static/ort/"
MANIFEST_FILE = "manifest.json"
# Bumped when the folder's graphs change: an older folder (format 1: decoder.onnx alone) is
# exported again rather than served without the graphs the page now asks for.
MANIFEST_FORMAT = 2
# The page's graphs by role: the shared-image pair for prompts without a mask prompt,
# decoder_select for those with one.
_FP32 = {"decoder_select": DECODER_SELECT_FILE, "decoder_image": DECODER_IMAGE_FILE,
         "decoder_prompts": DECODER_PROMPTS_FILE}
# Graph variants the page may ask for, a file per role (fp32 matches the server; int8 is
# smaller and faster).
GRAPHS = {
    "fp32": _FP32,
    "int8": {role: int8_file(name) if name in INT8_FILES else name
             for role, name in _FP32.items()},
}
FILES = sorted({name for files in GRAPHS.values() for name in files.values()})
EXPORT_THREAD_PREFIX = "decoder-export-v"  # + the model version id: the export threads' names
CACHE_ID_SETTING = "web_cache_id"  # names this project in the browser's IndexedDB
# One export at a time in the process: torch's exporter is not safe to run in two threads
# at once (two servers in one process, e.g. tests, or a quick model switch).
_EXPORT_LOCK = threading.Lock()


class WebDecoder:
    """Exports and describes the page's decoder graphs for the service's current version."""

    def __init__(self, project: Project, service: ModelService, runtime_dir: Path,
                 enabled: bool = True) -> None:
        self.project = project
        self.service = service
        self.runtime_dir = runtime_dir
        self.enabled = enabled
        self._lock = threading.Lock()
        self._exporting: set[int] = set()  # version ids with an export thread running
        self._errors: dict[int, str] = {}  # version id -> why its export failed

    def runtime_missing(self) -> list[str]:
        return [name for name in RUNTIME_FILES if not (self.runtime_dir / name).is_file()]

    def manifest(self) -> dict[str, Any]:
        """What the page needs to decode by itself, or ``available: false`` and the reason
        (``state``: ``off``, ``no-runtime``, ``exporting`` (poll again), ``failed``)."""
        version = self.service.version
        base = {"model_version": version.id, "model": version.model}
        if not self.enabled:
            return {**base, "available": False, "state": "off",
                    "reason": "browser decoding is turned off (samkit annotate --decoder server)"}
        missing = self.runtime_missing()
        if missing:
            return {**base, "available": False, "state": "no-runtime",
                    "reason": "the browser runtime is not installed (run "
                              "scripts/get_web_runtime.sh)"}
        folder = self.project.decoder_dir(version.id)
        written = _read_manifest(folder)
        if written is not None:
            files = written.pop("files")
            return {**base, **written, "available": True, "state": "ready",
                    "runtime": RUNTIME_URL, "cache_id": self.cache_id(),
                    "graphs": {variant: {role: {"file": name, **files[name],
                                                "url": f"/api/decoder/v{version.id}/{name}"}
                                         for role, name in roles.items()}
                               for variant, roles in GRAPHS.items()}}
        with self._lock:
            if version.id in self._errors:
                return {**base, "available": False, "state": "failed",
                        "reason": f"exporting the decoder failed: {self._errors[version.id]}"}
            if version.id not in self._exporting:
                self._exporting.add(version.id)
                threading.Thread(target=self._export, args=(version.id,), daemon=True,
                                 name=f"{EXPORT_THREAD_PREFIX}{version.id}").start()
        return {**base, "available": False, "state": "exporting",
                "reason": f"exporting model version {version.id}'s decoder for the page "
                          "(once; about half a minute)"}

    def graph_path(self, version_id: int, name: str) -> Path | None:
        """The exported graph file ``name`` (one of :data:`FILES`), or None when there is
        none (yet)."""
        if name not in FILES:
            return None
        folder = self.project.decoder_dir(version_id)
        if _read_manifest(folder) is None:
            return None
        return folder / name

    def cache_id(self) -> str:
        """A random id stored in the project: the page's IndexedDB keys start with it, so two
        projects served one after the other on the same port never share cached data."""
        db = self.project.db
        value = db.get_setting(CACHE_ID_SETTING)
        if value is None:
            value = secrets.token_hex(8)
            db.set_settings({CACHE_ID_SETTING: value})
        return str(value)

    def _export(self, version_id: int) -> None:
        """Export ``version_id``'s graphs (thread body); a failure is kept as one line."""
        try:
            with _EXPORT_LOCK:
                copied = self.service.model_copy(version_id)
                if copied is not None:  # None: the server moved to another version meanwhile
                    export_graphs(copied[1], copied[0].model,
                                  self.project.decoder_dir(version_id))
        except Exception as err:  # noqa: BLE001 -- any failure means: decode on the server
            with self._lock:
                self._errors[version_id] = _first_line(err)
        finally:
            with self._lock:
                self._exporting.discard(version_id)


def export_graphs(sam: Any, model_name: str, folder: Path) -> dict[str, Any]:
    """Write the graphs of :data:`FILES` and ``manifest.json`` into ``folder``, which appears
    complete (a rename of a sibling temporary folder; a folder of an older format is
    replaced). Returns the manifest."""
    from samkit.onnx.export import (
        export_decoder, export_shared_decoder, quantize_int8, require_packages)

    require_packages(quantize=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        export_decoder(sam, tmp / DECODER_SELECT_FILE, model_name, select_masks=True)
        export_shared_decoder(sam, tmp / DECODER_IMAGE_FILE, tmp / DECODER_PROMPTS_FILE,
                              model_name)
        for name in _FP32.values():
            if name in INT8_FILES:
                quantize_int8(tmp / name, tmp / int8_file(name))
        grid = list(sam.prompt_encoder.image_embedding_size)
        manifest = {
            "format": MANIFEST_FORMAT,
            "image_size": int(sam.image_size),
            "embedding_shape": [1, int(sam.prompt_encoder.embed_dim), *grid],
            "mask_input_size": list(sam.prompt_encoder.mask_input_size),
            "mask_threshold": float(sam.mask_threshold),
            "files": {name: _digest(tmp / name) for name in FILES},
        }
        write_bytes_atomic(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        if folder.exists() and _read_manifest(folder) is None:  # an older format's graphs
            stale = folder.parent / f".{folder.name}-{secrets.token_hex(4)}.stale"
            os.rename(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _read_manifest(folder) is None:  # not a finished twin: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none or it is of another format."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
