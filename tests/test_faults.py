"""Injected faults: a disk that fills up in the middle of a write (``ENOSPC``) during
``samkit everything``, a training checkpoint and a safetensors export. Each gives a clear
one-line error, leaves no partial file where a reader would take it for complete, and keeps
the previous good file intact."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import io as samkit_io
from samkit.build import build_sam_from_config, load_state_dict, save_checkpoint
from samkit.errors import SamkitError
from samkit.everything import collect_images, run_everything
from samkit.registry import SamConfig, TinyViTConfig
from test_everything import FakeFactory
from test_train import run_config, shapes  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every write through samkit.io's temporary files stops half-way with ENOSPC, as on a
    disk that fills up: whatever the writer (open, torch.save, safetensors), the first bytes
    reach the temporary file and then the OS refuses."""
    real_replace = os.replace

    def refuse(src: str | Path, dst: str | Path) -> None:
        path = Path(src)
        if path.name.endswith(".tmp") and path.exists():
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # what made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_replace(src, dst)

    monkeypatch.setattr(samkit_io.os, "replace", refuse)
    yield


def no_debris(folder: Path) -> None:
    assert [p.name for p in folder.rglob("*.tmp")] == []


def test_everything_on_a_full_disk_reports_each_image_and_writes_nothing_partial(
        tmp_path: Path, full_disk: None) -> None:
    source, out = tmp_path / "photos", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(source / name)
    summary = run_everything(collect_images(source, None, exclude=out), out, FakeFactory())
    assert summary.failed == 2 and summary.done == 0 and summary.exit_code == 1
    assert list(out.glob("*.json")) == []  # nothing a reader could take for a result
    no_debris(out)


def test_a_checkpoint_write_that_fills_the_disk_keeps_the_last_good_one(
        shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from samkit.train.loop import train

    cfg = run_config(shapes, tmp_path, iterations=2, ckpt_interval=2)
    train(cfg)
    checkpoint = tmp_path / "checkpoint.pt"
    good = torch.load(checkpoint, weights_only=True)
    assert good["step"] == 2

    real_replace = os.replace

    def refuse(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == checkpoint:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(samkit_io.os, "replace", refuse)
    with pytest.raises(SamkitError, match="No space left on device") as err:
        train(run_config(shapes, tmp_path, iterations=4, ckpt_interval=2, resume=True))
    assert "\n" not in str(err.value)
    again = torch.load(checkpoint, weights_only=True)
    assert again["step"] == 2 and torch.equal(again["model"][next(iter(good["model"]))],
                                              good["model"][next(iter(good["model"]))])
    no_debris(tmp_path)


def test_an_export_that_fills_the_disk_keeps_the_previous_weights(tmp_path: Path) -> None:
    model = build_sam_from_config(SamConfig(TinyViTConfig(depths=(1, 1, 1, 1)), image_size=256))
    target = save_checkpoint(model, tmp_path / "model.safetensors")
    before = target.read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.MonkeyPatch.context() as patch:
        def refuse(src: str | Path, dst: str | Path) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

        patch.setattr(samkit_io.os, "replace", refuse)
        with pytest.raises(SamkitError, match=r"cannot write .*model.safetensors: No space"):
            save_checkpoint(model, target)
    assert target.read_bytes() == before
    load_state_dict(target)  # still a whole, loadable file
    no_debris(tmp_path)
