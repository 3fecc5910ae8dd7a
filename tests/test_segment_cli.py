"""Tests for ``samkit segment`` and :mod:`samkit.overlay`.

End-to-end runs use the default ``samkit-tiny`` model (512 px, embeds in well under a second).
Until its weights ship it is randomly initialised, so these tests check the plumbing (files,
shapes, RLE, error handling), never mask quality.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from samkit import cli, loading
from samkit import prompts as prompts_module
from samkit.build import build_sam, save_checkpoint
from samkit.commands import segment
from samkit.errors import SamkitError
from samkit.overlay import BANNER_RGB, draw_overlay, palette, save_png
from samkit.weights import cached_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GRABCUT_IMAGES = SHARED / "data" / "grabcut" / "images"
COCO_IMAGES = SHARED / "data" / "coco_mval" / "images"


def _first_jpeg(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"shared test photos not found at {folder} (needs the ../shared checkout)")
    return sorted(folder.glob("*.jpg"))[0]


@pytest.fixture
def grabcut_photo() -> Path:
    return _first_jpeg(GRABCUT_IMAGES)


@pytest.fixture
def coco_photo() -> Path:
    return _first_jpeg(COCO_IMAGES)


@pytest.fixture(autouse=True)
def empty_weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never look at (or depend on) the user's real checkpoint cache."""
    cache = tmp_path / "weights-cache"
    monkeypatch.setenv("SAMKIT_CACHE", str(cache))
    return cache


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``samkit ARGV`` in-process; returns (exit code, stdout, stderr)."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("samkit: error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def check_outputs(out_dir: Path, image_path: Path) -> dict:
    """Every output exists and agrees with the image and with the others; returns the JSON."""
    with Image.open(image_path) as im:
        width, height = im.size
    result = json.loads((out_dir / "result.json").read_text())
    assert result["image"] == {"path": str(image_path.resolve()), "width": width, "height": height}
    for record in result["masks"]:
        png = read_png(out_dir / record["file"])
        assert png.shape == (height, width) and png.dtype == np.uint8
        assert set(np.unique(png)) <= {0, 255}
        rle = dict(record["segmentation"], counts=record["segmentation"]["counts"].encode())
        decoded = mask_utils.decode(rle).astype(bool)
        np.testing.assert_array_equal(decoded, png > 0)
        assert record["area"] == int(decoded.sum())
        assert len(record["bbox"]) == 4
    best = result["masks"][result["best_index"]]
    assert best["score"] == max(m["score"] for m in result["masks"])
    np.testing.assert_array_equal(read_png(out_dir / "mask.png"), read_png(out_dir / best["file"]))
    overlay = read_png(out_dir / "overlay.png")
    assert overlay.shape == (height, width, 3) and overlay.dtype == np.uint8
    # An untrained model's overlay says so in a red strip across the top; a trained one's not.
    assert (overlay[0] == BANNER_RGB).all() == (not result["trained"])
    return result


BUNDLED_TINY = REPO / "samkit" / "weights" / "samkit_tiny.safetensors"


# --- end to end ---------------------------------------------------------------------------


def test_single_point_gives_three_masks_and_loud_untrained_warning(
    grabcut_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("samkit.build.BUNDLED_WEIGHTS_DIR", tmp_path / "no-weights")
    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        ["segment", str(grabcut_photo), "--point", "120,100", "-o", str(out_dir)], capsys
    )
    assert code == 0, err
    result = check_outputs(out_dir, grabcut_photo)
    assert result["multimask"] is True and len(result["masks"]) == 3
    assert result["trained"] is False and result["model"] == "samkit-tiny"
    assert result["checkpoint"] is None
    assert result["prompts"] == {"points": [[120.0, 100.0]], "labels": [1], "box": None}
    assert "WARNING" in err and "RANDOM" in err
    assert str(out_dir / "mask.png") in out and "best" in out


