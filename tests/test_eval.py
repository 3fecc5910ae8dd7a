"""samkit.eval: click simulation, datasets, and the points / proposals / instances protocols
driven by an ORACLE method (returns the ground truth: perfect scores) and an EMPTY one
(returns nothing: zero scores), on small synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkit.errors import SamkitError
from samkit.eval.clicks import first_click, mask_box, mask_iou, next_click
from samkit.eval.common import ErrorLog
from samkit.data.masks import read_mask_objects
from samkit.eval.datasets import Sample, open_dataset
from samkit.eval.grabcut import GrabCutPredictor
from samkit.eval.instances import load_detections, run_instances
from samkit.eval.points import PointsEvaluator, run_points
from samkit.eval.predictors import Prediction, PromptBatch
from samkit.eval.proposals import MAX_DETS, image_proposals, run_proposals

H, W = 48, 64


# ---------------------------------------------------------------------------- test doubles
def _key(image: np.ndarray) -> bytes:
    return np.ascontiguousarray(image).tobytes()


class OraclePredictor:
    """Returns the ground-truth object a prompt points at: the object under the first
    click, or the one whose box fits the prompt box best."""

    name = "oracle"

    def __init__(self, truth: dict[bytes, list[np.ndarray]]) -> None:
        self.truth = truth
        self.objects: list[np.ndarray] = []

    def set_image(self, image: np.ndarray) -> None:
        self.objects = self.truth[_key(image)]

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        chosen = [self._pick(prompts, b) for b in range(len(prompts))]
        m = 3 if multimask else 1
        logits = np.stack([np.where(g, 10.0, -10.0) for g in chosen])[:, None].repeat(m, 1)
        return Prediction(logits.astype(np.float32), np.ones((len(chosen), m)),
                          np.zeros((len(chosen), m, 8, 8)))

    def _pick(self, prompts: PromptBatch, b: int) -> np.ndarray:
        if prompts.points is not None:
            x, y = prompts.points[b, 0].astype(int)
            return next(g for g in self.objects if g[y, x])
        assert prompts.boxes is not None
        return max(self.objects, key=lambda g: _box_iou(mask_box(g), prompts.boxes[b]))


class EmptyPredictor:
    name = "empty"

    def __init__(self) -> None:
        self.shape = (1, 1)

    def set_image(self, image: np.ndarray) -> None:
        self.shape = image.shape[:2]

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        m = 3 if multimask else 1
        logits = np.full((len(prompts), m, *self.shape), -10.0, np.float32)
        return Prediction(logits, np.zeros((len(prompts), m)), np.zeros((len(prompts), m, 8, 8)))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _square(y0: int, x0: int, size: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return mask


# ---------------------------------------------------------------------------- clicks
def test_first_click_is_the_centre_of_a_square():
    gt = np.zeros((50, 60), bool)
    gt[10:31, 20:41] = True  # 21 x 21, centre (x=30, y=20)
    click = first_click(gt)
    assert (click.x, click.y, click.positive) == (30, 20, True)


def test_image_border_counts_as_boundary():
    gt = np.zeros((40, 40), bool)
    gt[:, :11] = True  # a strip touching the left, top and bottom borders
    click = first_click(gt)
    # 6 px from the left border (x = 5) and from the top one: the first such pixel.
    assert (click.x, click.y) == (5, 5)


def test_next_click_goes_to_the_deeper_error_region():
    gt = np.zeros((60, 80), bool)
    gt[10:50, 10:50] = True
    pred = np.zeros_like(gt)
    pred[10:50, 10:25] = True  # misses the right part: a 40 x 25 false-negative block
    pred[52:55, 60:63] = True  # a small false positive
    click = next_click(pred, gt)
    assert click.positive and gt[click.y, click.x] and not pred[click.y, click.x]
    # The block is 25 px wide: its middle column x = 37 is 13 px deep, as is every row from
    # y = 22 on; the first of those ties in row-major order wins.
    assert (click.x, click.y) == (37, 22)

    pred = gt.copy()
    pred[0:8, 55:80] = True  # a large false positive outside the object
    pred[30, 30] = False  # a one-pixel false negative
    click = next_click(pred, gt)
    assert not click.positive and pred[click.y, click.x] and not gt[click.y, click.x]


def test_clicks_skip_clicked_pixels_and_ignored_errors():
    gt = _square(10, 10, 9)
    clicked = np.zeros_like(gt)
    centre = first_click(gt)
    clicked[centre.y, centre.x] = True
    again = next_click(np.zeros_like(gt), gt, clicked=clicked)
    assert (again.x, again.y) != (centre.x, centre.y) and gt[again.y, again.x]
    band = np.zeros_like(gt)
    band[9:20, 9:20] = True
    band &= ~_square(11, 11, 7)
    pred = _square(11, 11, 7)  # errors only inside the ignore band
    assert next_click(pred, gt, ignore=band) is None
    assert mask_iou(pred, gt, band) == 1.0
    assert mask_iou(pred, gt, None) == pytest.approx(49 / 81)


# ---------------------------------------------------------------------------- datasets
def _save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # DAVIS-style: pixel values are palette indices
        im = Image.frombytes("P", array.shape[::-1], array.tobytes())
        im.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0])
    else:
        im = Image.fromarray(array)
    im.save(path)


@pytest.fixture
def mask_folder(tmp_path):
    """Good items (binary, GrabCut-style with an ignore band, a two-object palette mask)
    and bad ones (missing mask, wrong size, empty mask, corrupt image, orphan mask)."""
    root = tmp_path / "folder"
    truth = {}
    a = _image(1)
    _save(root / "images" / "a.png", a)
    _save(root / "masks" / "a.png", _square(8, 8, 20).astype(np.uint8) * 255)
    truth[_key(a)] = [_square(8, 8, 20)]
    b = _image(2)
    gc = np.zeros((H, W), np.uint8)
    gc[5:35, 20:50] = 128
    gc[7:33, 22:48] = 255
    _save(root / "images" / "b.jpg", b)
    _save(root / "masks" / "b.png", gc)
    truth[_key(np.asarray(Image.open(root / "images" / "b.jpg").convert("RGB")))] = [gc == 255]
    c = _image(3)
    pal = np.zeros((H, W), np.uint8)
    pal[2:20, 2:20] = 1
    pal[25:45, 30:60] = 2
    _save(root / "images" / "c.png", c)
    _save(root / "masks" / "c.png", pal, palette=True)
    truth[_key(c)] = [pal == 1, pal == 2]
    _save(root / "images" / "d_missing_mask.png", _image(4))
    _save(root / "images" / "e_wrong_size.png", _image(5))
    _save(root / "masks" / "e_wrong_size.png", np.zeros((10, 10), np.uint8))
    _save(root / "images" / "f_empty.png", _image(6))
    _save(root / "masks" / "f_empty.png", np.zeros((H, W), np.uint8))
    (root / "images" / "g_corrupt.jpg").write_bytes(b"not a jpeg")
    _save(root / "masks" / "g_corrupt.png", np.zeros((H, W), np.uint8))
    _save(root / "masks" / "z_orphan.png", np.zeros((H, W), np.uint8))
    return root, truth


def test_mask_encodings(tmp_path):
    ids = np.zeros((H, W), np.uint8)
    ids[1:5, 1:5], ids[10:20, 10:20] = 7, 3
    _save(tmp_path / "ids.png", ids)
    objects = read_mask_objects(tmp_path / "ids.png", (H, W))
    assert [o.label for o in objects] == ["id 3", "id 7"]
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 255
    _save(tmp_path / "rgb.png", rgb)
    with pytest.raises(SamkitError, match="colour"):
        read_mask_objects(tmp_path / "rgb.png", (H, W))


def test_bad_items_are_reported_one_line_each_and_the_rest_is_evaluated(mask_folder, capsys):
    root, truth = mask_folder
    log = ErrorLog()
    [result] = run_points([open_dataset(root)], [OraclePredictor(truth)], log)
    assert result["images_evaluated"] == 3
    assert result["methods"]["oracle"]["objects"] == 4
    reasons = {e["item"]: e["error"] for e in log.entries}
    assert reasons.keys() == {"d_missing_mask", "e_wrong_size", "f_empty", "g_corrupt",
                              "z_orphan"}
    assert "no mask file" in reasons["d_missing_mask"]
    assert "10x10 but the image is 64x48" in reasons["e_wrong_size"]
    assert "no object pixels" in reasons["f_empty"]
    assert "not an image" in reasons["g_corrupt"]
    assert "has no image" in reasons["z_orphan"]
    skipped = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("samkit eval: skipped")]
    assert len(skipped) == 5


# ---------------------------------------------------------------------------- points
def test_oracle_scores_perfectly_and_empty_scores_zero(mask_folder):
    root, truth = mask_folder
    dataset = open_dataset(root)
    [result] = run_points([dataset], [OraclePredictor(truth), EmptyPredictor()], ErrorLog())
    oracle, empty = result["methods"]["oracle"], result["methods"]["empty"]
    assert oracle["miou"] == {k: 1.0 for k in ("1", "2", "3", "5", "9")}
    assert oracle["oracle_miou_1"] == oracle["box_miou"] == 1.0
    assert oracle["noc"] == {"85": 1.0, "90": 1.0}
    assert all(len(r["ious"]) == 1 for r in oracle["per_object"])  # no error left: stop
    assert empty["miou"] == {k: 0.0 for k in ("1", "2", "3", "5", "9")}
    assert empty["oracle_miou_1"] == empty["box_miou"] == 0.0
    assert empty["noc"] == {"85": 20.0, "90": 20.0}
    assert empty["noc_not_reached"] == {"85": 4, "90": 4}
    assert all(len(r["ious"]) == 20 for r in empty["per_object"])


class _Recorder(EmptyPredictor):
    """Empty masks, and a log of every batch it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int | None, bool, bool]] = []

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        clicks = None if prompts.points is None else prompts.points.shape[1]
        self.calls.append((len(prompts), clicks, multimask, prompts.mask_input is not None))
        return super().predict(prompts, multimask)


