"""The data engine's web API (``samkit annotate``) through FastAPI's TestClient.

Every endpoint is exercised, with the bad inputs a browser or a script can send: each must get
a clear 4xx JSON error and leave the database as it was. The model is a randomly initialised
small SAM (TinyViT with one block per stage, 256 px), so the tests check the plumbing, not mask
quality, and run in seconds.
"""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi", reason="the annotation server needs `pip install samkit[engine]`")
from fastapi.testclient import TestClient  # noqa: E402

from samkit.build import build_sam, save_checkpoint  # noqa: E402
from samkit.engine.model_service import ModelService  # noqa: E402
from samkit.engine.project import Project, open_project  # noqa: E402
from samkit.engine.server import create_app  # noqa: E402
from samkit.errors import SamkitError  # noqa: E402
from samkit.registry import SamConfig, TinyViTConfig
from samkit.rle import parse_rle  # noqa: E402

# pycocotools (numpy 2) warns on every decode; not ours to fix.
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]
SMALL = SamConfig(TinyViTConfig(depths=(1, 1, 1, 1)), image_size=256)
HEIGHT, WIDTH = 64, 96


# ------------------------------------------------------------------------------------ fixtures
def make_images(folder: Path, count: int = 3) -> Path:
    """Noise with a bright rectangle: small, and different from each other."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 80, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        pixels[10 + i:40, 20:60 + i] = (230, 200, 40)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


_models: dict[Path | str | None, torch.nn.Module] = {}


def small_loader(project, version, device):  # the ModelLoader signature
    """The small model with the version's weights, built once per checkpoint (a model has no
    per-image state, and the tests never use two services at the same time)."""
    checkpoint = project.checkpoint_path(version)
    if checkpoint not in _models:
        torch.manual_seed(0)
        _models[checkpoint] = build_sam(SMALL, checkpoint)
    return _models[checkpoint]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return open_project(tmp_path / "proj", make_images(tmp_path / "src"), None, None)


@pytest.fixture
def service(project: Project) -> ModelService:
    return ModelService(project, "cpu", loader=small_loader)


@pytest.fixture
def client(project: Project, service: ModelService) -> TestClient:
    return TestClient(create_app(project, service, prefetch=False, max_upload_bytes=200_000),
                      base_url="http://127.0.0.1")


def rect_rle(top: int = 5, left: int = 10, bottom: int = 30, right: int = 50) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[top:bottom, left:right] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()}


def accept_body(**changes) -> dict:
    body = {"segmentation": rect_rle(), "prompts": {"points": [[20, 12, 1]], "box": None},
            "score": 0.9, "seconds": 4.0, "annotator": "alice"}
    body.update(changes)
    return body


def count_rows(project: Project, table: str = "annotations") -> int:
    return int(project.db.query(f"SELECT COUNT(*) FROM {table}")[0][0])


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# --------------------------------------------------------------------------- project, images
def test_project_images_and_files(client: TestClient, project: Project) -> None:
    info = client.get("/api/project").json()
    assert info["images"] == 3 and info["settings"]["stage"] == 1
    assert info["model"]["version"] == 1
    images = client.get("/api/images").json()
    assert [i["file_name"] for i in images] == ["img0.png", "img1.png", "img2.png"]
    assert images[0] | {"accepted": 0} == {"id": 1, "file_name": "img0.png", "width": WIDTH,
                                          "height": HEIGHT, "accepted": 0, "candidates": 0}
    one = client.get("/api/images/1")
    assert one.json()["embedded"] is False
    file = client.get("/api/images/1/file")
    assert file.content == (project.images_dir / "img0.png").read_bytes()
    assert "samkit annotate" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


def test_unknown_image_id_is_404_everywhere(client: TestClient) -> None:
    for method, path in [("get", "/api/images/99"), ("get", "/api/images/99/file"),
                         ("post", "/api/images/99/prepare"), ("post", "/api/images/99/everything"),
                         ("get", "/api/images/99/annotations")]:
        assert "unknown image id 99" in error_of(getattr(client, method)(path), 404)
    assert "99" in error_of(client.post("/api/images/99/decode", json={"points": [[1, 1, 1]]}),
                            404)
    assert "99" in error_of(client.post("/api/images/99/annotations", json=accept_body()), 404)
    error_of(client.get("/api/images/abc"), 422)


# ------------------------------------------------------------------- embeddings and decoding
def test_embedding_computed_once_and_reused_from_disk(
    client: TestClient, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = client.post("/api/images/1/prepare").json()
    assert ready["candidates_added"] == 0
    assert project.embedding_path(1, 1).is_file()
    assert client.get("/api/images/1").json()["embedded"] is True

    # A fresh service (a restarted server) decodes from the file without running the encoder.
    from samkit.predictor import SamPredictor

    def no_encoding(*args, **kwargs):
        raise AssertionError("the image was encoded again")

    monkeypatch.setattr(SamPredictor, "set_image", no_encoding)
    fresh = ModelService(project, "cpu", loader=small_loader)
    restarted = TestClient(create_app(project, fresh, prefetch=False), base_url="http://127.0.0.1")
    result = restarted.post("/api/images/1/decode", json={"points": [[30, 20, 1]]})
    assert result.status_code == 200, result.text


def test_bf16_service_embeds_in_bf16_and_caches_apart(
    project: Project, service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``samkit annotate --bf16``: bf16 embeddings live in their own cache folder, so an fp32
    server never reads them (and the reverse)."""
    image = project.db.images()[0]
    service.ensure_embedding(image)
    fp32_path = project.embedding_path(1, image.id)
    assert fp32_path.is_file()
    bf16 = ModelService(project, "cpu", loader=small_loader, encoder_dtype=torch.bfloat16)
    assert not bf16.has_embedding(image.id)  # the fp32 file is not its cache
    from samkit.predictor import SamPredictor

    dtypes = []
    encode = SamPredictor._encode
    monkeypatch.setattr(SamPredictor, "_encode",
                        lambda self, images: dtypes.append(self.encoder_dtype) or encode(self, images))
    bf16.ensure_embedding(image)
    assert dtypes == [torch.bfloat16]
    assert project.embedding_path(1, image.id, "bfloat16").is_file()
    assert bf16.has_embedding(image.id) and service.has_embedding(image.id)


