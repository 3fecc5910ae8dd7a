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
from samkit.onnx.names import (
    DECODER_FILE,
    DECODER_IMAGE_FILE,
    DECODER_INPUTS,
    DECODER_PROMPTS_FILE,
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_PAD,
    META_IMAGE_SIZE,
    META_MODEL,
    PROMPTS_INPUTS,
    int8_file,
)
from samkit.prompts import check_boxes, check_points

MASK_THRESHOLD = 0.0
# The decoder graph returns all mask tokens: 0 is the single-mask output, 1..3 the multimask.
SINGLE_MASK = slice(0, 1)
MULTIMASK = slice(1, None)
MASK_INDEX = {True: np.array([1, 2, 3]), False: np.array([0])}  # by multimask_output


class OnnxSamPredictor:
    """Embeds an image with ``encoder.onnx`` once, then decodes prompts with ``decoder.onnx``
    or, when given, the shared-image pair ``decoder_image.onnx`` (run once per image in
    :meth:`set_image`) + ``decoder_prompts.onnx`` (every prompt without a mask prompt).

    Args:
        encoder_path, decoder_path: files from ``samkit export-onnx`` (fp32 or int8).
        providers: onnxruntime execution providers, in order of preference.
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisations);
            default: :func:`default_session_options`.
        decoder_image_path, decoder_prompts_path: the shared-image pair (both or neither).
    """

    def __init__(
        self,
        encoder_path: str | Path,
        decoder_path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: Any = None,
        *,
        decoder_image_path: str | Path | None = None,
        decoder_prompts_path: str | Path | None = None,
    ) -> None:
        options = session_options if session_options is not None else default_session_options()
        self.encoder = load_session(encoder_path, "encoder", ENCODER_INPUTS, providers, options)
        self.decoder = load_session(decoder_path, "decoder", DECODER_INPUTS, providers, options)
        self.mask_input_size = _mask_input_size(self.decoder, decoder_path)
        # SAM's embedding is image_size / 16 and its mask prompt 4x that.
        self.image_size = 4 * self.mask_input_size[0]
        _check_pair(self.encoder, encoder_path, self.image_size)
        self.decoder_image, self.decoder_prompts = _shared_pair(
            decoder_image_path, decoder_prompts_path, providers, options, self.image_size,
            self.decoder.get_modelmeta().custom_metadata_map.get(META_MODEL))
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    @classmethod
    def from_folder(
        cls, folder: str | Path, int8: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",), session_options: Any = None,
    ) -> OnnxSamPredictor:
        """The graphs of one ``samkit export-onnx`` folder: ``encoder``, ``decoder`` and,
        when the folder has them, the shared-image pair; with ``int8`` their ``.int8`` copies
        (the image-side graph has none: it runs once per image in float32)."""
        folder = Path(folder)

        def graph(name: str) -> Path:
            return folder / (int8_file(name) if int8 else name)

        image, prompts = folder / DECODER_IMAGE_FILE, graph(DECODER_PROMPTS_FILE)
        shared = image.is_file() and prompts.is_file()
        return cls(
            graph(ENCODER_FILE), graph(DECODER_FILE),
            providers, session_options,
            decoder_image_path=image if shared else None,
            decoder_prompts_path=prompts if shared else None,
        )

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
        if self.decoder_image is not None:
            names = [o.name for o in self.decoder_image.get_outputs()]
            products = self.decoder_image.run(None, {ENCODER_OUTPUTS[0]: self.features})
            self.image_products = dict(zip(names, products, strict=True))
        self.original_size = (rgb.shape[0], rgb.shape[1])
        self.input_size = (resized.shape[0], resized.shape[1])
        self.is_image_set = True

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: np.ndarray | None = None
        self.image_products: dict[str, np.ndarray] = {}
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
        feeds = self._prompt_feeds(point_coords, point_labels, box, mask_input)
        selected = MULTIMASK if multimask_output else SINGLE_MASK
        if self.decoder_prompts is not None and mask_input is None:
            feeds.update(self.image_products, mask_index=MASK_INDEX[multimask_output])
            masks, scores, low_res = self.decoder_prompts.run(None, feeds)
            masks = masks[0]  # the graph upscaled just the selected masks
        else:
            feeds.update(self._image_feeds(mask_input))
            masks, scores, low_res = self.decoder.run(None, feeds)
            masks = masks[0, selected]
        if not return_logits:
            masks = masks > MASK_THRESHOLD
        return masks, scores[0, selected], low_res[0, selected]

    def _prompt_feeds(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Validate the prompts and lay them out as both decoder graphs take them: points then
        box corners (labels 2, 3) in the resized frame, plus one padding point when there is
        no box (the token layout the PyTorch prompt encoder builds)."""
        assert self.original_size is not None
        if point_coords is None and box is None and mask_input is None:
            raise SamkitError("no prompt given: pass points, a box or a mask input")
        coords = [np.zeros((0, 2), np.float32)]
        labels = [np.zeros(0, np.float32)]
        if point_coords is not None:
            if point_labels is None:
                raise SamkitError("point_labels must be given with point_coords")
            points, point_labels = check_points(point_coords, point_labels, batched=False)
            coords.append(self._to_input_frame(points))
            labels.append(point_labels.astype(np.float32))
        if box is not None:
            box_xyxy = check_boxes(box)
            if len(box_xyxy) != 1:
                raise SamkitError(f"box must be 4 numbers (x0, y0, x1, y1), got {box_xyxy.size}")
            coords.append(self._to_input_frame(box_xyxy.reshape(2, 2)))
            labels.append(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.float32))
        elif point_coords is not None:
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([LABEL_PAD], np.float32))
        return {
            "point_coords": np.concatenate(coords)[None],
            "point_labels": np.concatenate(labels)[None],
            "orig_im_size": np.array(self.original_size, np.float32),
        }

    def _image_feeds(self, mask_input: np.ndarray | None) -> dict[str, np.ndarray]:
        """The embedding and mask-prompt inputs of ``decoder.onnx``."""
        assert self.features is not None
        if mask_input is not None:
            masks = self._check_mask_input(mask_input)
        else:  # ignored by the graph (has_mask_input = 0), but it needs a tensor
            masks = np.zeros(self.mask_input_size, np.float32)
        return {
            "image_embeddings": self.features,
            "mask_input": masks[None, None],
            "has_mask_input": np.array([float(mask_input is not None)], np.float32),
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
    """onnxruntime's defaults (its threads spin while waiting for work during a run), except
    that the spinning stops when a run returns: prompts arrive between user actions, and on
    a small machine threads spinning between runs take the cores from everything else
    (PyTorch in the same process included). Measured on the ViT-B prompts graph: spinning
    during runs saves 1-2 ms per prompt over not spinning at all (docs/onnx.md)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
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


def _shared_pair(
    image_path: str | Path | None, prompts_path: str | Path | None,
    providers: Sequence[str], options: Any, image_size: int, model: str | None,
) -> tuple[Any, Any]:
    """The shared-image decoder sessions, or ``(None, None)``; the prompts graph must read
    exactly the image graph's products."""
    if image_path is None and prompts_path is None:
        return None, None
    if image_path is None or prompts_path is None:
        raise SamkitError("give both decoder_image_path and decoder_prompts_path, or neither")
    image = load_session(image_path, "decoder image", ENCODER_OUTPUTS, providers, options)
    products = [o.name for o in image.get_outputs()]
    prompts = load_session(prompts_path, "decoder prompts", [*products, *PROMPTS_INPUTS],
                           providers, options)
    _check_pair(image, image_path, image_size, "decoder image", model)
    _check_pair(prompts, prompts_path, image_size, "decoder prompts", model)
    return image, prompts


def _mask_input_size(decoder: Any, path: str | Path) -> tuple[int, int]:
    shape = decoder.get_inputs()[DECODER_INPUTS.index("mask_input")].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise SamkitError(f"{path}: mask_input must have a fixed 1 x 1 x h x w shape, got {shape}")
    return int(shape[2]), int(shape[3])


def _check_pair(session: Any, path: str | Path, image_size: int, role: str = "encoder",
                model: str | None = None) -> None:
    """A graph must be for the decoder's image size (e.g. not samkit-tiny with vit_b) and,
    when ``model`` is given, record the same model name."""
    meta = session.get_modelmeta().custom_metadata_map
    recorded = meta.get(META_IMAGE_SIZE)
    if recorded is not None and int(recorded) != image_size:
        raise SamkitError(
            f"{role} {path} is for {recorded}-px images but the decoder for {image_size}-px: "
            "use the files of one export"
        )
    if model is not None and meta.get(META_MODEL) != model:
        raise SamkitError(
            f"{role} {path} is model {meta.get(META_MODEL)!r} but the decoder {model!r}: "
            "use the files of one export"
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
