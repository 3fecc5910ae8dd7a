"""Generated bad input (Hypothesis): image files and arrays, prompts, client RLEs.

The only allowed outcomes are a correct result or samkit's own one-line :class:`SamkitError`;
any other exception fails the test. The examples are derandomised (the same cases every run)
and bounded for CI: ``SAMKIT_FUZZ_SCALE`` multiplies every count (``python
benchmarks/fuzz.py`` runs 20x as many).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from samkit.errors import SamkitError
from samkit.images import load_image, to_rgb_uint8
from samkit.prompts import check_boxes, check_points
from samkit.rle import decode_rle, parse_rle

SCALE = float(os.environ.get("SAMKIT_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def one_line(err: SamkitError) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text


# ------------------------------------------------------------------------------ image files
def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


small_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24),
                                              st.just(3)))
corruptions = st.sampled_from(["as is", "truncate", "flip bits", "garbage tail"])


@fuzz(240)
@given(image=small_images, fmt=st.sampled_from(["PNG", "JPEG", "TIFF", "WEBP", "BMP"]),
       corruption=corruptions, where=st.floats(0, 1), seed=st.integers(0, 2**16))
# Found by the larger run: a flipped chunk name makes Pillow raise SyntaxError.
@example(image=np.zeros((1, 1, 3), np.uint8), fmt="PNG", corruption="flip bits", where=0.0,
         seed=14711)
def test_corrupted_image_files(tmp_path: Path, image: np.ndarray, fmt: str, corruption: str,
                               where: float, seed: int) -> None:
    data = bytearray(encoded(image, fmt))
    cut = int(where * len(data))
    if corruption == "truncate":
        data = data[:cut]
    elif corruption == "flip bits":
        rng = np.random.default_rng(seed)
        for index in rng.integers(0, len(data), 1 + len(data) // 50):
            data[index] ^= 1 << int(rng.integers(0, 8))
    elif corruption == "garbage tail":
        data += np.random.default_rng(seed).bytes(64)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(bytes(data))
    try:
        out = load_image(path)
    except SamkitError as err:
        one_line(err)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if corruption == "as is" and fmt in ("PNG", "TIFF", "BMP"):  # lossless formats
        np.testing.assert_array_equal(out, image)


@fuzz(60)
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_an_image_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.png"
    path.write_bytes(data)
    try:
        out = load_image(path)
    except SamkitError as err:
        one_line(err)
    else:
        assert out.dtype == np.uint8 and out.shape[2] == 3


@fuzz(20)
@given(width=st.integers(12_000, 2**31 - 1), height=st.integers(12_000, 2**31 - 1))
def test_absurd_header_sizes_are_refused_before_decoding(tmp_path: Path, width: int,
                                                         height: int) -> None:
    """A PNG whose header claims a huge size (and holds almost no data): refused from the
    header, at no memory cost."""
    png = bytearray(encoded(np.zeros((1, 1, 3), np.uint8), "PNG"))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR width, height
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(png))
    with pytest.raises(SamkitError) as err:
        load_image(path)
    one_line(err.value)


@fuzz(40)
@given(mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16",
                             "F", "HSV", "LAB"]),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_every_pil_mode(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    path = tmp_path / "mode.tiff"
    try:
        Image.new(mode, size).save(path)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store
        return
    out = load_image(path)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8


# ------------------------------------------------------------------------------ image arrays
array_dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16,
                                np.float32, np.float64, np.bool_, np.complex64])


@fuzz(160)
@given(array=hnp.arrays(array_dtypes, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0,
                                                       max_side=6)))
def test_arrays_of_any_dtype_and_shape(array: np.ndarray) -> None:
    try:
        out = to_rgb_uint8(array)
    except SamkitError as err:
        one_line(err)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[:2] == array.shape[:2]


# ---------------------------------------------------------------------------------- prompts
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.integers(-10**12, 10**12))
ragged = st.lists(st.lists(numbers, max_size=5), max_size=5)


@fuzz(200)
@given(coords=st.one_of(ragged, hnp.arrays(st.sampled_from([np.float32, np.int64, np.bool_]),
                                             hnp.array_shapes(min_dims=0, max_dims=4,
                                                              min_side=0, max_side=4))),
       labels=st.one_of(st.lists(st.integers(-3, 3), max_size=5), ragged),
       batched=st.booleans())
def test_generated_points(coords, labels, batched: bool) -> None:
    try:
        points, point_labels = check_points(coords, labels, batched=batched)
    except SamkitError as err:
        one_line(err)
        return
    assert points.shape[-1] == 2 and points.ndim == (3 if batched else 2)
    assert np.isfinite(points).all() and set(np.unique(point_labels)) <= {-1, 0, 1}


@fuzz(120)
@given(boxes=st.one_of(ragged, st.lists(numbers, max_size=6)))
def test_generated_boxes(boxes) -> None:
    try:
        out = check_boxes(boxes)
    except SamkitError as err:
        one_line(err)
        return
    assert out.shape[-1] == 4 and np.isfinite(out).all()
    assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()


# ------------------------------------------------------------------------------ client RLEs
@fuzz(200)
@given(counts=st.one_of(st.text(max_size=40),
                        st.text(alphabet=[chr(c) for c in range(48, 112)], max_size=40)),
       height=st.integers(1, 12), width=st.integers(1, 12))
def test_generated_rle_strings(counts: str, height: int, width: int) -> None:
    """parse_rle stands between a client and pycocotools' unchecked decoder: anything it
    accepts decodes to a non-empty mask of the image's size."""
    try:
        parsed = parse_rle({"size": [height, width], "counts": counts}, height, width)
    except SamkitError as err:
        one_line(err)
        return
    mask = decode_rle(parsed["segmentation"])
    assert mask.shape == (height, width) and mask.sum() == parsed["area"] > 0