def test_decode_masks_are_rle_of_the_image_size(client: TestClient) -> None:
    one_point = client.post("/api/images/2/decode", json={"points": [[30, 20, 1]]}).json()
    assert len(one_point["masks"]) == 3  # ambiguous: the paper's three masks
    assert 0 <= one_point["best"] < 3 and one_point["model_version"] == 1
    assert one_point["decode_ms"] > 0 and one_point["server_ms"] >= one_point["decode_ms"]
    for mask in one_point["masks"]:
        decoded = mask_utils.decode(mask["segmentation"])
        assert decoded.shape == (HEIGHT, WIDTH)
        assert int(decoded.sum()) == mask["area"]
        assert isinstance(mask["score"], float)
    two = client.post("/api/images/2/decode",
                      json={"points": [[30, 20, 1], [5, 5, 0]], "box": [10, 5, 60, 40]}).json()
    assert len(two["masks"]) == 1
    forced = client.post("/api/images/2/decode",
                         json={"box": [10, 5, 60, 40], "multimask": False}).json()
    assert len(forced["masks"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ('{"points": [[1, 2, 1]', 422, "not valid JSON"),
        ("[1, 2, 3]", 422, "invalid request"),
        ({"points": [[1, 2]]}, 422, "points.0.2"),
        ({"points": [[1, 2, 7]]}, 422, "0 or 1"),
        ({"points": [["a", 2, 1]]}, 422, "points.0.0"),
        ({"points": [[1, 2, 1]], "extra": 1}, 422, "extra"),
        ({"points": [[1, 2, 1]] * 65}, 422, "points"),
        ({"points": []}, 400, "no prompt"),
        ({"points": [[WIDTH, 2, 1]]}, 400, "outside"),
        ({"points": [[-1, 2, 1]]}, 400, "outside"),
        ({"points": [[3, HEIGHT + 10, 0]]}, 400, "outside"),
        ({"box": [0, 0, WIDTH + 1, 10]}, 400, "not inside"),
        ({"box": [20, 10, 5, 30]}, 400, "x1 > x0"),
        ({"box": [1, 2, 3]}, 422, "box"),
    ],
)
def test_decode_rejects_bad_prompts(client: TestClient, body, status: int, words: str) -> None:
    if isinstance(body, str):
        response = client.post("/api/images/1/decode", content=body,
                               headers={"Content-Type": "application/json"})
    else:
        response = client.post("/api/images/1/decode", json=body)
    assert words in error_of(response, status)


