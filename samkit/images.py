"""Reading images safely, converting them to RGB uint8, and the resize-longest-side transform."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from samkit.errors import SamkitError

if TYPE_CHECKING:  # only the *_torch methods use torch: reading images does not load it
    import torch

# SAM works at 1024 px; anything past 100 MP is almost surely a mistake or a decompression bomb.
DEFAULT_MAX_PIXELS = 100_000_000

# What Pillow raises for a damaged file besides OSError: a broken PNG chunk is a SyntaxError,
# a short header a struct.error or EOFError, a bad field a ValueError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``H x W x 3`` RGB uint8, honouring EXIF orientation.

    The pixel count is checked from the header before any decoding, so a decompression bomb
    costs nothing. Every failure is a :class:`SamkitError` with a one-line reason.
    """
    path = Path(path)
    if not path.exists():
        raise SamkitError(f"image not found: {path}")
    if not path.is_file():
        raise SamkitError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise SamkitError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SamkitError(
                        f"image {path} is {w}x{h} = {w * h / 1e6:.0f} MP, over the "
                        f"{max_pixels / 1e6:.0f} MP limit (possible decompression bomb)"
                    )
                im.load()  # decode now, so truncated files fail here
                im = ImageOps.exif_transpose(im)
                return pil_to_rgb(im)
    except SamkitError:
        raise
    except UnidentifiedImageError:
        raise SamkitError(f"not an image (unrecognised format): {path}") from None
    except (*DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SamkitError(f"cannot decode image {path}: {str(e).splitlines()[0]}") from None


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """PIL image of any mode -> ``H x W x 3`` uint8 (16-bit and float modes are rescaled)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb_uint8(np.asarray(im))
    return np.asarray(im.convert("RGB"))


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert gray / gray+alpha / RGB / RGBA arrays of uint8, uint16, int, bool or float
    (0..1 or 0..255) to ``H x W x 3`` uint8."""
    if not isinstance(image, np.ndarray):
        raise SamkitError(f"expected a numpy array image, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise SamkitError(f"expected an HxW or HxWxC (C in 1..4) image, got shape {image.shape}")
    if image.shape[2] in (2, 4):
        image = image[:, :, :-1]  # drop alpha
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        finite_max = float(np.nanmax(image)) if image.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0
        return np.clip(np.nan_to_num(image) * scale + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        # 16-bit data (or wider ints holding it) keeps its full range: 65535 -> 255.
        if image.max(initial=0) > 255 or image.dtype in (np.uint16, np.int16):
            return np.clip(image.astype(np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return np.clip(image, 0, 255).astype(np.uint8)
    raise SamkitError(f"unsupported image dtype {image.dtype}")


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size ``(h', w')`` after scaling so that the longer side equals ``long_side``."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class ResizeLongestSide:
    """Resizes images (and moves points / boxes with them) so the long side is
    ``target_length``. Same maths as the official transform, without torchvision."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> resized uint8 (PIL bilinear with antialiasing)."""
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 2`` (x, y) pixel coords in the original image -> resized frame."""
        scale_xy = self._scale(original_size)
        return np.asarray(coords, dtype=np.float64) * np.array(scale_xy)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``B x 4`` XYXY boxes -> resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        coords = coords.float()
        return coords * coords.new_tensor(self._scale(original_size))

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` float -> resized (bilinear, antialiased; close to, not equal to,
        :meth:`apply_image`)."""
        import torch.nn.functional as F

        size = preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def _scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h