# ---------------------------------------------------------------------- through the predictor
@pytest.fixture(scope="module")
def predictor():
    from samkit import SamPredictor, build_sam

    predictor = SamPredictor(build_sam("samkit-tiny"))
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    return predictor


coordinates = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([np.nan, np.inf, -0.0]))


@fuzz(80)
@given(n=st.integers(0, 6), big=st.booleans(), data=st.data())
def test_generated_prompts_through_the_predictor(predictor, n: int, big: bool, data) -> None:
    """Points anywhere (off the image, huge, NaN), up to 10,000 of them, boxes of any order,
    mask inputs of the wrong shape: masks of the image's size or a one-line error."""
    count = 10_000 if big else n
    coords = np.array(data.draw(st.lists(st.tuples(coordinates, coordinates), min_size=n,
                                         max_size=n)), np.float64).reshape(-1, 2)
    if big:
        coords = np.resize(np.nan_to_num(coords, nan=5.0, posinf=5.0, neginf=5.0) if n else
                           np.full((1, 2), 5.0), (count, 2))
    # Labels from a short drawn pattern, repeated: mostly valid, now and then -1 or 2, and
    # sometimes one too many.
    pattern = data.draw(st.lists(st.integers(-1, 2), min_size=1, max_size=4))
    labels = np.resize(np.array(pattern), len(coords) + data.draw(st.sampled_from([0, 0, 1])))
    box = data.draw(st.none() | st.lists(coordinates, min_size=3, max_size=5).map(np.array))
    mask_input = data.draw(st.none() | st.sampled_from([(1, 128, 128), (1, 64, 64), (128, 128)])
                           .map(lambda shape: np.zeros(shape, np.float32)))
    kwargs = {"box": box, "mask_input": mask_input}
    if len(coords) or data.draw(st.booleans()):
        kwargs |= {"point_coords": coords, "point_labels": labels}
    try:
        masks, scores, low_res = predictor.predict(**kwargs)
    except SamkitError as err:
        one_line(err)
        return
    assert not big, "10,000 points must be refused (the decoder would need 25 GB)"
    assert masks.shape[1:] == (60, 80) and len(scores) == len(masks) == len(low_res)