def test_non_finite_coordinates_are_rejected(client: TestClient) -> None:
    response = client.post("/api/images/1/decode", content='{"points": [[NaN, 2, 1]]}',
                           headers={"Content-Type": "application/json"})
    error_of(response, 422)


def test_busy_model_answers_503_with_what_it_is_doing(
    client: TestClient, service: ModelService
) -> None:
    client.post("/api/images/1/prepare")
    with service.using_model("a long test job", patience=1.0):
        response = client.post("/api/images/1/decode",
                               json={"points": [[3, 3, 1]], "preview": True})
        message = error_of(response, 503)
        assert "busy" in message and "a long test job" in message
        assert response.headers["Retry-After"] == "1"
    assert client.post("/api/images/1/decode", json={"points": [[3, 3, 1]]}).status_code == 200


# ------------------------------------------------------------------------ accept and review
def test_accept_stores_everything_and_review_round_trip(client: TestClient,
                                                        project: Project) -> None:
    created = client.post("/api/images/1/annotations", json=accept_body())
    assert created.status_code == 201, created.text
    a = created.json()
    assert a["status"] == "accepted" and a["stage"] == 1 and a["annotator"] == "alice"
    assert a["area"] == 25 * 40 and a["bbox"] == [10, 5, 40, 25]
    assert a["seconds"] == 4.0 and a["model_version"] == 1 and a["score"] == 0.9
    assert a["prompts"] == {"points": [[20.0, 12.0, 1]], "box": None}
    assert [x["id"] for x in client.get("/api/images/1/annotations").json()] == [a["id"]]
    assert client.get("/api/images").json()[0]["accepted"] == 1

    assert client.delete(f"/api/annotations/{a['id']}").json()["status"] == "deleted"
    assert client.get("/api/images/1/annotations").json() == []
    assert "it is deleted" in error_of(client.delete(f"/api/annotations/{a['id']}"), 409)
    assert client.post(f"/api/annotations/{a['id']}/restore").json()["status"] == "accepted"
    assert "cannot keep" in error_of(client.post(f"/api/annotations/{a['id']}/keep"), 409)
    error_of(client.delete("/api/annotations/999"), 404)
    error_of(client.post("/api/annotations/999/restore"), 404)
    error_of(client.post(f"/api/annotations/{a['id']}/frobnicate"), 404)


