"""Generated bad input (Hypothesis) for the dataset and config readers: SA-1B /
``samkit everything`` JSONs, COCO instances files, mask PNGs, training YAML and ``--set``.

As in tests/test_fuzz.py the only allowed outcomes are a correct result or samkit's own
one-line :class:`SamkitError`; the cases are derandomised and scaled by
``SAMKIT_FUZZ_SCALE`` (``python benchmarks/fuzz.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from samkit.errors import SamkitError
from test_fuzz import fuzz, one_line  # the same bounds and one-line rule as every fuzz test

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def valid_rle(height: int, width: int) -> dict[str, Any]:
    mask = np.zeros((height, width), np.uint8, order="F")
    mask[: height // 2, : width // 2] = 1
    rle = mask_utils.encode(mask)
    return {"size": [height, width], "counts": rle["counts"].decode()}


def mutate(record: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """``record`` with the value at ``path`` replaced (or the last key dropped when value is
    the ``DROP`` marker)."""
    node: Any = record
    for part in path[:-1]:
        node = node[part]
    if value is DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return record


DROP = object()
SA1B_PATHS = [["image"], ["image", "width"], ["image", "height"], ["image", "image_id"],
              ["image", "file_name"], ["annotations"], ["annotations", 0],
              ["annotations", 0, "segmentation"], ["annotations", 0, "segmentation", "size"],
              ["annotations", 0, "segmentation", "counts"]]


def sa1b_record() -> dict[str, Any]:
    return {"image": {"image_id": 1, "file_name": "a.jpg", "width": 12, "height": 10},
            "annotations": [{"id": 1, "segmentation": valid_rle(10, 12), "area": 30,
                             "bbox": [0, 0, 6, 5]}]}


@fuzz(200)
@given(path=st.sampled_from(SA1B_PATHS), value=st.one_of(st.just(DROP), json_values),
       raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_generated_sa1b_files(tmp_path: Path, path: list, value: Any, raw: bytes | None) -> None:
    from samkit.data.sa1b import SA1BDataset, decode_masks

    folder = tmp_path / "sa1b"
    folder.mkdir(exist_ok=True)
    target = folder / "a.json"
    target.write_bytes(raw if raw is not None
                       else json.dumps(mutate(sa1b_record(), path, value)).encode())
    try:
        sample = SA1BDataset(folder)[0]
        masks = decode_masks(sample)
    except SamkitError as err:
        one_line(err)
        return
    assert masks.dtype == bool and masks.shape[1:] == (sample.height, sample.width)


COCO_PATHS = [["images"], ["images", 0], ["images", 0, "id"], ["images", 0, "height"],
              ["annotations"], ["annotations", 0, "image_id"], ["annotations", 0, "iscrowd"],
              ["annotations", 0, "segmentation"], ["annotations", 0, "segmentation", 0],
              ["annotations", 0, "segmentation", "counts"], ["categories"]]


def coco_record(rle: bool) -> dict[str, Any]:
    segmentation: Any = valid_rle(10, 12) if rle else [[1.0, 1.0, 8.0, 1.0, 8.0, 7.0]]
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 12, "height": 10}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": segmentation, "area": 20, "bbox": [1, 1, 7, 6]}],
            "categories": [{"id": 1, "name": "thing"}]}


@fuzz(200)
@given(rle=st.booleans(), path=st.sampled_from(COCO_PATHS),
       value=st.one_of(st.just(DROP), json_values))
def test_generated_coco_files(tmp_path: Path, rle: bool, path: list, value: Any) -> None:
    from samkit.data.coco import image_objects, open_coco

    record = coco_record(rle)
    try:
        record = mutate(record, path, value)
    except (KeyError, IndexError, TypeError):
        return  # the mutation does not apply to this variant (e.g. a polygon's "counts")
    target = tmp_path / "instances.json"
    target.write_text(json.dumps(record))
    try:
        coco, _ = open_coco(target)
        for image_id in coco.imgs:
            objects, _ = image_objects(coco, image_id)
            assert all(o.mask.dtype == bool and o.mask.any() for o in objects)
    except SamkitError as err:
        one_line(err)


@fuzz(120)
@given(mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "I;16", "LA"]),
       shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       values=st.lists(st.integers(0, 255), min_size=1, max_size=6),
       image_size=st.tuples(st.integers(1, 12), st.integers(1, 12)))
def test_generated_mask_pngs(tmp_path: Path, mode: str, shape: tuple[int, int],
                             values: list[int], image_size: tuple[int, int]) -> None:
    from samkit.data.masks import read_mask_objects

    rng = np.random.default_rng(sum(values) + shape[0])
    array = rng.choice(np.array(values, np.uint8), size=shape)
    try:
        Image.fromarray(array, mode="L").convert(mode).save(tmp_path / "m.png")
    except OSError:
        return  # Pillow cannot write this mode as PNG (e.g. "I"), so no reader ever meets it
    try:
        objects = read_mask_objects(tmp_path / "m.png", image_size)
    except SamkitError as err:
        one_line(err)
        return
    assert image_size == shape  # a size mismatch is always refused
    assert all(o.mask.shape == shape and o.mask.any() for o in objects)


config_keys = st.sampled_from(["lr", "batch_size", "scale_range", "data", "model",
                               "prompt_iterations", "model_overrides", "model_overrides.encoder",
                               "model_overrides.encoder.neck_blocks", "hflip", "iterations",
                               "nonexistent", "lr.x", ""])


@fuzz(240)
@given(document=st.one_of(st.text(max_size=80), json_values.map(yaml.safe_dump)),
       overrides=st.lists(st.one_of(st.text(max_size=30),
                                    st.tuples(config_keys, json_values).map(
                                        lambda kv: f"{kv[0]}={json.dumps(kv[1])}")),
                          max_size=3))
# Found by the larger runs: a key with newlines, pairs that are not pairs, a scalar encoder.
@example(document="? '\n\n'", overrides=[])
@example(document="", overrides=['prompt_iterations=[{"": null, "0": null}]'])
@example(document="", overrides=["model_overrides.encoder=1"])
def test_generated_training_configs(tmp_path: Path, document: str, overrides: list[str]) -> None:
    from samkit.train.config import TrainConfig, load_config

    path = tmp_path / "run.yaml"
    path.write_text(document)
    try:
        cfg = load_config(path, overrides)
        cfg.model_config()
    except SamkitError as err:
        one_line(err)
        return
    assert isinstance(cfg, TrainConfig)


def test_a_read_only_output_folder_is_one_line(tmp_path: Path) -> None:
    """Writing results into a folder the user cannot write is a one-line error, exit 2."""
    import subprocess
    import sys

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: a read-only folder cannot be made")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    image = Path(__file__).resolve().parents[1] / "examples" / "sample.png"
    result = subprocess.run([sys.executable, "-m", "samkit", "segment", str(image), "--box",
                             "155,195,345,385", "-o", str(out / "sample")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "samkit: error:" in result.stderr