def test_bf16_flag_runs_the_encoder_in_bf16_and_says_so(
    grabcut_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from samkit import predictor

    dtypes = []
    encode = predictor.SamPredictor._encode
    monkeypatch.setattr(predictor.SamPredictor, "_encode",
                        lambda self, images: dtypes.append(self.encoder_dtype) or encode(self, images))
    for flags, dtype in (([], "float32"), (["--bf16"], "bfloat16")):
        out_dir = tmp_path / dtype
        code, _, err = run_cli(["segment", str(grabcut_photo), "--point", "120,100", "-o",
                                str(out_dir), *flags], capsys)
        assert code == 0, err
        assert check_outputs(out_dir, grabcut_photo)["encoder_dtype"] == dtype
    assert dtypes == [None, torch.bfloat16]


def test_box_with_points_gives_one_mask(
    coco_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    argv = ["segment", str(coco_photo), "--box", "50,60,300,280", "--point", "150,150",
            "--point", "60.5,70,0", "-o", str(out_dir)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    result = check_outputs(out_dir, coco_photo)
    assert result["multimask"] is False and len(result["masks"]) == 1
    assert result["prompts"] == {
        "points": [[150.0, 150.0], [60.5, 70.0]],
        "labels": [1, 0],
        "box": [50.0, 60.0, 300.0, 280.0],
    }


def test_single_flag_and_default_output_dir(
    grabcut_photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["segment", str(grabcut_photo), "--box", "10,10,200,150", "--single"],
                           capsys)
    assert code == 0, err
    result = check_outputs(tmp_path / "samkit_out" / grabcut_photo.stem, grabcut_photo)
    assert result["multimask"] is False and len(result["masks"]) == 1


def test_checkpoint_flag_loads_trained_weights(
    grabcut_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_checkpoint(build_sam("samkit-tiny"), tmp_path / "tiny.safetensors")
    out_dir = tmp_path / "out"
    argv = ["segment", str(grabcut_photo), "--point", "5,5", "--checkpoint", str(checkpoint),
            "-o", str(out_dir)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    result = check_outputs(out_dir, grabcut_photo)
    assert result["trained"] is True and result["checkpoint"] == str(checkpoint.resolve())
    assert "WARNING" not in err


def _write_variant(photo: Path, folder: Path, kind: str) -> Path:
    """The photo re-saved as a grayscale, RGBA or 16-bit grayscale PNG."""
    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    path = folder / f"{kind}.png"
    if kind == "gray":
        rgb.convert("L").save(path)
    elif kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path)
    else:
        gray16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray16).save(path)
    return path


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16"])
def test_grayscale_rgba_and_16bit_inputs(
    kind: str, grabcut_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path = _write_variant(grabcut_photo, tmp_path, kind)
    if kind == "gray16":
        with Image.open(image_path) as im:
            assert im.mode.startswith("I"), im.mode  # really 16-bit on disk
    out_dir = tmp_path / "out"
    code, _, err = run_cli(
        ["segment", str(image_path), "--point", "100,100", "--single", "-o", str(out_dir)], capsys
    )
    assert code == 0, err
    check_outputs(out_dir, image_path)


def test_real_subprocess_success_and_failure(grabcut_photo: Path, tmp_path: Path) -> None:
    def samkit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "samkit.cli", "segment", *args],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )

    out_dir = tmp_path / "out"
    ok = samkit(str(grabcut_photo), "--point", "50,60", "-o", str(out_dir))
    assert ok.returncode == 0, ok.stderr
    if BUNDLED_TINY.is_file():  # the shipped default model: nothing to warn about
        assert ok.stderr == ""
        assert json.loads((out_dir / "result.json").read_text())["trained"] is True
    else:
        assert len(ok.stderr.strip().splitlines()) == 1  # just the untrained warning
        assert ok.stderr.startswith("WARNING: model 'samkit-tiny' has no trained weights")
    assert "Traceback" not in ok.stderr
    check_outputs(out_dir, grabcut_photo)

    bad = samkit(str(grabcut_photo), "--point", "50,60,2")
    assert bad.returncode == 2
    assert_one_error_line(bad.stderr, "label must be 1 (foreground) or 0 (background)")
    assert bad.stdout == ""


# --- bad input ----------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height``: a decompression bomb in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def bad_files(tmp_path: Path, grabcut_photo: Path) -> dict[str, Path]:
    """Broken inputs on disk, by name."""
    files = {
        "empty": tmp_path / "empty.jpg",
        "text": tmp_path / "notes.png",
        "truncated": tmp_path / "truncated.jpg",
        "bomb": tmp_path / "bomb.png",
        "corrupt_ckpt": tmp_path / "corrupt.pth",
        "a_file": tmp_path / "a_file",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    photo_bytes = grabcut_photo.read_bytes()
    files["truncated"].write_bytes(photo_bytes[: len(photo_bytes) // 2])
    files["bomb"].write_bytes(_png_header_only(20_000, 20_000))
    files["corrupt_ckpt"].write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    files["a_file"].write_text("a regular file where a folder is wanted")
    return files


# (case id, argv after "segment" built from the photo and bad_files, expected message part)
BAD_INPUTS: list[tuple[str, Callable[[str, dict[str, Path]], list[str]], str]] = [
    ("missing image", lambda p, f: [p + ".nope", "--point", "1,1"], "image not found"),
    ("not an image", lambda p, f: [str(f["text"]), "--point", "1,1"], "not an image"),
    ("truncated jpeg", lambda p, f: [str(f["truncated"]), "--point", "1,1"], "cannot decode"),
    ("empty file", lambda p, f: [str(f["empty"]), "--point", "1,1"], "empty (0 bytes)"),
    ("decompression bomb", lambda p, f: [str(f["bomb"]), "--point", "1,1"], "decompression bomb"),
    ("point outside x", lambda p, f: [p, "--point", "5000,10"], "outside the 481x321 image"),
    ("point outside y", lambda p, f: [p, "--point", "10,321"], "outside the 481x321 image"),
    ("point negative", lambda p, f: [p, "--point=-1,10"], "outside the 481x321 image"),
    ("point one number", lambda p, f: [p, "--point", "12"], "expected x,y[,label]"),
    ("point not numbers", lambda p, f: [p, "--point", "a,b"], "'a' is not a number"),
    ("point nan", lambda p, f: [p, "--point", "nan,3"], "must be finite"),
    ("point bad label", lambda p, f: [p, "--point", "1,2,7"], "label must be 1"),
    ("point too long", lambda p, f: [p, "--point", "1,2,1,1"], "expected x,y[,label]"),
    ("box three numbers", lambda p, f: [p, "--box", "1,2,3"], "expected x0,y0,x1,y1"),
    ("box not numbers", lambda p, f: [p, "--box", "a,0,10,10"], "'a' is not a number"),
    ("box x1 < x0", lambda p, f: [p, "--box", "100,10,50,80"], "need x1 > x0 and y1 > y0"),
    ("box y1 < y0", lambda p, f: [p, "--box", "10,100,50,80"], "need x1 > x0 and y1 > y0"),
    ("box outside", lambda p, f: [p, "--box", "10,10,600,80"], "not inside the 481x321"),
    ("two boxes", lambda p, f: [p, "--box", "1,1,9,9", "--box", "2,2,8,8"], "only one --box"),
    ("no prompt", lambda p, f: [p], "no prompt given"),
    ("unknown model", lambda p, f: [p, "--point", "1,1", "--model", "vit_z"], "unknown model"),
    ("official not fetched", lambda p, f: [p, "--point", "1,1", "--model", "vit_b"],
     "run: samkit weights fetch vit_b, or pass --checkpoint"),
    ("missing checkpoint", lambda p, f: [p, "--point", "1,1", "--checkpoint", p + ".pth"],
     "checkpoint not found"),
    ("unwritable output", lambda p, f: [p, "--point", "1,1", "-o", str(f["a_file"] / "sub")],
     "cannot write to output folder"),
    ("bad device", lambda p, f: [p, "--point", "1,1", "--device", "tpu"], "unknown --device"),
    ("bad cuda index", lambda p, f: [p, "--point", "1,1", "--device", "cuda:x"],
     "unknown --device"),
]


@pytest.mark.parametrize(
    ("make_argv", "expected"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_exit_2_before_the_model_is_built(
    make_argv: Callable[[str, dict[str, Path]], list[str]],
    expected: str,
    grabcut_photo: Path,
    bad_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def must_not_build(*_: object) -> None:
        raise AssertionError("the model was built before the input was validated")

    monkeypatch.setattr(segment, "build_model", must_not_build)
    code, out, err = run_cli(["segment", *make_argv(str(grabcut_photo), bad_files)], capsys)
    assert code == 2
    assert_one_error_line(err, expected)
    assert out == ""


def test_corrupt_checkpoint_is_one_line(
    grabcut_photo: Path, bad_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_dir = tmp_path / "out"
    argv = ["segment", str(grabcut_photo), "--point", "1,1", "--checkpoint",
            str(bad_files["corrupt_ckpt"]), "-o", str(out_dir)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "is not a PyTorch/safetensors checkpoint")
    assert not (out_dir / "result.json").exists()


def test_fetched_official_weights_are_found_in_the_cache(empty_weights_cache: Path) -> None:
    path = cached_path("vit_t")
    assert path.parent == empty_weights_cache
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in; loading is build_sam's job and tested there")
    assert loading.resolve_model("vit_t", None) == loading.ModelChoice("vit_t", path)


@pytest.mark.parametrize(
    ("points", "box", "single", "expected"),
    [
        (["1,1"], [], False, True),
        (["1,1", "2,2"], [], False, False),
        ([], ["0,0,5,5"], False, True),
        (["1,1"], ["0,0,5,5"], False, False),
        (["1,1"], [], True, False),
        ([], ["0,0,5,5"], True, False),
    ],
)
def test_multimask_only_for_a_lone_point_or_a_lone_box(
    points: list[str], box: list[str], single: bool, expected: bool
) -> None:
    prompts = prompts_module.parse_prompts(points, box)
    assert prompts_module.wants_multimask(prompts, single=single) is expected


# --- overlay ------------------------------------------------------------------------------


def _square_scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    masks = np.zeros((2, 120, 160), dtype=bool)
    masks[0, 20:60, 20:60] = True
    masks[1, 70:110, 90:150] = True
    return image, masks


def test_overlay_shape_dtype_and_input_untouched() -> None:
    image, masks = _square_scene()
    before = image.copy()
    out = draw_overlay(
        image, masks, points=np.array([[40, 40]]), boxes=np.array([[10, 10, 70, 70]])
    )
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)


def test_overlay_tints_masked_pixels_and_leaves_the_rest() -> None:
    image, masks = _square_scene()
    out = draw_overlay(image, masks, alpha=0.5)
    colours = palette(2)
    for i, (y0, y1, x0, x1) in enumerate([(25, 55, 25, 55), (75, 105, 95, 145)]):
        inner = (slice(y0, y1), slice(x0, x1))  # well inside the mask, away from its outline
        expected = np.round(image[inner] * 0.5 + colours[i] * 0.5).astype(np.uint8)
        np.testing.assert_allclose(out[inner], expected, atol=1)
    far = np.ones(image.shape[:2], bool)
    far[15:65, 15:65] = False
    far[65:115, 85:155] = False
    np.testing.assert_array_equal(out[far], image[far])


def test_overlay_draws_outline_points_and_boxes() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    masks = np.zeros((1, 100, 100), dtype=bool)
    masks[0, 30:70, 30:70] = True
    out = draw_overlay(image, masks, points=np.array([[10, 10], [90, 90]]),
                       labels=np.array([1, 0]), boxes=np.array([[5, 40, 20, 60]]), alpha=0.0)
    np.testing.assert_array_equal(out[30, 50], palette(1)[0])  # opaque outline, even at alpha 0
    np.testing.assert_array_equal(out[50, 50], 0)  # alpha 0: interior untouched
    assert out[10, 10, 1] > 150 and out[10, 10, 0] < 50  # foreground point is green
    assert out[90, 90, 0] > 150 and out[90, 90, 1] < 50  # background point is red
    assert (out[50, 5] > 0).any()  # box edge


def test_palette_is_deterministic_and_distinct() -> None:
    colours = palette(12)
    np.testing.assert_array_equal(colours, palette(12))
    assert len({tuple(c) for c in colours}) == 12
    assert not np.array_equal(palette(3, seed=1), palette(3, seed=0))


def test_overlay_rejects_mismatched_masks() -> None:
    image, _ = _square_scene()
    with pytest.raises(SamkitError, match="masks must be N x 120 x 160"):
        draw_overlay(image, np.zeros((1, 10, 10), bool))


def test_save_png_round_trips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    image, masks = _square_scene()
    save_png(tmp_path / "mask.png", masks[0])
    save_png(tmp_path / "gray.png", image[..., 0])
    save_png(tmp_path / "rgb.png", image)
    np.testing.assert_array_equal(read_png(tmp_path / "mask.png"), masks[0].astype(np.uint8) * 255)
    np.testing.assert_array_equal(read_png(tmp_path / "gray.png"), image[..., 0])
    np.testing.assert_array_equal(read_png(tmp_path / "rgb.png"), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.png", "mask.png", "rgb.png"]
    with pytest.raises(SamkitError, match="cannot write"):
        save_png(tmp_path / "missing" / "x.png", image)
    with pytest.raises(SamkitError, match="save_png takes"):
        save_png(tmp_path / "float.png", image.astype(np.float32))
