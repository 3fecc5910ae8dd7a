""":class:`OnnxSamPredictor`: :class:`samkit.SamPredictor`'s ``set_image`` / ``predict`` on
onnxruntime, from the two graphs that ``samkit export-onnx`` writes (see docs/onnx.md).

Everything outside the graphs (image conversion, resize, prompt validation and transform)
is the same code or the same float32 arithmetic as the PyTorch predictor, so both give the
same masks for the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import SamkitError
from samkit.images import ResizeLongestSide, preprocess_shape, to_rgb_uint8
from samkit.modeling.prompt_encoder import (
    LABEL_BACKGROUND,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_FOREGROUND,
    LABEL_PAD,
)
from samkit.onnx_export import DECODER_INPUTS, ENCODER_INPUTS, META_IMAGE_SIZE

MASK_THRESHOLD = 0.0
# The decoder graph returns all mask tokens: 0 is the single-mask output, 1..3 the multimask.
SINGLE_MASK = slice(0, 1)
MULTIMASK = slice(1, None)


class OnnxSamPredictor:
    """Embeds an image with ``encoder.onnx`` once, then decodes prompts with ``decoder.onnx``.

    Args:
        encoder_path, decoder_path: files from ``samkit export-onnx`` (fp32 or int8).
        providers: onnxruntime execution providers, in order of preference.
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisations);
            default: :func:`default_session_options`.
    """

    def __init__(
        self,
        encoder_path: str | Path,
        decoder_path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: Any = None,
    ) -> None:
        options = session_options if session_options is not None else default_session_options()
        self.encoder = load_session(encoder_path, "encoder", ENCODER_INPUTS, providers, options)
        self.decoder = load_session(decoder_path, "decoder", DECODER_INPUTS, providers, options)
        self.mask_input_size = _mask_input_size(self.decoder, decoder_path)
        # SAM's embedding is image_size / 16 and its mask prompt 4x that.
        self.image_size = 4 * self.mask_input_size[0]
        _check_pair(self.encoder, encoder_path, self.image_size)
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    # ------------------------------------------------------------------ embedding
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed one ``H x W x C`` image (uint8 RGB; gray, RGBA, 16-bit, float are converted)."""
        if image_format not in ("RGB", "BGR"):
            raise SamkitError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_uint8(image)
        if image_format == "BGR":
            rgb = rgb[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(rgb))
        self.features = self.encoder.run(None, {ENCODER_INPUTS[0]: resized})[0]
        self.original_size = (rgb.shape[0], rgb.shape[1])
        self.input_size = (resized.shape[0], resized.shape[1])
        self.is_image_set = True

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def get_image_embedding(self) -> np.ndarray:
        """The current image's embedding, ``1 x C x h x w``."""
        self._require_image()
        assert self.features is not None
        return self.features

    # ------------------------------------------------------------------ prompting
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`samkit.SamPredictor.predict`: XY ``point_coords`` ``N x 2`` with labels
        (1 foreground, 0 background), an XYXY ``box``, a ``1 x 4g x 4g`` low-res
        ``mask_input``, all in original-image pixels.

        Returns ``masks C x H x W`` (bool, or float logits with ``return_logits``),
        ``scores C`` and ``low_res_logits C x 4g x 4g``; C = 3 with ``multimask_output``
        else 1.
        """
        self._require_image()
        feeds = self.decoder_inputs(point_coords, point_labels, box, mask_input)
        masks, scores, low_res = self.decoder.run(None, feeds)
        selected = MULTIMASK if multimask_output else SINGLE_MASK
        masks = masks[0, selected]
        if not return_logits:
            masks = masks > MASK_THRESHOLD
        return masks, scores[0, selected], low_res[0, selected]

    def decoder_inputs(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Validate the prompts and lay them out as the decoder graph takes them: points then
        box corners (labels 2, 3) in the resized frame, plus one padding point when there is
        no box (the token layout the PyTorch prompt encoder builds)."""
        assert self.original_size is not None and self.features is not None
        if point_coords is None and box is None and mask_input is None:
            raise SamkitError("no prompt given: pass points, a box or a mask input")
        coords = [np.zeros((0, 2), np.float32)]
        labels = [np.zeros(0, np.float32)]
        if point_coords is not None:
            if point_labels is None:
                raise SamkitError("point_labels must be given with point_coords")
            points, point_labels = _check_points(point_coords, point_labels)
            coords.append(self._to_input_frame(points))
            labels.append(point_labels)
        if box is not None:
            coords.append(self._to_input_frame(_check_box(box).reshape(2, 2)))
            labels.append(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.float32))
        elif point_coords is not None:
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([LABEL_PAD], np.float32))
        has_mask = mask_input is not None
        if has_mask:
            masks = self._check_mask_input(mask_input)
        else:  # ignored by the graph (has_mask_input = 0), but it needs a tensor
            masks = np.zeros(self.mask_input_size, np.float32)
        return {
            "image_embeddings": self.features,
            "point_coords": np.concatenate(coords)[None],
            "point_labels": np.concatenate(labels)[None],
            "mask_input": masks[None, None],
            "has_mask_input": np.array([float(has_mask)], np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }

    def _to_input_frame(self, coords: np.ndarray) -> np.ndarray:
        """Original-image XY -> resized frame, in float32 like ``apply_coords_torch``."""
        assert self.original_size is not None
        old_h, old_w = self.original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.image_size)
        return coords * np.array([new_w / old_w, new_h / old_h], np.float32)

    def _check_mask_input(self, mask_input: np.ndarray) -> np.ndarray:
        masks = np.asarray(mask_input, np.float32)
        expected = (1, *self.mask_input_size)
        if masks.shape != expected:
            raise SamkitError(
                f"mask_input must be 1 x {expected[1]} x {expected[2]} low-res logits, "
                f"got {masks.shape}"
            )
        return masks[0]

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")