def test_objects_of_an_image_are_prompted_together_with_feedback():
    gts = [_square(2, 2, 10), _square(20, 30, 12)]
    recorder = _Recorder()
    runs = PointsEvaluator(recorder, max_clicks=4).evaluate(Sample("x", _image(0), objects=[
        _object(g) for g in gts]))
    assert len(runs) == 2
    assert recorder.calls == [
        (2, None, False, False),  # both boxes at once
        (2, 1, True, False),  # click 1 for both, multimask
        (2, 2, False, True), (2, 3, False, True), (2, 4, False, True),  # + previous logits
    ]


def _object(mask: np.ndarray):
    from samkit.data.masks import ObjectMask

    return ObjectMask(mask, None, "obj")


def test_grabcut_baseline_segments_an_easy_object():
    image = np.full((H, W, 3), 30, np.uint8)
    image += np.random.default_rng(0).integers(0, 20, image.shape, dtype=np.uint8)
    gt = _square(12, 20, 20)
    image[gt] = (220, 200, 40)
    runs = PointsEvaluator(GrabCutPredictor(), max_clicks=3).evaluate(
        Sample("easy", image, objects=[_object(gt)]))
    assert runs[0].box_iou > 0.9
    assert runs[0].ious[0] > 0.8


# ---------------------------------------------------------------------------- COCO
def _polygon(y0: int, x0: int, size: int) -> list[list[float]]:
    x1, y1 = x0 + size, y0 + size
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_folder(tmp_path):
    """Two good images (3 objects), one missing image file, one bad annotation."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    images, anns, truth = [], [], {}
    objects = {1: [(4, 4, 16), (24, 30, 20)], 2: [(10, 10, 30)]}
    for image_id, squares in objects.items():
        pixels = _image(image_id)
        _save(root / "images" / f"{image_id}.png", pixels)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": H, "width": W})
        masks = []
        for y0, x0, size in squares:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                         "segmentation": _polygon(y0, x0, size), "area": size * size,
                         "bbox": [x0, y0, size, size], "iscrowd": 0})
            masks.append(_square(y0, x0, size))
        truth[_key(pixels)] = masks
    images.append({"id": 3, "file_name": "3.png", "height": H, "width": W})  # no file
    anns.append({"id": 99, "image_id": 2, "category_id": 1, "segmentation": [[1, 2]],
                 "area": 0, "bbox": [1, 2, 0, 0], "iscrowd": 0})  # not a polygon
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    return root, truth


def _oracle_generator(truth):
    def generate(image):
        return [{"segmentation": g, "predicted_iou": 1.0, "stability_score": 1.0}
                for g in truth[_key(image)]]
    return generate


def test_proposals_oracle_recalls_everything_empty_nothing(coco_folder):
    root, truth = coco_folder
    log = ErrorLog()
    [result] = run_proposals([open_dataset(root)], [
        ("oracle", _oracle_generator(truth)), ("empty", lambda image: [])], log)
    oracle, empty = result["methods"]["oracle"], result["methods"]["empty"]
    assert oracle["images"] == 2 and oracle["AR@10"] == oracle["AR@1000"] == 1.0
    assert empty["AR@10"] == empty["AR@1000"] == 0.0
    assert {e["item"] for e in log.entries} == {"2.png", "3.png"}  # bad annotation, no file


def test_proposals_are_ranked_by_mean_score_and_capped():
    records = [{"segmentation": np.ones((4, 4), bool), "predicted_iou": i / 2000,
                "stability_score": float("nan") if i == 5 else 0.5} for i in range(1500)]
    proposals = image_proposals(records, image_id=7)
    assert len(proposals) == max(MAX_DETS)
    scores = [p["score"] for p in proposals]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx((1499 / 2000 + 0.5) / 2)


def test_instances_oracle_ap_is_one_and_empty_zero(coco_folder):
    root, truth = coco_folder
    [result] = run_instances([open_dataset(root)], [OraclePredictor(truth), EmptyPredictor()],
                             ErrorLog(), None, "det_x_iou")
    assert result["methods"]["oracle"]["AP"] == pytest.approx(1.0)
    assert result["methods"]["oracle"]["masks"] == 3
    assert result["methods"]["empty"]["AP"] == 0.0


def test_malformed_detections_are_reported_per_entry(coco_folder, tmp_path):
    root, truth = coco_folder
    entries = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [30, 24, 20, 20], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.7},
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 3], "score": 0.5},
        {"image_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": "high"},
        [1, 2, 3],
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(entries))
    log = ErrorLog()
    assert len(load_detections(path, log)) == 3
    assert [e["item"] for e in log.entries] == [f"entry {i}" for i in range(3, 8)]
    [result] = run_instances([open_dataset(root)], [OraclePredictor(truth)], ErrorLog(), path,
                             "det")
    assert result["methods"]["oracle"]["AP"] == pytest.approx(1.0)
    path.write_text("{not json")
    with pytest.raises(SamkitError, match="cannot read detections"):
        load_detections(path, ErrorLog())


def test_malformed_annotation_file_fails_only_its_dataset(tmp_path):
    root = tmp_path / "broken"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances.json").write_text('{"images": [}')
    with pytest.raises(SamkitError, match="cannot read COCO annotations"):
        open_dataset(root)
