"""Training data: the three source formats, large-scale jitter, mask filtering, copy-paste,
batching and the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from samkit.errors import SamkitError
from samkit.images import preprocess_shape
from samkit.train.data import (
    AugmentConfig,
    CocoSource,
    FolderSource,
    ResumableSampler,
    SA1BSource,
    TrainDataset,
    collate,
    copy_paste,
    large_scale_jitter,
    open_source,
    select_masks,
)

SHARED_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train"


def write_folder(root: Path, masks: list[np.ndarray], size: tuple[int, int] = (30, 40)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, m in enumerate(masks):
        image = np.zeros((*size, 3), np.uint8)
        image[m > 0] = 200
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    return root


def test_training_and_evaluation_read_a_mask_folder_alike(tmp_path: Path) -> None:
    """One mask rule (samkit.data.masks): a 0/255 mask, GrabCut's 0/128/255 (the 128 band is
    not object), an id map and a palette PNG with 255 = void give training exactly the
    objects evaluation scores."""
    from samkit.eval.datasets import open_dataset

    binary = np.zeros((30, 40), np.uint8)
    binary[2:10, 3:20] = 255
    grabcut = binary.copy()
    grabcut[10:12, 3:20] = 128
    ids = np.zeros((30, 40), np.uint8)
    ids[2:10, 3:20], ids[15:25, 5:35] = 1, 7
    root = write_folder(tmp_path / "d", [binary, grabcut, ids])
    palette = Image.fromarray(np.where(ids == 7, 255, ids).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette.save(root / "masks" / "im3.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / "im3.png")
    source = FolderSource(root)
    dataset = open_dataset(root)
    counts = []
    for index, item in enumerate(dataset.items):
        _, masks = source.load(index)
        expected = [o.mask for o in item.load().objects]
        assert len(masks) == len(expected)
        assert all(np.array_equal(m, e) for m, e in zip(masks, expected, strict=True))
        counts.append(len(masks))
    assert counts == [1, 1, 2, 1]  # the 128 band and the palette's void are not objects


def test_folder_source(tmp_path: Path) -> None:
    ids = np.zeros((30, 40), np.uint8)
    ids[2:10, 3:20] = 1
    ids[15:25, 5:35] = 7
    root = write_folder(tmp_path / "d", [ids, (ids == 1).astype(np.uint8) * 255])
    source = open_source(str(root))
    assert isinstance(source, FolderSource) and len(source) == 2
    image, masks = source.load(0)
    assert image.shape == (30, 40, 3) and masks.shape == (2, 30, 40)
    assert source.load(1)[1].shape == (1, 30, 40)
    with pytest.raises(SamkitError, match="images/ and masks/"):
        FolderSource(tmp_path)


def test_coco_source_skips_crowd(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.jpg")
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "area": 100,
             "bbox": [2, 2, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[15, 5, 25, 5, 25, 15]],
             "area": 50, "bbox": [15, 5, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "area": 600, "bbox": [0, 0, 30, 20],
             "segmentation": {"size": [20, 30], "counts": [0, 600]}, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    source = open_source(f"coco:{tmp_path / 'ann.json'}:{tmp_path}")
    assert isinstance(source, CocoSource) and len(source) == 1
    image, masks = source.load(0)
    assert image.shape == (20, 30, 3) and masks.shape == (2, 20, 30)


def test_sa1b_source(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "sa_1.jpg")
    m = np.zeros((16, 24), np.uint8)
    m[3:9, 4:14] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    record = {"image": {"image_id": 1, "file_name": "sa_1.jpg", "width": 24, "height": 16},
              "annotations": [{"id": 1, "segmentation": rle, "area": int(m.sum()),
                               "bbox": [4, 3, 10, 6]}]}
    (tmp_path / "sa_1.json").write_text(json.dumps(record))
    source = open_source(str(tmp_path))
    assert isinstance(source, SA1BSource)
    image, masks = source.load(0)
    assert image.shape == (16, 24, 3) and np.array_equal(masks[0], m.astype(bool))


def test_jitter_scale_1_is_the_inference_resize_and_masks_stay_aligned() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, (60, 80, 3)).astype(np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 10:40, 20:50] = True
    image[masks[0]] = 250
    out_image, out_masks = large_scale_jitter(image, masks, 64, 1.0, (0.5, 0.5), flip=False)
    assert out_image.shape[:2] == preprocess_shape(60, 80, 64) == out_masks.shape[1:]
    for scale, flip in ((2.0, True), (0.3, False), (1.3, True)):
        img, m = large_scale_jitter(image, masks, 64, scale, (0.3, 0.7), flip)
        assert img.shape[0] <= 64 and img.shape[1] <= 64 and m.shape[1:] == img.shape[:2]
        inside = img[m[0]][:, 0]  # bright where the mask is, except the resampled border
        assert (inside > 150).mean() > 0.9
    big, _ = large_scale_jitter(image, masks, 64, 2.0, (0.0, 0.0), flip=False)
    assert big.shape[:2] == (64, 64)  # 96 x 128 cropped to the input square


def test_select_masks_drops_huge_and_tiny_and_caps_the_count() -> None:
    masks = np.zeros((5, 10, 10), bool)
    masks[0] = True  # 100% of the image
    masks[1, :2, :2] = True  # 4 px: tiny
    masks[2, :5] = True
    masks[3, 5:] = True
    masks[4, :, :3] = True
    rng = np.random.default_rng(0)
    kept = select_masks(masks, rng, max_masks=64, min_area=5, max_fraction=0.9)
    assert len(kept) == 3
    assert len(select_masks(masks, rng, max_masks=2, min_area=5, max_fraction=0.9)) == 2


def test_copy_paste_occludes_existing_masks() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :, :5] = True
    other = np.full((8, 8, 3), 255, np.uint8)
    other_masks = np.zeros((1, 8, 8), bool)
    other_masks[0, :, 3:7] = True
    out, out_masks = copy_paste(image, masks, other, other_masks, np.random.default_rng(0))
    assert out_masks.shape == (2, 10, 10)
    assert not (out_masks[0] & out_masks[1]).any()
    assert (out[out_masks[1]] == 255).all() and out_masks[0].sum() == 50 - 8 * 2


def test_dataset_is_deterministic_per_epoch_and_index(tmp_path: Path) -> None:
    ids = np.zeros((30, 40), np.uint8)
    ids[2:20, 3:30] = 1
    ids[20:28, 5:35] = 2
    root = write_folder(tmp_path / "d", [ids, ids])
    ds = TrainDataset([open_source(str(root))], AugmentConfig(64, copy_paste=True, min_mask_area=4),
                      seed=3)
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.prompt_seed == b.prompt_seed != ds[(1, 1)].prompt_seed
    batch = collate([ds[(0, 0)], a], 64)
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.uint8
    h, w = batch.sizes[1].tolist()
    assert batch.masks[1].shape[1:] == (h, w)
    assert batch.images[1, :, h:].sum() == 0 and batch.images[1, :, :, w:].sum() == 0


def test_sampler_shards_and_resumes_mid_epoch() -> None:
    data = list(range(10))
    full = list(ResumableSampler(data, 1, 0, seed=0, batch_size=2))
    assert sorted(i for _, i in full) == data and all(e == 0 for e, _ in full)
    ranks = [list(ResumableSampler(data, 2, r, seed=0, batch_size=1)) for r in (0, 1)]
    assert sorted(i for part in ranks for _, i in part) == data
    # Global batch t of 1 process x batch 2 == batch t of rank 0 + rank 1 with batch 1.
    assert [set(full[2 * t: 2 * t + 2]) for t in range(5)] == \
        [{ranks[0][t], ranks[1][t]} for t in range(5)]
    resumed = ResumableSampler(data, 1, 0, seed=0, batch_size=2)
    resumed.set_position(epoch=0, batches_done=3)
    assert list(resumed) == full[6:] and len(resumed) == 4
    resumed.set_position(epoch=1, batches_done=0)
    assert [e for e, _ in resumed] == [1] * 10 and [i for _, i in resumed] != [i for _, i in full]


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared training data not present")
def test_every_shared_training_image_gives_a_sample() -> None:
    """Each image of each folder once, as a run's first epoch would: none raises, and the
    images with no usable mask (coco128_seg has two empty masks) come out with zero masks,
    which a step skips and the log counts."""
    folders = sorted(p for p in SHARED_TRAIN.iterdir() if (p / "images").is_dir())
    dataset = TrainDataset([open_source(str(p)) for p in folders],
                           AugmentConfig(128, (1.0, 1.0), hflip=False), seed=0)
    empty = [i for i in range(len(dataset)) if len(dataset[(0, i)].masks) == 0]
    assert len(dataset) >= 2613
    names = {dataset_name(dataset, i) for i in empty}
    assert {"coco128_seg/000000000250", "coco128_seg/000000000508"} <= names


def dataset_name(dataset: TrainDataset, index: int) -> str:
    from bisect import bisect_right

    which = bisect_right(dataset.offsets, index) - 1
    image_path, _ = dataset.sources[which].pairs[index - dataset.offsets[which]]
    return f"{image_path.parent.parent.name}/{image_path.stem}"


def test_image_without_masks_is_a_zero_mask_sample(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", [np.zeros((30, 40), np.uint8)])
    dataset = TrainDataset([open_source(str(root))], AugmentConfig(64), seed=0)
    sample = dataset[(0, 0)]
    assert sample.masks.shape == (0, *sample.image.shape[:2])
    batch = collate([sample], 64)
    assert batch.masks[0].shape[0] == 0


def test_an_unreadable_image_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A corrupt file in a training folder: a sample without masks (which a step skips)
    and one warning naming it, not a crashed run."""
    square = np.zeros((30, 40), np.uint8)
    square[5:20, 5:25] = 1
    root = write_folder(tmp_path / "d", [square, square])
    next(iter(sorted((root / "images").iterdir()))).write_bytes(b"not a picture")
    dataset = TrainDataset([open_source(str(root))], AugmentConfig(64), seed=0)
    with pytest.warns(UserWarning, match="unreadable training image #0: .*not an image"):
        bad = dataset[(0, 0)]
    assert bad.masks.shape[0] == 0 and bad.image.ndim == 3 and not bad.image.any()
    assert dataset[(0, 1)].masks.shape[0] == 1  # the readable one is as before
    batch = collate([bad, dataset[(0, 1)]], 64)
    assert [len(m) for m in batch.masks] == [0, 1]


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared training data not present")
def test_shared_training_folders_open() -> None:
    for name in ("camvid", "coco128_seg", "weizmann_horse"):
        source = open_source(str(SHARED_TRAIN / name))
        image, masks = source.load(0)
        assert masks.ndim == 3 and masks.shape[1:] == image.shape[:2] and len(masks) >= 1
