"""``samkit eval``: each protocol end to end from the command line, on 1-2 items of the shared
datasets with the default model, plus the exit status rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkit.cli import main
from samkit.eval.report import legend_label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _data(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} absent (expected at {path})")
    return path


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "res.json"
    code = main(["eval", *argv, "--json", str(out)])
    return code, json.loads(out.read_text())


def _outputs_exist(tmp_path: Path, doc: dict) -> None:
    assert (tmp_path / "res.md").read_text().startswith("# samkit eval")
    assert doc["outputs"]["plots"]
    for name in doc["outputs"]["plots"]:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_points_smoke(tmp_path):
    code, doc = _run(tmp_path, "points", "--data", str(_data("grabcut")), "--limit", "1",
                     "--max-clicks", "3")
    assert code == 0
    _outputs_exist(tmp_path, doc)
    assert doc["model"]["name"] == "samkit-tiny" and isinstance(doc["model"]["trained"], bool)
    [m] = doc["datasets"][0]["methods"].values()
    assert m["objects"] == 1 and set(m["miou"]) == {"1", "2", "3"}
    assert 0.0 <= m["box_miou"] <= 1.0 and 1 <= m["noc"]["90"] <= 3
    assert doc["settings"]["max_clicks"] == 3 and doc["runtime_s"] > 0
    assert doc["model"]["weights"] == "bundled samkit_tiny.safetensors"


def test_plot_legend_names_the_weights() -> None:
    untrained = {"name": "vit_b", "trained": False, "weights": "random (seed 0)"}
    trained = {"name": "samkit-tiny", "trained": True, "weights": "bundled x.safetensors"}
    assert legend_label("vit_b", untrained, ["grabcut"]) == "vit_b (UNTRAINED: random (seed 0))"
    assert legend_label("grabcut", untrained, ["grabcut"]) == "grabcut"  # a baseline: no model
    assert legend_label("samkit-tiny", trained, []) == "samkit-tiny (bundled x.safetensors)"
    # Documents written before weights were recorded still say "untrained".
    assert "UNTRAINED" in legend_label("m", {"trained": False}, [])


def test_edges_smoke(tmp_path):
    code, doc = _run(tmp_path, "edges", "--data", str(_data("bsds500")), "--limit", "1",
                     "--points-per-side", "4", "--thresholds", "9", "--baseline", "canny")
    assert code == 0
    _outputs_exist(tmp_path, doc)
    for m in doc["datasets"][0]["methods"].values():
        assert m["images"] == 1 and 0.0 <= m["ods"] <= 1.0
        assert len(m["pr_curve"]["recall"]) == 9


def test_proposals_smoke(tmp_path):
    code, doc = _run(tmp_path, "proposals", "--data", str(_data("coco_tiny_val2017")),
                     "--limit", "1", "--points-per-side", "4")
    assert code == 0
    _outputs_exist(tmp_path, doc)
    methods = doc["datasets"][0]["methods"]
    m = methods["samkit-tiny"]  # the paper's protocol: no quality filters
    assert m["images"] == 1 and 0 < m["proposals"] <= 48
    assert {"AR@10", "AR@100", "AR@1000", "AR_small@1000"} <= m.keys()
    # Beside it, what `samkit everything` keeps with the model's own filters.
    from samkit.registry import get_config

    filters = get_config("samkit-tiny").everything_filters
    (filtered,) = [v for k, v in methods.items() if k.startswith("samkit-tiny, everything")]
    assert f"IoU > {filters.pred_iou_thresh:g}" in next(k for k in methods if k != "samkit-tiny")
    assert filtered["images"] == 1 and filtered["proposals"] <= m["proposals"]


def test_instances_smoke(tmp_path):
    code, doc = _run(tmp_path, "instances", "--data", str(_data("coco_tiny_val2017")),
                     "--limit", "1", "--oracle-boxes")
    assert code == 0
    _outputs_exist(tmp_path, doc)
    m = doc["datasets"][0]["methods"]["samkit-tiny"]
    assert m["images"] == 1 and m["masks"] > 0 and 0.0 <= m["AP"] <= 1.0


def test_nothing_evaluable_exits_1_with_reasons(tmp_path, capsys):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "a.png")
    code, doc = _run(tmp_path, "points", "--data", str(root), "--data", str(tmp_path / "nope"),
                     "--no-model", "--baseline", "grabcut")
    assert code == 1
    err = capsys.readouterr().err
    assert "skipped bad/a: mask a.png is 4x4 but the image is 8x8" in err
    assert "skipped dataset" in err and "nothing could be evaluated" in err
    assert doc["errors_total"] == 2 and doc["model"] is None


@pytest.mark.parametrize("argv, message", [
    (["points", "--limit", "0"], "--limit must be >= 1"),
    (["points", "--no-model"], "--no-model needs at least one --baseline"),
    (["points", "--model", "vit_x"], "unknown model 'vit_x'"),
    (["instances", "--detections", "missing.json"], "detections file not found"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code = main(["eval", *argv, "--data", str(tmp_path), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