@pytest.mark.parametrize(
    ("changes", "status", "words"),
    [
        ({"segmentation": {"size": [HEIGHT, WIDTH + 1], "counts": "0"}}, 400, "does not match"),
        ({"segmentation": {"size": "64x96", "counts": "0"}}, 400, "does not match"),
        ({"segmentation": {"size": [HEIGHT, WIDTH], "counts": "0"}}, 400, "do not cover"),
        # runs adding up past the image: pycocotools would write past its buffer
        ({"segmentation": {"size": [HEIGHT, WIDTH], "counts": "0ooooo1"}}, 400, "do not cover"),
        ({"segmentation": {"size": [HEIGHT, WIDTH], "counts": "0o"}}, 400, "malformed"),
        ({"segmentation": {"size": [HEIGHT, WIDTH], "counts": "0\x7f"}}, 400, "invalid character"),
        ({"segmentation": {"size": [HEIGHT, WIDTH], "counts": 5}}, 400, "RLE string"),
        ({"segmentation": {"size": [HEIGHT, WIDTH]}}, 400, "COCO RLE"),
        ({"segmentation": rect_rle(0, 0, 0, 0)}, 400, "empty"),
        ({"prompts": {"points": [[500, 1, 1]]}}, 400, "outside"),
        ({"seconds": -1}, 422, "seconds"),
        ({"seconds": 1e9}, 422, "seconds"),
        ({"annotator": "<script>"}, 422, "annotator"),
        ({"annotator": ""}, 422, "annotator"),
        ({"model_version": 42}, 400, "unknown model version"),
    ],
)
def test_accept_rejects_bad_masks(client: TestClient, project: Project, changes, status: int,
                                  words: str) -> None:
    response = client.post("/api/images/1/annotations", json=accept_body(**changes))
    assert words in error_of(response, status)
    assert count_rows(project) == 0


def test_rle_parser_agrees_with_pycocotools() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = (rng.random((HEIGHT, WIDTH)) > rng.random()).astype(np.uint8)
        mask[0, 0] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        parsed = parse_rle({"size": [HEIGHT, WIDTH], "counts": counts}, HEIGHT, WIDTH)
        assert parsed["area"] == int(mask.sum())
    with pytest.raises(SamkitError):
        parse_rle({"size": [2, 2], "counts": "0" * 10_000}, 2, 2)


