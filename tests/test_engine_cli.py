"""``samkit engine`` commands: init / import, stage 3 (``auto``: resumable, sharded), export
(both formats load in pycocotools and in ``samkit train``'s readers), stats, and retrain
(registers a model version the running server can switch to)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
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

from samkit import cli
from samkit.automatic import AutomaticMaskGenerator
from samkit.build import build_sam, save_checkpoint
from samkit.data.sa1b import SA1BDataset, decode_masks
from samkit.engine.db import NewAnnotation
from samkit.engine.project import Project, open_project
from samkit.engine.stages import run_auto
from samkit.errors import SamkitError
from samkit.everything import LoadedGenerator
from samkit.train.data import open_source
from test_engine import SMALL, make_images, rect_rle, small_loader

# pycocotools (numpy 2) warns on every decode; not ours to fix.
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]
HEIGHT, WIDTH = 64, 96


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def accepted(image_id: int, stage: int = 1, seconds: float = 3.0, **box) -> NewAnnotation:
    rle = rect_rle(**box)
    return NewAnnotation(
        image_id=image_id, stage=stage, status="accepted", segmentation=rle,
        area=int(mask_utils.area(rle)), bbox=[int(v) for v in mask_utils.toBbox(rle)],
        prompts={"points": [[20.0, 12.0, 1]], "box": None}, score=0.8, stability=None,
        annotator="t", seconds=seconds, model_version=1,
    )


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return open_project(tmp_path / "proj", make_images(tmp_path / "src"), None, None)


def small_generator() -> LoadedGenerator:
    """The stage-3 factory with the small model; thresholds 0 so random weights yield masks."""
    generator = AutomaticMaskGenerator(build_sam(SMALL), points_per_side=4, pred_iou_thresh=0,
                                       stability_score_thresh=0, output_mode="coco_rle")
    return LoadedGenerator(generator.generate, "small", trained=False)


# -------------------------------------------------------------------------------- init/import
def test_init_imports_safely_and_only_once(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    source = make_images(tmp_path / "src", 1)
    (source / "sub").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(source / "sub" / "my photo (1).PNG")
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    (source / "notes.txt").write_text("ignored: not an image suffix")
    code, out, err = run(["engine", "init", str(tmp_path / "p"), "--images", str(source)], capsys)
    assert code == 0, err
    assert "imported 2 image(s)" in out and "1 not readable, skipped" in out
    assert "broken.jpg" in err
    project = Project.open(tmp_path / "p")
    assert [i.file_name for i in project.db.images()] == ["img0.png", "sub__my_photo__1_.PNG"]
    assert (project.images_dir / "img0.png").read_bytes() == (source / "img0.png").read_bytes()
    assert not any(p.is_symlink() for p in project.images_dir.iterdir())
    code, out, _ = run(["engine", "init", str(tmp_path / "p"), "--images", str(source)], capsys)
    assert "imported 0 image(s)" in out and len(project.db.images()) == 2
    assert "2 already in the project" in out  # not "skipped", as if something failed

    code, _, err = run(["engine", "init", str(tmp_path / "q"), "--images", str(tmp_path / "no")],
                       capsys)
    assert code == 2 and "not a folder" in err and not (tmp_path / "q").exists()
    code, _, err = run(["engine", "stats", str(tmp_path / "src")], capsys)
    assert code == 2 and "not a samkit project" in err
    code, _, err = run(["engine", "init", str(tmp_path / "r"), "--model", "vit_q"], capsys)
    assert code == 2 and "unknown model" in err


# ------------------------------------------------------------------------------------ stage 3
def test_auto_is_sharded_resumable_and_skips_annotated_images(project: Project) -> None:
    project.db.add_annotations([accepted(1)])  # image 1 has a human annotation
    version = project.db.current_model_version()
    first = run_auto(project, version, (0, 2), small_generator)  # images 1 and 3
    assert (first.done, first.skipped) == (1, 1) and first.masks > 0
    second = run_auto(project, version, (1, 2), small_generator)  # image 2
    assert (second.done, second.skipped) == (1, 0)
    rows = project.db.annotations(stages=(3,))
    assert {r["image_id"] for r in rows} == {2, 3} and {r["annotator"] for r in rows} == {"auto"}
    assert {r["status"] for r in rows} == {"accepted"} and all(r["seconds"] > 0 for r in rows)

    def must_not_load() -> LoadedGenerator:
        raise AssertionError("a finished project must not even load the model")

    again = run_auto(project, version, (0, 1), must_not_load)
    assert (again.done, again.skipped) == (0, 3)
    assert len(project.db.annotations(stages=(3,))) == len(rows)


def test_auto_bf16_flag_reaches_the_generator_spec(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from samkit.engine import stages

    specs = []
    monkeypatch.setattr(stages, "run_auto",
                        lambda project, version, shard, spec: specs.append(spec)
                        or run_auto(project, version, shard, small_generator))
    for flags in ([], ["--bf16"]):
        code, _, err = run(["engine", "auto", str(project.root), *flags], capsys)
        assert code == 0, err
    assert [spec.bf16 for spec in specs] == [False, True]


def test_auto_killed_midway_redoes_only_the_unfinished_image(project: Project) -> None:
    version = project.db.current_model_version()
    real = small_generator()
    calls = []

    def dying() -> LoadedGenerator:
        def generate(image):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed while on the second image
            return real.generate(image)

        return LoadedGenerator(generate, "small", trained=False)

    with pytest.raises(KeyboardInterrupt):
        run_auto(project, version, (0, 1), dying)
    assert project.db.runs_done("auto") == {1}
    done_first = len(project.db.annotations(1, stages=(3,)))
    resumed = run_auto(project, version, (0, 1), small_generator)
    assert (resumed.done, resumed.skipped) == (2, 1)
    assert len(project.db.annotations(1, stages=(3,))) == done_first  # image 1 not redone


# --------------------------------------------------------------------------- export and stats
def test_export_both_formats_load_in_pycocotools_and_train(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pycocotools.coco import COCO

    project.db.add_annotations([accepted(1), accepted(1, stage=2, top=40, bottom=60),
                                accepted(3, stage=3)])
    root = str(project.root)
    out = tmp_path / "sa1b"
    code, printed, err = run(["engine", "export", root, "--format", "sa1b", "-o", str(out)],
                             capsys)
    assert code == 0, err
    assert "3 masks on 2 images" in printed
    dataset = SA1BDataset(out)
    assert [s.image_path.name for s in dataset] == ["img0.png", "img2.png"]
    masks = decode_masks(dataset[0])
    assert masks.shape == (2, HEIGHT, WIDTH) and int(masks[0].sum()) == 25 * 40
    assert [a["stage"] for a in dataset[0].annotations] == [1, 2]
    image, train_masks = open_source(str(out)).load(0)
    assert image.shape == (HEIGHT, WIDTH, 3) and train_masks.shape == (2, HEIGHT, WIDTH)

    coco_path = tmp_path / "coco" / "instances.json"
    code, _, err = run(["engine", "export", root, "--format", "coco", "-o", str(coco_path),
                        "--stages", "1,2"], capsys)
    assert code == 0, err
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_path))
    assert coco.getImgIds() == [1] and len(coco.getAnnIds()) == 2
    assert int(coco.annToMask(coco.loadAnns(coco.getAnnIds())[0]).sum()) == 25 * 40
    source = open_source(f"coco:{coco_path}:{project.images_dir}")
    assert source.load(0)[1].shape == (2, HEIGHT, WIDTH)

    # A re-export refreshes its own folder; a stranger's folder is refused.
    project.db.review(3, "delete")
    code, printed, _ = run(["engine", "export", root, "--format", "sa1b", "-o", str(out)], capsys)
    assert "2 masks on 1 images" in printed
    assert sorted(p.name for p in out.glob("*.json")) == ["img0.png.json"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    code, _, err = run(["engine", "export", root, "--format", "sa1b", "-o", str(stranger)],
                       capsys)
    assert code == 2 and "not empty" in err and (stranger / "keep.txt").exists()
    code, _, err = run(["engine", "export", root, "--format", "coco", "-o", str(out)], capsys)
    assert code == 2 and "is a folder" in err
    code, _, err = run(["engine", "export", root, "--format", "coco", "-o", str(coco_path),
                        "--stages", "0"], capsys)
    assert code == 2 and "bad stages" in err


def test_stats_per_stage_and_model_version(project: Project,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    project.db.add_annotations([accepted(1, seconds=10), accepted(2, seconds=20),
                                accepted(2, stage=2, seconds=6)])
    code, table, _ = run(["engine", "stats", str(project.root)], capsys)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "model", "images", "masks", "masks/image", "s/mask",
                                "masks/hour"]
    assert lines[2].split() == ["1", "manual", "v1", "2", "2", "1.0", "15.00", "240"]
    assert lines[3].split() == ["2", "semi-auto", "v1", "1", "1", "1.0", "6.00", "600"]
    assert lines[4].split() == ["all", "all", "2", "3", "1.5", "12.00", "300"]
    code, text, _ = run(["engine", "stats", str(project.root), "--json"], capsys)
    assert json.loads(text)[0]["masks_per_hour"] == 240.0


# ------------------------------------------------------------------------------------ retrain
def test_retrain_registers_a_version_the_server_switches_to(tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="needs `pip install samkit[engine]`")
    from fastapi.testclient import TestClient

    from samkit.engine.model_service import ModelService
    from samkit.engine.retrain import retrain
    from samkit.engine.server import create_app

    start = save_checkpoint(build_sam(SMALL), tmp_path / "small.safetensors")
    project = open_project(tmp_path / "proj", make_images(tmp_path / "src"), "vit_t", start)
    project.db.add_annotations([accepted(1), accepted(2, top=30, bottom=60)])
    small = ["model_overrides.image_size=256", "model_overrides.encoder.depths=[1,1,1,1]",
             "num_workers=0", "max_masks_per_image=2", "progress=false", "batch_size=4"]
    with pytest.raises(SamkitError, match="no accepted masks"):
        retrain(project, 1, overrides=small, stages=(3,), device="cpu")
    version = retrain(project, 1, overrides=small, device="cpu")
    assert version.id == 2 and version.parent_id == 1
    assert version.checkpoint.startswith("models/")
    assert (project.root / version.checkpoint).is_file()
    note = json.loads(version.note)
    assert (note["steps"], note["images"], note["masks"]) == (1, 2, 2)
    assert project.db.current_model_version().id == 2

    project.db.set_settings({"model_version": 1})  # a server still running version 1 ...
    service = ModelService(project, "cpu", loader=small_loader)
    client = TestClient(create_app(project, service, prefetch=False),
                        base_url="http://127.0.0.1")
    assert client.get("/api/models").json()["loaded"] == 1
    assert client.post("/api/models/current", json={"version": 2}).json()["loaded"] == 2
    decoded = client.post("/api/images/1/decode", json={"points": [[30, 20, 1]]}).json()
    assert decoded["model_version"] == 2


def test_annotate_on_a_busy_port_is_one_error_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as squatter:  # someone else's app on the port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        busy = squatter.getsockname()[1]
        code, out, err = run(["annotate", str(tmp_path / "proj"), "--port", str(busy)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("samkit: error: ")
    assert f"port {busy} on 127.0.0.1 is in use" in err and "--port 0" in err
    assert "open http" not in out  # no URL that would open the other program
    assert not (tmp_path / "proj").exists()  # failed before creating anything


def test_annotate_port_0_serves_on_the_port_it_prints(tmp_path: Path) -> None:
    images = make_images(tmp_path / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "samkit.cli", "annotate", str(tmp_path / "proj"),
               "--images", str(images), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
    try:
        url = None
        for line in server.stdout:  # type: ignore[union-attr]
            if "open http://" in line:
                url = line.split("open ", 1)[1].strip()
                break
        assert url is not None and not url.endswith(":0/"), url
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/project", timeout=5) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "server never answered"
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)
