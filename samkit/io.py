"""Files in and out: which files are images, atomic writes, output folders.

One home for each, used by every command and app: a reader never sees a half-written file,
and an OS failure is a one-line :class:`~samkit.errors.SamkitError`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from samkit.errors import SamkitError

# Suffixes of the image files samkit looks for in folders (what OpenCV and Pillow decode).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def is_image_file(path: Path) -> bool:
    """A visible file with an image suffix (``.DS_Store`` and macOS ``._x.jpg`` are not)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") \
        and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


@contextlib.contextmanager
def atomic_output(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file to (by any writer: ``torch.save``,
    safetensors, plain bytes); on success it replaces ``path`` in one ``os.replace``.

    A reader (or a resumed run) sees either the previous file or the complete new one, never
    a partial one, and a failed write leaves no debris. ``fsync`` makes the content durable
    before the rename: without it some file systems can show the renamed file empty after a
    power cut. An OS failure (missing folder, no permission, disk full) is a one-line
    :class:`SamkitError`.
    """
    path = Path(path)
    # A hidden name of this process: never a stranger's file, and `samkit everything` knows
    # such leftovers of a killed run by their shape (.NAME.PID.HEX.tmp).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # e.g. the folder never existed: nothing to clean
            tmp.unlink()
        if isinstance(err, OSError):
            raise SamkitError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path, fsync=fsync) as tmp:
        # "x" mode (not tempfile.mkstemp, whose files are mode 0600) honours the umask like
        # any ordinary write.
        with tmp.open("xb") as handle:
            handle.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 ``text``, fsynced by default."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def prepare_out_dir(path: Path) -> Path:
    """Create the output folder and prove it is writable, before any slow work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SamkitError(f"cannot write to output folder {path}: {err.strerror or err}") from None
    return path