def test_concurrent_accepts_from_two_clients_lose_nothing(
    project: Project, service: ModelService
) -> None:
    app = create_app(project, service, prefetch=False)
    per_client, results, errors = 15, [], []

    def annotate(name: str) -> None:
        client = TestClient(app, base_url="http://127.0.0.1")
        for i in range(per_client):
            body = accept_body(segmentation=rect_rle(1 + i, 1, 20 + i, 40), annotator=name)
            response = client.post("/api/images/2/annotations", json=body)
            (results if response.status_code == 201 else errors).append(response)

    threads = [threading.Thread(target=annotate, args=(n,)) for n in ("ann-a", "ann-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 * per_client
    rows = project.db.annotations(2)
    assert len(rows) == 2 * per_client == len({r["id"] for r in rows})
    for name in ("ann-a", "ann-b"):
        areas = sorted(r["area"] for r in rows if r["annotator"] == name)
        assert areas == sorted(mask_utils.area(rect_rle(1 + i, 1, 20 + i, 40))
                               for i in range(per_client))
    assert project.db.integrity_check() == "ok"


# --------------------------------------------------------------------------------- uploads
def png_bytes(height: int = 20, width: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims 1.6 gigapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_upload_adds_a_valid_image(client: TestClient, project: Project) -> None:
    response = client.post("/api/images?name=new-photo_1.png", content=png_bytes())
    assert response.status_code == 201, response.text
    assert response.json() == {"id": 4, "file_name": "new-photo_1.png", "width": 30, "height": 20}
    assert (project.images_dir / "new-photo_1.png").read_bytes() == png_bytes()
    assert "already has" in error_of(
        client.post("/api/images?name=new-photo_1.png", content=png_bytes()), 409)
    # the new image is usable at once
    assert client.post("/api/images/4/decode", json={"points": [[5, 5, 1]]}).status_code == 200


@pytest.mark.parametrize(
    ("name", "content", "status", "words"),
    [
        ("../escape.png", png_bytes(), 400, "invalid image name"),
        ("..%2Fescape.png", png_bytes(), 400, "invalid image name"),
        ("sub/dir.png", png_bytes(), 400, "invalid image name"),
        ("/etc/passwd.png", png_bytes(), 400, "invalid image name"),
        (".hidden.png", png_bytes(), 400, "invalid image name"),
        ("a..png", png_bytes(), 400, "invalid image name"),
        ("notes.txt", b"hello", 400, "must end in"),
        ("fake.png", b"this is not an image at all", 415, "not an image"),
        ("bomb.png", bomb_png(), 415, "decompression bomb"),
        ("empty.png", b"", 400, "empty upload"),
        ("big.png", b"\0" * 300_000, 413, "too large"),
    ],
)
def test_upload_rejects_bad_files(client: TestClient, project: Project, name: str,
                                  content: bytes, status: int, words: str) -> None:
    before = sorted(p.name for p in project.root.rglob("*"))
    response = client.post("/api/images", params={"name": name}, content=content)
    assert words in error_of(response, status)
    assert count_rows(project, "images") == 3
    after = sorted(p.name for p in project.root.rglob("*"))
    assert after == before  # no file written, not even a temporary one
    assert not (project.root.parent / "escape.png").exists()


def test_upload_limit_holds_without_content_length(client: TestClient, project: Project) -> None:
    def chunks():
        for _ in range(10):
            yield b"\0" * 50_000

    response = client.post("/api/images?name=streamed.png", content=chunks())
    assert "too large" in error_of(response, 413)
    assert not list(project.images_dir.glob(".upload-*"))


def test_json_bodies_over_the_limit_are_413(project: Project, service: ModelService) -> None:
    small = TestClient(create_app(project, service, prefetch=False, max_body_bytes=4096),
                       base_url="http://127.0.0.1")
    padded = {"points": [[30, 20, 1]], "box": None, "pad": "x" * 5000}
    assert "limit" in error_of(small.post("/api/images/1/decode", json=padded), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    response = small.post("/api/images/1/decode", content=chunks(),
                          headers={"content-type": "application/json"})
    assert "limit" in error_of(response, 413)
    ok = small.post("/api/images/1/decode", json={"points": [[30, 20, 1]]})
    assert ok.status_code == 200 and len(ok.json()["masks"]) == 3  # small bodies pass whole


def test_no_path_leaves_the_project(client: TestClient, project: Project) -> None:
    for path in ("/static/../project.db", "/static/%2e%2e/project.db",
                 "/static/..%2F..%2Fproject.db", "/api/images/..%2F..%2Fproject.db/file"):
        assert client.get(path).status_code in (404, 422), path
    # A tampered database row cannot point the file endpoint outside images/.
    with sqlite3.connect(project.db.path) as conn:
        conn.execute("UPDATE images SET file_name = '../project.db' WHERE id = 3")
    assert "invalid image name" in error_of(client.get("/api/images/3/file"), 400)


# ------------------------------------------------------------------ stage 2, models, export
def test_stage2_prefills_candidates_once_then_review(client: TestClient, project: Project) -> None:
    settings = client.put("/api/settings", json={
        "stage": 2, "prefill_points_per_side": 4, "prefill_iou_thresh": 0.0,
        "prefill_stability_thresh": 0.0}).json()
    assert settings["stage"] == 2 and settings["prefill_points_per_side"] == 4
    added = client.post("/api/images/1/prepare").json()["candidates_added"]
    assert added > 0
    assert client.post("/api/images/1/prepare").json()["candidates_added"] == 0
    candidates = client.get("/api/images/1/annotations").json()
    assert len(candidates) == added and {c["status"] for c in candidates} == {"candidate"}
    assert {c["stage"] for c in candidates} == {2} and candidates[0]["annotator"] == "auto"
    kept = client.post(f"/api/annotations/{candidates[0]['id']}/keep",
                       json={"seconds": 1.5, "annotator": "bob"}).json()
    assert kept["status"] == "accepted" and kept["annotator"] == "bob" and kept["seconds"] == 1.5
    if len(candidates) > 1:
        gone = client.delete(f"/api/annotations/{candidates[1]['id']}").json()
        assert gone["status"] == "rejected"
        back = client.post(f"/api/annotations/{candidates[1]['id']}/restore").json()
        assert back["status"] == "candidate"
    # a click-accepted mask in stage 2 counts as stage 2
    assert client.post("/api/images/1/annotations", json=accept_body()).json()["stage"] == 2
    for bad in ({"stage": 3}, {"prefill_iou_thresh": 2}, {"prefill_points_per_side": 1000},
                {"unknown": 1}):
        error_of(client.put("/api/settings", json=bad), 422)


def test_segment_everything_proposes_candidates_without_duplicates(client: TestClient) -> None:
    # Random weights pass no real threshold; 0 lets every proposal through.
    body = {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}
    first = client.post("/api/images/2/everything", json=body).json()["candidates_added"]
    assert first > 0
    assert client.get("/api/images").json()[1]["candidates"] == first
    assert client.post("/api/images/2/everything", json=body).json()["candidates_added"] == 0
    error_of(client.post("/api/images/2/everything", json={"pred_iou_thresh": 3}), 422)


def test_switch_model_version(client: TestClient, project: Project, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(build_sam(SMALL), project.models_dir / "other.safetensors")
    version = project.db.add_model_version("samkit-tiny",
                                           project.relative_checkpoint(checkpoint), 1)
    client.post("/api/images/1/prepare")
    models = client.get("/api/models").json()
    assert models["loaded"] == 1 and [v["id"] for v in models["versions"]] == [1, version.id]
    switched = client.post("/api/models/current", json={"version": version.id}).json()
    assert switched["loaded"] == version.id and switched["trained"] is True
    assert project.db.get_setting("model_version") == version.id
    decoded = client.post("/api/images/1/decode", json={"points": [[5, 5, 1]]}).json()
    assert decoded["model_version"] == version.id
    assert project.embedding_path(version.id, 1).is_file()
    error_of(client.post("/api/models/current", json={"version": 99}), 404)
    error_of(client.post("/api/models/current", json={"version": "x"}), 422)


def test_export_endpoints_load_in_pycocotools(client: TestClient, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    client.post("/api/images/1/annotations", json=accept_body())
    client.post("/api/images/3/annotations", json=accept_body(segmentation=rect_rle(0, 0, 9, 9)))
    coco_json = client.get("/api/export?format=coco")
    assert "attachment" in coco_json.headers["content-disposition"]
    path = tmp_path / "coco.json"
    path.write_bytes(coco_json.content)
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 3]
    masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[3]))]
    assert [int(m.sum()) for m in masks] == [81]
    archive = zipfile.ZipFile(io.BytesIO(client.get("/api/export?format=sa1b").content))
    assert sorted(archive.namelist()) == ["img0.png.json", "img2.png.json"]
    record = json.loads(archive.read("img0.png.json"))
    assert record["image"]["file_name"] == "img0.png"
    assert mask_utils.area(record["annotations"][0]["segmentation"]) == 1000
    assert client.get("/api/export?format=coco&stages=2").json()["annotations"] == []
    error_of(client.get("/api/export?format=xml"), 422)
    error_of(client.get("/api/export?stages=4"), 400)


def test_stats_endpoint(client: TestClient) -> None:
    client.post("/api/images/1/annotations", json=accept_body(seconds=6.0))
    client.post("/api/images/1/annotations", json=accept_body(seconds=2.0))
    stats = client.get("/api/stats").json()
    row = stats["rows"][0]
    assert (row["stage"], row["images"], row["masks"]) == (1, 1, 2)
    assert row["seconds_per_mask"] == 4.0 and row["masks_per_hour"] == 900.0
    assert "1 manual" in stats["table"]


# ---------------------------------------------------------------------------------- access
def test_loopback_server_refuses_foreign_hosts_and_origins(client: TestClient) -> None:
    assert "only answers" in error_of(client.get("/api/images", headers={"Host": "evil.example"}),
                                      403)
    assert client.get("/api/images", headers={"Host": "localhost:8000"}).status_code == 200
    cross = client.post("/api/images/1/annotations", json=accept_body(),
                        headers={"Origin": "http://evil.example"})
    assert "cross-origin" in error_of(cross, 403)
    same = client.post("/api/images/1/annotations", json=accept_body(),
                       headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 201


def test_token_is_checked_on_every_request(project: Project, service: ModelService) -> None:
    token = "t" * 24
    app = create_app(project, service, token=token, prefetch=False)
    client = TestClient(app, base_url="http://192.0.2.10:8000")
    for path in ("/", "/api/images", "/static/app.js", "/api/images/1/file"):
        assert "token" in error_of(client.get(path), 401)
    error_of(client.post("/api/images/1/annotations", json=accept_body()), 401)
    error_of(client.get("/api/images", headers={"X-Samkit-Token": "wrong" * 5}), 401)
    assert client.get("/api/images", headers={"X-Samkit-Token": token}).status_code == 200
    assert client.get("/api/images",
                      headers={"Authorization": f"Bearer {token}"}).status_code == 200
    error_of(client.get("/?token=nope"), 401)
    login = client.get(f"/?token={token}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "samkit_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/api/images").status_code == 200  # the cookie now rides along
    assert count_rows(project) == 0


def test_generated_token_only_off_loopback() -> None:
    from samkit.engine.security import is_loopback, resolve_token

    assert resolve_token("127.0.0.1", None) == (None, False)
    assert resolve_token("::1", None) == (None, False)
    token, generated = resolve_token("0.0.0.0", None)
    assert generated and len(token) >= 24
    assert resolve_token("0.0.0.0", "x" * 16) == ("x" * 16, False)
    with pytest.raises(SamkitError, match="at least 16"):
        resolve_token("127.0.0.1", "short")
    assert is_loopback("localhost") and is_loopback("127.8.0.1") and not is_loopback("10.0.0.1")


# ------------------------------------------------------------------------------ text prompts
def text_loader(project, version, device):  # the ModelLoader signature
    """The small model with a text slot the size of the tiny CLIP's embeddings (random),
    built once: seeding torch while a server thread runs torch code races in torch's own
    tracing state (a KeyError in torch.fx.traceback), so the build happens on first use."""
    if "text" not in _models:
        torch.manual_seed(0)
        sam = build_sam(SMALL)
        sam.attach_text_prompt(24, "tiny-clip")
        _models["text"] = sam.eval()
    return _models["text"]


def text_client(project: Project, loader, clip) -> TestClient:
    service = ModelService(project, "cpu", loader=loader, clip=clip)
    return TestClient(create_app(project, service, prefetch=False), base_url="http://127.0.0.1")


def test_text_prompts_in_the_app(project: Project, clip_dir: Path) -> None:
    """A model with a text slot and a CLIP answers text (alone: 3 masks, the predictor's own),
    text + a point, and stores the text with an accepted mask; without the slot or the CLIP,
    the page is told why and a text decode is a one-line 400."""
    from samkit.clip import load_clip
    from samkit.images import load_image
    from samkit.predictor import SamPredictor

    clip = load_clip(clip_dir)
    reference = text_loader(project, None, "cpu")  # built before any server thread runs
    plain = text_client(project, small_loader, clip)
    status = plain.get("/api/models").json()["text"]
    assert status["slot"] is False and "no text slot" in status["reason"]
    assert "no text slot" in error_of(plain.post("/api/images/1/decode",
                                                 json={"text": "a wheel"}), 400)
    no_clip = text_client(project, text_loader, None)
    status = no_clip.get("/api/models").json()["text"]
    assert status["slot"] is True and status["ready"] is False and "--clip" in status["reason"]
    assert "--clip" in error_of(no_clip.post("/api/images/1/decode", json={"text": "a wheel"}),
                                400)

    client = text_client(project, text_loader, clip)
    assert client.get("/api/models").json()["text"] == {"slot": True, "ready": True,
                                                       "clip": clip.name}
    alone = client.post("/api/images/1/decode", json={"text": " a wheel "}).json()
    assert len(alone["masks"]) == 3  # as ambiguous as one point
    predictor = SamPredictor(reference, clip=clip)
    predictor.set_image(load_image(project.image_path("img0.png")))
    expected, scores, _ = predictor.predict(text="a wheel")
    for mask, want, score in zip(alone["masks"], expected, scores, strict=True):
        got = mask_utils.decode(mask["segmentation"]) > 0
        union = np.logical_or(got, want).sum()
        assert union == 0 or np.logical_and(got, want).sum() / union >= 0.99
        assert mask["score"] == pytest.approx(float(score), abs=1e-4)
    point = {"points": [[30, 20, 1]]}
    with_text = client.post("/api/images/1/decode", json=point | {"text": "a cat"}).json()
    without = client.post("/api/images/1/decode", json=point).json()
    assert [m["score"] for m in with_text["masks"]] != [m["score"] for m in without["masks"]]
    assert "no prompt" in error_of(client.post("/api/images/1/decode", json={"text": "  "}), 400)
    assert "text" in error_of(client.post("/api/images/1/decode", json={"text": "x" * 201}), 422)

    saved = client.post("/api/images/1/annotations", json=accept_body(
        segmentation=alone["masks"][0]["segmentation"],
        prompts={"points": [], "box": None, "text": "a wheel"})).json()
    plain_saved = client.post("/api/images/1/annotations", json=accept_body()).json()
    stored = {a["id"]: a["prompts"] for a in project.db.annotations(1)}
    assert stored[saved["id"]] == {"points": [], "box": None, "text": "a wheel"}
    assert stored[plain_saved["id"]] == {"points": [[20, 12, 1]], "box": None}


def test_page_decoder_endpoints(project: Project, service: ModelService, tmp_path: Path) -> None:
    """The browser decoder's side of the API: float16 embedding bytes, the manifest's
    reasons for not decoding in the page, unknown graphs, the isolation headers."""
    app = create_app(project, service, prefetch=False, runtime_dir=tmp_path / "no-ort")
    client = TestClient(app, base_url="http://127.0.0.1")
    answer = client.get("/api/images/1/embedding")
    assert answer.status_code == 200, answer.text
    shape = tuple(int(n) for n in answer.headers["x-samkit-shape"].split(","))
    assert answer.headers["x-samkit-model-version"] == str(service.version.id)
    half = np.frombuffer(answer.content, "<f2").reshape(shape)
    exact = service._embedding(project.db.image(1)).features.numpy()
    np.testing.assert_allclose(half.astype(np.float32), exact, rtol=1e-3, atol=1e-4)
    assert answer.headers["cross-origin-embedder-policy"] == "require-corp"
    assert answer.headers["cross-origin-opener-policy"] == "same-origin"

    wrong = client.get(f"/api/images/1/embedding?version={service.version.id + 1}")
    assert wrong.status_code == 409 and "reload the decoder" in wrong.json()["error"]
    assert client.get("/api/images/99/embedding").status_code == 404
    manifest = client.get("/api/decoder").json()
    assert manifest["available"] is False and manifest["state"] == "no-runtime"
    assert "get_web_runtime.sh" in manifest["reason"]
    missing = client.get(f"/api/decoder/v{service.version.id}/fp32")
    assert missing.status_code == 404 and "no 'fp32' decoder graph" in missing.json()["error"]
    assert client.get("/static/ort/ort.wasm.min.js").status_code == 404

    off = TestClient(create_app(project, service, prefetch=False, browser_decoder=False),
                     base_url="http://127.0.0.1").get("/api/decoder").json()
    assert off["state"] == "off" and "--decoder server" in off["reason"]
