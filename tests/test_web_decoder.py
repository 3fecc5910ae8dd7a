"""The page's decoder graphs on the server side (samkit.engine.web_decoder), without a
browser: the export ``GET /api/decoder`` starts, the manifest it then serves, the graph files
behind its URLs. The masks the page decodes with them are checked in Chromium
(tests/test_engine_browser.py); ``decoder_select.onnx`` against ``decoder.onnx`` in
tests/test_onnx.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the annotation server needs `pip install samkit[engine]`")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from samkit.engine.model_service import ModelService  # noqa: E402
from samkit.engine.project import open_project  # noqa: E402
from samkit.engine.server import create_app  # noqa: E402
from samkit.engine.web_decoder import MANIFEST_FILE, RUNTIME_FILES  # noqa: E402
from test_engine import make_images, small_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXPORT_S = 600  # exporting the graphs on a busy 2-core machine
PAGE_GRAPHS = {
    "fp32": {"decoder_image": "decoder_image.onnx", "decoder_prompts": "decoder_prompts.onnx",
             "decoder_select": "decoder_select.onnx"},
    "int8": {"decoder_image": "decoder_image.onnx",  # runs once per image: float32 in both
             "decoder_prompts": "decoder_prompts.int8.onnx",
             "decoder_select": "decoder_select.int8.onnx"},
}


def test_manifest_lists_the_page_graphs_with_their_sha256(tmp_path: Path) -> None:
    """Both variants name the shared-image pair and the refinement graph; every URL serves the
    file whose sha256 and size the manifest gives. A folder of the previous format (decoder.onnx
    alone) is never served: it is exported again and replaced."""
    project = open_project(tmp_path / "proj", make_images(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=small_loader)
    runtime = tmp_path / "ort"  # stand-ins: the server only checks that the files exist
    runtime.mkdir()
    for name in RUNTIME_FILES:
        (runtime / name).write_bytes(b"")
    version = service.version.id
    old = project.decoder_dir(version)
    old.mkdir(parents=True)
    for name in ("decoder.onnx", "decoder_prompts.onnx"):
        (old / name).write_bytes(b"a graph of the previous format")
    (old / MANIFEST_FILE).write_text(json.dumps({"graphs": {"fp32": {
        "file": "decoder.onnx", "sha256": "0" * 64, "bytes": 30}}}))
    client = TestClient(create_app(project, service, prefetch=False, runtime_dir=runtime),
                        base_url="http://127.0.0.1")

    manifest = client.get("/api/decoder").json()
    assert manifest["state"] == "exporting", manifest
    assert client.get(f"/api/decoder/v{version}/decoder_prompts.onnx").status_code == 404
    deadline = time.monotonic() + EXPORT_S
    while manifest["state"] == "exporting":
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(1)
        manifest = client.get("/api/decoder").json()
    assert manifest["state"] == "ready" and manifest["available"], manifest
    assert not (old / "decoder.onnx").exists()
    assert not list(old.parent.glob(".*"))  # no temporary or stale folder left behind

    assert {variant: {role: graph["file"] for role, graph in roles.items()}
            for variant, roles in manifest["graphs"].items()} == PAGE_GRAPHS
    for roles in manifest["graphs"].values():
        for graph in roles.values():
            assert graph["url"] == f"/api/decoder/v{version}/{graph['file']}"
            body = client.get(graph["url"]).content
            assert hashlib.sha256(body).hexdigest() == graph["sha256"]
            assert len(body) == graph["bytes"] > 0
    fp32, int8 = manifest["graphs"]["fp32"], manifest["graphs"]["int8"]
    assert fp32["decoder_image"]["sha256"] == int8["decoder_image"]["sha256"]
    assert int8["decoder_prompts"]["bytes"] < fp32["decoder_prompts"]["bytes"]
    missing = client.get(f"/api/decoder/v{version}/decoder.onnx")
    assert missing.status_code == 404 and "decoder_select.onnx" in missing.json()["error"]