# --- loading ------------------------------------------------------------------------------


def default_session_options() -> Any:
    """onnxruntime's defaults, except that its threads sleep between runs instead of
    busy-waiting: prompts arrive between user actions, and on a small machine the spinning
    threads take the cores from everything else (PyTorch in the same process included)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        message = "OnnxSamPredictor needs onnxruntime: pip install 'samkit[onnx]'"
        raise SamkitError(message) from None
    return onnxruntime


def load_session(
    path: str | Path,
    role: str,
    input_names: list[str],
    providers: Sequence[str],
    session_options: Any = None,
) -> Any:
    """An onnxruntime session for one of the two graphs; every failure is one line."""
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise SamkitError(f"ONNX {role} not found: {path}")
    try:
        session = ort.InferenceSession(str(path), session_options, providers=list(providers))
    except Exception as err:  # noqa: BLE001 -- corrupt, truncated, not ONNX, or an unknown provider
        raise SamkitError(f"cannot load ONNX {role} {path}: {_first_line(err)}") from None
    found = [i.name for i in session.get_inputs()]
    if found != input_names:
        raise SamkitError(
            f"{path} is not a samkit {role} graph: inputs {found}, expected {input_names} "
            "(export with `samkit export-onnx`)"
        )
    return session


def _mask_input_size(decoder: Any, path: str | Path) -> tuple[int, int]:
    shape = decoder.get_inputs()[DECODER_INPUTS.index("mask_input")].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise SamkitError(f"{path}: mask_input must have a fixed 1 x 1 x h x w shape, got {shape}")
    return int(shape[2]), int(shape[3])


def _check_pair(encoder: Any, path: str | Path, image_size: int) -> None:
    """The encoder must be for the decoder's image size (e.g. not samkit-tiny with vit_b)."""
    recorded = encoder.get_modelmeta().custom_metadata_map.get(META_IMAGE_SIZE)
    if recorded is not None and int(recorded) != image_size:
        raise SamkitError(
            f"encoder {path} is for {recorded}-px images but the decoder for {image_size}-px: "
            "use the two files of one export"
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# --- prompt validation (the PyTorch predictor's rules and messages) -----------------------


def _check_points(coords: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    coords, labels = np.asarray(coords), np.asarray(labels)
    if coords.ndim != 2 or coords.shape[-1] != 2:
        raise SamkitError(f"point coordinates must be N x 2, got {coords.shape}")
    if labels.shape != coords.shape[:1]:
        raise SamkitError(f"point labels must be N = {coords.shape[0]}, got {labels.shape}")
    coords = coords.astype(np.float32)
    if not np.isfinite(coords).all():
        raise SamkitError("point coordinates must be finite numbers")
    if not np.isin(labels, (LABEL_PAD, LABEL_BACKGROUND, LABEL_FOREGROUND)).all():
        raise SamkitError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
    return coords, labels.astype(np.float32)


def _check_box(box: Any) -> np.ndarray:
    box = np.asarray(box, np.float32).reshape(-1)
    if box.shape != (4,):
        raise SamkitError(f"box must be 4 numbers (x0, y0, x1, y1), got {box.size}")
    if not np.isfinite(box).all():
        raise SamkitError("box coordinates must be finite numbers")
    if box[2] < box[0] or box[3] < box[1]:
        raise SamkitError("a box must have x1 >= x0 and y1 >= y0 (XYXY order)")
    return box
