"""``samkit everything``: output schema, resume, atomic writes under SIGKILL, sharding, bad
files, the SA-1B reader, and the Ray engine.

Most tests inject a fake generator (two rectangles per image) so they need no model; the
SIGKILL test runs the real CLI with the real ``samkit-tiny`` (random weights, a 4 x 4 grid,
thresholds 0 so masks come out) and doubles as the end-to-end test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samkit import cli
from samkit.data.sa1b import SA1BDataset, decode_masks
from samkit.errors import SamkitError
from samkit.everything import (
    GeneratorSpec,
    ImageItem,
    LoadedGenerator,
    collect_images,
    parse_shard,
    resolve_shard,
    run_everything,
    select_shard,
)
from samkit.rle import to_coco_rle

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TINY = REPO / "samkit" / "weights" / "samkit_tiny.safetensors"


class FakeGenerator:
    """Stands in for ``AutomaticMaskGenerator.generate``: two rectangles per image, as binary
    masks with numpy scalars (as a real generator may return), and a record of its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray) -> list[dict]:
        self.calls += 1
        h, w = image.shape[:2]
        records = []
        for x0, y0, x1, y1 in ((0, 0, w // 2, h // 2), (w // 3, h // 4, w, h)):
            mask = np.zeros((h, w), dtype=bool)
            mask[y0:y1, x0:x1] = True
            records.append({
                "segmentation": mask,
                "area": np.int64(mask.sum()),
                "bbox": [x0, y0, x1 - 1 - x0, y1 - 1 - y0],  # SAM's convention, see sam_bbox
                "predicted_iou": np.float32(0.9),
                "point_coords": [[float(x0), float(y0)]],
                "stability_score": 0.95,
                "crop_box": [0, 0, w, h],
            })
        return records


class FakeFactory:
    """A picklable :data:`GeneratorFactory` (Ray ships it to actors); counts its builds."""

    def __init__(self) -> None:
        self.generator = FakeGenerator()
        self.builds = 0

    def __call__(self) -> LoadedGenerator:
        self.builds += 1
        return LoadedGenerator(self.generator, "fake", trained=True)


def sam_bbox(mask: np.ndarray) -> list[float]:
    """XYWH as the official generator (and SA-1B) computes it: the far edge is the last mask
    pixel, so w and h are one less than pycocotools' ``toBbox``; an empty mask is all 0."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()),
            float(ys.max() - ys.min())]


def make_images(root: Path, rels: list[str], size: tuple[int, int] = (40, 56)) -> None:
    rng = np.random.default_rng(0)
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def make_bad_files(root: Path) -> None:
    """A text file named .jpg, a truncated JPEG, a 1x1 PNG, and a tiny PNG whose header
    claims 20000 x 20000."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "not_image.jpg").write_text("hello, I am text\n")
    make_images(root, ["whole.jpg"], size=(64, 64))
    data = (root / "whole.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (root / "whole.jpg").unlink()
    Image.new("RGB", (1, 1)).save(root / "one_pixel.png")
    Image.new("RGB", (16, 16)).save(root / "bomb.png")
    png = bytearray((root / "bomb.png").read_bytes())
    png[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width, height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # IHDR CRC
    (root / "bomb.png").write_bytes(bytes(png))


def outputs(outdir: Path) -> list[str]:
    return sorted(p.name for p in outdir.iterdir())


def items_of(root: Path, outdir: Path) -> list[ImageItem]:
    return collect_images(root, None, exclude=outdir)


# --- output format -------------------------------------------------------------------------


def test_json_schema_masks_and_sa1b_reader(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    make_images(images, ["a/x.png", "b/c/y.jpg", "z.png"])
    out.mkdir()
    factory = FakeFactory()
    summary = run_everything(items_of(images, out), out, factory)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, 0)
    assert outputs(out) == ["a%2Fx.png.json", "b%2Fc%2Fy.jpg.json", "z.png.json"]

    for path in out.iterdir():
        record = json.loads(path.read_text())
        assert set(record) == {"image", "annotations", "model"}
        assert set(record["image"]) == {"image_id", "file_name", "width", "height"}
        assert (record["image"]["width"], record["image"]["height"]) == (56, 40)
        assert record["model"] == {"name": "fake", "trained": True}
        assert [a["id"] for a in record["annotations"]] == [0, 1]
        for ann in record["annotations"]:
            assert set(ann) == {"id", "segmentation", "area", "bbox", "predicted_iou",
                                "point_coords", "stability_score", "crop_box"}
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["segmentation"]["size"] == [40, 56]
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.sum() == ann["area"]
            assert sam_bbox(mask) == ann["bbox"]

    dataset = SA1BDataset(out, image_dir=images)
    assert len(dataset) == 3
    names = [sample.image_path.relative_to(images).as_posix() for sample in dataset]
    assert names == ["a/x.png", "b/c/y.jpg", "z.png"]
    sample = dataset[2]
    assert sample.image_path.is_file() and (sample.width, sample.height) == (56, 40)
    masks = decode_masks(sample)
    assert masks.shape == (2, 40, 56) and masks.dtype == bool
    expected = FakeGenerator()(np.zeros((40, 56, 3), np.uint8))
    assert all((m == r["segmentation"]).all() for m, r in zip(masks, expected, strict=True))


def test_every_generator_output_mode_becomes_the_same_coco_rle():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    column_major = mask.T.reshape(-1)
    edges = np.flatnonzero(np.diff(column_major.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [column_major.size]])).tolist()
    uncompressed = {"size": [5, 7], "counts": runs}  # starts with a run of zeros, as here
    compressed = to_coco_rle(mask)
    assert isinstance(compressed["counts"], str)
    assert to_coco_rle(uncompressed) == compressed == to_coco_rle(compressed)
    assert (mask_utils.decode(compressed) == mask).all()


def test_sa1b_layout_and_empty_record(tmp_path):
    """SA-1B keeps image and JSON side by side; an image with no masks decodes to 0 x H x W."""
    record = {"image": {"image_id": 7, "file_name": "sa_7.jpg", "width": 5, "height": 3},
              "annotations": []}
    (tmp_path / "sa_7.json").write_text(json.dumps(record))
    (tmp_path / ".sa_8.json.123.ab.tmp").write_text("{")  # a writer's temp file: not a record
    sample = SA1BDataset(tmp_path)[0]
    assert sample.image_path == tmp_path / "sa_7.jpg" and sample.image_id == 7
    assert decode_masks(sample).shape == (0, 3, 5)
    (tmp_path / "sa_9.json").write_text("{not json")
    with pytest.raises(SamkitError, match="sa_9.json"):
        SA1BDataset(tmp_path)[1]


def test_an_empty_mask_in_a_written_file_decodes():
    """With its filters off segment-everything may keep an empty mask; the reader must take
    back what the writer wrote (the server still refuses an empty new annotation)."""
    from samkit.rle import encode_masks, parse_rle

    masks = np.zeros((2, 3, 5), dtype=bool)
    masks[1, 1:, 2:] = True
    annotations = encode_masks(masks)
    assert annotations[0]["area"] == 0
    record = {"image": {"image_id": 1, "file_name": "a.png", "width": 5, "height": 3},
              "annotations": annotations}
    assert (decode_masks(record) == masks).all()
    with pytest.raises(SamkitError, match="empty"):
        parse_rle(annotations[0]["segmentation"], 3, 5)


# --- resume ---------------------------------------------------------------------------------


def test_resume_skips_done_and_redoes_broken(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    make_images(images, ["p.png", "q.png", "r.png"])
    out.mkdir()
    run_everything(items_of(images, out), out, FakeFactory())

    again = FakeFactory()
    summary = run_everything(items_of(images, out), out, again)
    assert (summary.done, summary.skipped) == (0, 3)
    assert again.builds == 0  # nothing to do: the model is not even built

    (out / "q.png.json").write_text('{"image": {"image_id"')  # half a file, e.g. copied badly
    (out / ".r.png.json.999.0badc0de.tmp").write_text('{"image"')  # debris of a killed run
    (out / "r.png.json").unlink()
    redo = FakeFactory()
    summary = run_everything(items_of(images, out), out, redo)
    assert (summary.done, summary.skipped, summary.failed) == (2, 1, 0)
    assert redo.generator.calls == 2
    assert outputs(out) == ["p.png.json", "q.png.json", "r.png.json"]


def test_overlay_written_and_required_for_done(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    make_images(images, ["p.png"])
    out.mkdir()
    run_everything(items_of(images, out), out, FakeFactory())
    factory = FakeFactory()
    summary = run_everything(items_of(images, out), out, factory, overlay=True)
    assert summary.done == 1  # JSON alone is not done when an overlay is asked for
    overlay = np.asarray(Image.open(out / "p.png.overlay.png"))
    assert overlay.shape == (40, 56, 3)
    assert not (overlay == np.asarray(Image.open(images / "p.png"))).all()


class NoMaskFactory(FakeFactory):
    """A generator whose every mask failed the filters: it returns no records."""

    def __call__(self) -> LoadedGenerator:
        self.builds += 1
        return LoadedGenerator(lambda image: [], "fake", trained=True)


def test_overlay_of_an_image_without_masks_is_the_image(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    make_images(images, ["p.png", "q.png"])
    out.mkdir()
    summary = run_everything(items_of(images, out), out, NoMaskFactory(), overlay=True)
    assert (summary.done, summary.failed) == (2, 0)  # the run goes on past the first image
    for name in ("p.png", "q.png"):
        assert json.loads((out / f"{name}.json").read_text())["annotations"] == []
        overlay = np.asarray(Image.open(out / f"{name}.overlay.png"))
        assert (overlay == np.asarray(Image.open(images / name).convert("RGB"))).all()


def test_sigkill_then_resume_does_each_image_once(tmp_path):
    """Real CLI, real samkit-tiny: kill -9 mid-run, then rerun to the end."""
    images, out = tmp_path / "in", tmp_path / "out"
    rels = [f"img{i}.png" for i in range(6)]
    make_images(images, rels, size=(48, 64))
    command = [sys.executable, "-m", "samkit.cli", "everything", str(images), "-o", str(out),
               "--points-per-side", "4", "--pred-iou-thresh", "0",
               "--stability-score-thresh", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and any(out.glob("*.json"))):
            assert proc.poll() is None, "the run ended before the first JSON appeared"
            assert time.monotonic() < deadline, "no JSON within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    for name in first:  # whatever has a final name is complete
        json.loads((out / name).read_text())
    assert 1 <= len(first) < len(rels), "kill came too late to test anything"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    done = len(rels) - len(first)
    assert f"{done} done, {len(first)} skipped (already done), 0 failed" in rerun.stdout
    trained = BUNDLED_TINY.is_file()
    assert ("RANDOM weights" in rerun.stderr) != trained
    assert outputs(out) == sorted(f"{rel}.json" for rel in rels)  # and no temp files left
    assert {name: (out / name).stat().st_mtime_ns for name in first} == first

    for sample in SA1BDataset(out, image_dir=images):
        assert sample.record["model"] == {"name": "samkit-tiny", "trained": trained}
        masks = decode_masks(sample)
        assert masks.shape[1:] == (48, 64) and len(masks) > 0
        for mask, ann in zip(masks, sample.annotations, strict=True):
            assert mask.sum() == ann["area"]
            assert sam_bbox(mask) == pytest.approx(ann["bbox"])
            assert len(ann["crop_box"]) == 4 and len(ann["point_coords"]) == 1


# --- sharding ---------------------------------------------------------------------------------


def test_shards_cover_every_image_once(tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    make_images(images, [f"{i:02d}.png" for i in range(7)])
    out.mkdir()
    items = items_of(images, out)
    factories, produced = [FakeFactory(), FakeFactory()], []
    for index, factory in enumerate(factories):
        before = set(outputs(out))
        run_everything(select_shard(items, parse_shard(f"{index}/2")), out, factory)
        produced.append(set(outputs(out)) - before)
    assert produced[0].isdisjoint(produced[1])
    assert produced[0] | produced[1] == {f"{i:02d}.png.json" for i in range(7)}
    assert [f.generator.calls for f in factories] == [4, 3]


def test_shard_from_flag_or_torchrun_env():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert resolve_shard(None, torchrun) == (3, 4)
    assert resolve_shard("0/2", torchrun) == (0, 2)  # an explicit flag wins
    assert resolve_shard(None, {}) == (0, 1)
    for bad in ("2/2", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(SamkitError, match="shard"):
            parse_shard(bad)


# --- finding inputs and reporting bad ones -----------------------------------------------------


def test_collect_images_skips_outputs_hidden_and_non_images(tmp_path):
    make_images(tmp_path, ["a/b.png", "a%2Fb.png", ".hidden/c.png", "._d.png", "out/e.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    items = collect_images(tmp_path, None, exclude=tmp_path / "out")
    assert [i.rel for i in items] == ["a%2Fb.png", "a/b.png"]
    assert len({i.json_name for i in items}) == 2  # escaping keeps names apart
    assert [i.rel for i in collect_images(tmp_path, "*.txt", exclude=tmp_path / "out")] == [
        "notes.txt"]
    with pytest.raises(SamkitError, match="no images"):
        collect_images(tmp_path / "a", "*.jpg", exclude=tmp_path / "out")


def use_fake_generator(monkeypatch) -> FakeFactory:
    factory = FakeFactory()
    monkeypatch.setattr(GeneratorSpec, "__call__", lambda self: factory())
    return factory


def test_bad_files_in_folder_are_reported_and_skipped(tmp_path, monkeypatch, capsys):
    images, out = tmp_path / "in", tmp_path / "out"
    make_bad_files(images)
    make_images(images, ["good1.png", "sub/good2.jpg"])
    (images / "README.txt").write_text("not an image suffix: not an input")
    factory = use_fake_generator(monkeypatch)

    assert cli.main(["everything", str(images), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "2 done, 0 skipped (already done), 4 failed" in captured.out
    reported = [line for line in captured.err.splitlines() if line.startswith("samkit: skipped")]
    assert sorted(line.split()[2].rstrip(":") for line in reported) == [
        "bomb.png", "corrupt.jpg", "not_image.jpg", "one_pixel.png"]
    assert "decompression bomb" in captured.err and "8 px minimum" in captured.err
    assert outputs(out) == ["good1.png.json", "sub%2Fgood2.jpg.json"]
    assert factory.generator.calls == 2

    assert cli.main(["everything", str(images), "-o", str(out)]) == 1  # bad files stay bad
    assert "0 done, 2 skipped (already done), 4 failed" in capsys.readouterr().out


def test_torchrun_rank_takes_its_shard_and_exits_0(tmp_path, monkeypatch, capsys):
    """Under torchrun one rank's non-zero exit kills the others, so failures exit 0 there."""
    images, out = tmp_path / "in", tmp_path / "out"
    make_bad_files(images)  # sorted: bomb, corrupt, not_image, one_pixel; 1/2 takes 2nd and 4th
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    use_fake_generator(monkeypatch)
    assert cli.main(["everything", str(images), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "everything 1/2: 0 done, 0 skipped (already done), 2 failed" in captured.out
    assert "corrupt.jpg" in captured.err and "one_pixel.png" in captured.err
    assert "bomb.png" not in captured.err and "not_image.jpg" not in captured.err


def test_single_bad_image_is_one_error_line(tmp_path, monkeypatch, capsys):
    make_bad_files(tmp_path / "in")
    factory = use_fake_generator(monkeypatch)
    for name in ("corrupt.jpg", "one_pixel.png", "missing.png"):
        assert cli.main(["everything", str(tmp_path / "in" / name), "-o",
                         str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("samkit: error:"), err
    assert factory.builds == 0  # the image is checked before any model is built


# --- Ray engine ----------------------------------------------------------------------------------


def test_ray_engine_matches_local_engine(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from samkit.everything_ray import run_everything_ray

    images = tmp_path / "in"
    make_images(images, ["p.png", "sub/q.png"])
    (images / "bad.png").write_text("not a png")
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local_out.mkdir()
    ray_out.mkdir()
    items = items_of(images, local_out)
    run_everything(items, local_out, FakeFactory())

    # Actors cannot import this test module: ship the fake generator's code with it.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_everything_ray(items, ray_out, FakeFactory(), actors=1)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 1)
    assert outputs(ray_out) == outputs(local_out) == ["p.png.json", "sub%2Fq.png.json"]
    for name in outputs(ray_out):
        assert (ray_out / name).read_text() == (local_out / name).read_text()

    # Resuming needs no cluster at all: everything left is already done or bad.
    summary = run_everything_ray(items[1:], ray_out, FakeFactory())
    assert (summary.done, summary.skipped) == (0, 2)
    assert not ray.is_initialized()


def test_bf16_flag_reaches_the_generator_spec_and_its_predictor(tmp_path, monkeypatch):
    """``--bf16`` sets the spec (shipped to torchrun ranks / Ray actors as it is), and the
    spec builds a generator whose predictor embeds under bf16 autocast."""
    import torch

    specs = []
    monkeypatch.setattr(GeneratorSpec, "__call__",
                        lambda self: specs.append(self) or FakeFactory()())
    make_images(tmp_path / "in", ["a.png"])
    assert cli.main(["everything", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                     "--bf16"]) == 0
    assert [spec.bf16 for spec in specs] == [True]
    monkeypatch.undo()
    loaded = GeneratorSpec(model="samkit-tiny", device="cpu", bf16=True)()
    assert loaded.generate.__self__.predictor.encoder_dtype == torch.bfloat16
    assert GeneratorSpec(model="samkit-tiny", device="cpu")().generate.__self__.predictor \
        .encoder_dtype is None


def test_quality_filters_default_to_the_models_and_the_paper_is_one_flag_away():
    """``samkit everything`` (and ``engine auto``) filter with the registered model's
    measured thresholds; ``--paper-filters`` gives §7.3's 0.88 / 0.95; a threshold given on
    the command line wins over either."""
    from samkit.commands.arguments import generator_filters
    from samkit.registry import PAPER_FILTERS, EverythingFilters, get_config

    parser = cli.build_parser()

    def filters(*flags: str, model: str = "samkit-tiny") -> EverythingFilters:
        return generator_filters(parser.parse_args(["everything", "x.png", *flags]), model)

    assert filters() == get_config("samkit-tiny").everything_filters
    assert filters(model="vit_b") == PAPER_FILTERS == EverythingFilters(0.88, 0.95)
    assert filters("--paper-filters") == PAPER_FILTERS
    assert filters("--paper-filters", "--pred-iou-thresh", "0.5") == EverythingFilters(0.5, 0.95)
    own = get_config("samkit-tiny").everything_filters
    assert filters("--stability-score-thresh", "0") == EverythingFilters(own.pred_iou_thresh, 0.0)
    auto = parser.parse_args(["engine", "auto", "proj"])
    assert generator_filters(auto, "samkit-tiny") == own
