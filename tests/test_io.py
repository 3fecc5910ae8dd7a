"""samkit.io: atomic writes keep the previous file whole whatever the writer does, and the
one list of image suffixes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from samkit.errors import SamkitError
from samkit.io import atomic_output, image_files, write_bytes_atomic, write_text_atomic


def test_a_failed_writer_leaves_the_previous_file_and_no_debris(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    write_bytes_atomic(target, b"good")
    with pytest.raises(RuntimeError, match="writer died"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half a chec")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_any_writer_goes_through_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    with atomic_output(target, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".state.pt.")
        torch.save({"step": 3}, tmp)
        assert not target.exists()  # readers see nothing until the file is complete
    assert torch.load(target, weights_only=True) == {"step": 3}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_os_failures_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SamkitError, match=r"cannot write .*missing.*: No such file"):
        write_text_atomic(tmp_path / "missing" / "a.json", "{}")


def test_image_files_are_the_visible_files_with_image_suffixes(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "c.webp", "d.tif", ".hidden.png", "notes.txt", "e.bmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.tif",
                                                      "e.bmp"]
