"""Embed an image once, then answer many prompts fast (paper §3, "Efficiency").

:class:`SamPredictor` is a drop-in for the official class (``set_image``, ``predict``,
``predict_torch``, ``get_image_embedding``) and adds :meth:`SamPredictor.predict_batch`: many
prompts (64 boxes, N point sets) for one image in a single decoder call, in original-image
coordinates, plus :meth:`SamPredictor.set_image_batch` to embed several images at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from samkit.errors import SamkitError
from samkit.images import ResizeLongestSide, to_rgb_uint8
from samkit.modeling.sam import Sam
from samkit.modeling.shared_image import ImageCache
from samkit.modeling.text_prompt import TextPrompt
from samkit.prompts import MAX_POINTS, as_prompt_array, check_boxes, check_points
from samkit.runtime import torch_threads

ArrayLike = np.ndarray | torch.Tensor


class TextEncoder(Protocol):
    """What text prompts need from a CLIP (``samkit.clip.Clip`` is one)."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed_text(self, phrases: Sequence[str]) -> torch.Tensor: ...


@dataclass
class EmbeddedImage:
    """What the decoder needs about one embedded image."""

    features: torch.Tensor  # 1 x C x h x w image embedding
    original_size: tuple[int, int]  # (H, W) of the user's image
    input_size: tuple[int, int]  # (H, W) after resize-longest-side, before padding
    # The decoder's image-side work for prompts without a mask input, filled on first use.
    no_mask_cache: ImageCache | None = None


class SamPredictor:
    """Computes image embeddings once and decodes prompts against them."""

    # Intra-op threads for decoding a single prompt set on the CPU: its decode is hundreds
    # of small ops (a handful of tokens), where a second thread's hand-offs cost more than
    # it saves (2-core AMD EPYC, idle, samkit-tiny: 11.9 vs 19.6 ms a click in
    # benchmarks/default_model.py; predict_batch of 4 point prompts took 32.4 ms on 1 thread
    # vs 28.3 ms on 2, so batches keep torch's count). None: torch's current count.
    single_prompt_threads: int | None = 1

    def __init__(self, sam_model: Sam, encode_batch_size: int = 4, decode_chunk_size: int = 4,
                 encoder_dtype: torch.dtype | None = None, max_points: int = MAX_POINTS,
                 clip: TextEncoder | None = None) -> None:
        """``encoder_dtype=torch.bfloat16`` runs the image encoder under bf16 autocast (CPUs
        with AVX-512 BF16 / AMX, and GPUs); embeddings are returned in fp32 either way.
        ``max_points``: points per prompt set accepted (the decoder's memory grows with the
        square of its tokens). ``clip`` (``samkit.clip.load_clip``) embeds ``text=`` prompts
        for a model with a text slot; it must be the CLIP the slot was trained with."""
        self.model = sam_model
        self.clip = clip
        if clip is not None:
            slot = self._text_slot()
            from samkit.clip import check_clip_fits

            check_clip_fits(clip.dim, clip.name, slot.clip_dim, slot.clip_name)
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.encode_batch_size = encode_batch_size
        self.decode_chunk_size = decode_chunk_size
        self.encoder_dtype = encoder_dtype
        self.max_points = max_points
        self.images: list[EmbeddedImage] = []
        self.reset_image()

    # ------------------------------------------------------------------ embedding
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed one ``H x W x C`` image (uint8 RGB; gray, RGBA, 16-bit, float are converted)."""
        self.set_image_batch([image], image_format)

    def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embed several images (encoder batches of ``encode_batch_size``); image 0 becomes
        current, :meth:`select_image` switches."""
        if image_format not in ("RGB", "BGR"):
            raise SamkitError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if len(images) == 0:
            raise SamkitError("set_image_batch needs at least one image")
        tensors, sizes = [], []
        for image in images:
            rgb = to_rgb_uint8(image)
            if image_format != self.model.image_format:
                rgb = rgb[..., ::-1]
            resized = self.transform.apply_image(np.ascontiguousarray(rgb))
            tensors.append(torch.as_tensor(resized, device=self.device).permute(2, 0, 1))
            sizes.append(rgb.shape[:2])
        embedded: list[EmbeddedImage] = []
        for start in range(0, len(tensors), self.encode_batch_size):
            chunk = tensors[start : start + self.encode_batch_size]
            features = self._encode([t.float() for t in chunk])
            for offset, t in enumerate(chunk):
                embedded.append(
                    EmbeddedImage(
                        features[offset : offset + 1],
                        tuple(sizes[start + offset]),
                        (t.shape[1], t.shape[2]),
                    )
                )
        self.set_embedding(embedded)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Official API: embed a ``1 x 3 x h x w`` image already resized (long side =
        ``image_size``), given the ``(H, W)`` it had before resizing."""
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[:2] != (1, 3)
            or max(transformed_image.shape[2:]) != self.model.image_size
        ):
            raise SamkitError(
                f"set_torch_image expects 1x3xHxW with long side {self.model.image_size}, "
                f"got {tuple(transformed_image.shape)}"
            )
        features = self._encode([transformed_image[0].float()])
        input_size = (transformed_image.shape[2], transformed_image.shape[3])
        self.set_embedding([EmbeddedImage(features, tuple(original_image_size), input_size)])

    @torch.inference_mode()
    def _encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack([self.model.preprocess(im) for im in images])
        if self.encoder_dtype is None:
            return self.model.image_encoder(batch)
        with torch.autocast(self.device.type, dtype=self.encoder_dtype):
            return self.model.image_encoder(batch).float()

    def set_embedding(self, embedded: EmbeddedImage | Sequence[EmbeddedImage]) -> None:
        """Use embeddings computed earlier (by :meth:`get_embedding`, perhaps in another
        process or from a cache) instead of encoding images; the first becomes current."""
        embedded = [embedded] if isinstance(embedded, EmbeddedImage) else list(embedded)
        if not embedded:
            raise SamkitError("set_embedding needs at least one embedding")
        self.reset_image()
        self.images = embedded
        with torch.inference_mode():
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        self.select_image(0)

    def get_embedding(self) -> EmbeddedImage:
        """The current image's embedding (features, original and input size), for
        :meth:`set_embedding` later."""
        if self._current is None:
            raise SamkitError("no image is set: call set_image first")
        return self._current

    def select_image(self, index: int) -> None:
        """Make image ``index`` of the last :meth:`set_image_batch` the current one."""
        if not 0 <= index < len(self.images):
            raise SamkitError(f"image index {index} out of range (0..{len(self.images) - 1})")
        current = self.images[index]
        self._current = current
        self.features = current.features
        self.original_size = current.original_size
        self.input_size = current.input_size
        self.is_image_set = True

    def reset_image(self) -> None:
        self.images = []
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._dense_pe: torch.Tensor | None = None
        self._current: EmbeddedImage | None = None

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, ``1 x C x h x w`` (256 x 64 x 64 for SAM)."""
        self._require_image()
        assert self.features is not None
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ prompting
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | None = None,
        text_embedding: ArrayLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Official API: one prompt set in original-image pixels (XY points ``N x 2`` with
        labels 1 = foreground, 0 = background; an XYXY ``box``; a ``1 x 256 x 256`` low-res
        ``mask_input`` from a previous call). Models with a text slot also take ``text`` (a
        phrase, embedded by the predictor's ``clip``) or a ready ``text_embedding`` (``D``).

        Returns ``masks C x H x W`` (bool, or float logits with ``return_logits``),
        ``scores C`` and ``low_res_logits C x 256 x 256`` as numpy arrays.
        """
        # Prompts stay numpy until predict_batch checks them and moves them once.
        coords = None if point_coords is None else as_prompt_array(point_coords)[None]
        labels = None if point_labels is None else as_prompt_array(point_labels)[None]
        boxes = None if box is None else as_prompt_array(box).reshape(1, -1)
        masks_in = None if mask_input is None else _as_tensor(mask_input)[None]
        texts = None if text is None else [text]
        text_in = None if text_embedding is None else _as_tensor(text_embedding).reshape(1, -1)
        masks, scores, low_res = self.predict_batch(
            coords, labels, boxes, masks_in, multimask_output, return_logits, texts, text_in
        )
        return masks[0].cpu().numpy(), scores[0].cpu().numpy(), low_res[0].cpu().numpy()

    def predict_batch(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        boxes: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        texts: Sequence[str] | None = None,
        text_embeddings: ArrayLike | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Many prompts for the current image in one decoder call, in original-image pixels.

        Args:
            point_coords: ``B x N x 2`` XY, with ``point_labels`` ``B x N`` (1 fg, 0 bg,
                -1 padding for prompt sets of different lengths).
            boxes: ``B x 4`` XYXY.
            mask_input: ``B x 1 x 256 x 256`` low-res logits.
            texts: ``B`` phrases (needs a text slot and the predictor's ``clip``), or
            text_embeddings: ``B x D`` CLIP embeddings (L2-normalised), alone or with the
                other prompts (then the same ``B``).

        Returns torch tensors ``masks B x M x H x W``, ``scores B x M``,
        ``low_res_logits B x M x 256 x 256``; M = 3 with ``multimask_output`` else 1.
        """
        self._require_image()
        assert self.original_size is not None
        coords = labels = box_t = masks_t = None
        if point_coords is not None:
            if point_labels is None:
                raise SamkitError("point_labels must be given with point_coords")
            points, point_labels = check_points(point_coords, point_labels, batched=True,
                                                max_points=self.max_points)
            coords = self.transform.apply_coords_torch(
                torch.from_numpy(points).to(self.device), self.original_size)
            labels = torch.from_numpy(point_labels).to(self.device, torch.int)
        if boxes is not None:
            box_t = self.transform.apply_boxes_torch(
                torch.from_numpy(check_boxes(boxes)).to(self.device), self.original_size)
        if mask_input is not None:
            masks_t = self._check_mask_input(_as_tensor(mask_input)).to(self.device, torch.float)
        text_t = self._text_embeddings(texts, text_embeddings)
        if coords is None and box_t is None and masks_t is None and text_t is None:
            raise SamkitError("no prompt given: pass points, a box, a mask input or text")
        if text_t is not None:
            others = [t.shape[0] for t in (coords, box_t, masks_t) if t is not None]
            if any(n != text_t.shape[0] for n in others):
                raise SamkitError(f"{text_t.shape[0]} text prompt(s) for {others[0]} prompt "
                                  "set(s): give one text per prompt set")
        return self.predict_torch(coords, labels, box_t, masks_t, multimask_output, return_logits,
                                  text_t)

    def _text_slot(self) -> TextPrompt:
        slot = self.model.text_prompt
        if slot is None:
            raise SamkitError("this model has no text slot: text prompts need a checkpoint "
                              "trained with one (samkit train with text_clip; docs/text.md)")
        return slot

    def _text_embeddings(self, texts: Sequence[str] | None,
                         embeddings: ArrayLike | None) -> torch.Tensor | None:
        """``B x D`` CLIP embeddings for the text prompts (None without any), checked."""
        if texts is None and embeddings is None:
            return None
        if texts is not None and embeddings is not None:
            raise SamkitError("pass texts or text_embeddings, not both")
        slot = self._text_slot()
        if texts is not None:
            if isinstance(texts, str):
                raise SamkitError("texts must be a list of phrases, not one string")
            if self.clip is None:
                raise SamkitError("text prompts need CLIP weights: build the predictor with "
                                  "clip=samkit.clip.load_clip(DIR) (docs/text.md)")
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise SamkitError("every text prompt must be a non-empty phrase")
            return self.clip.embed_text(list(texts)).to(self.device, torch.float)
        tensor = _as_tensor(embeddings).to(self.device, torch.float)
        if tensor.ndim != 2 or tensor.shape[1] != slot.clip_dim:
            raise SamkitError(f"text_embeddings must be B x {slot.clip_dim} (the text slot's "
                              f"CLIP size), got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise SamkitError("text_embeddings must be finite")
        return tensor

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official API: batched prompts already in the resized input frame (see
        :meth:`predict_batch` for shapes; ``text_embeddings`` ``B x D`` CLIP embeddings for
        a model with a text slot)."""
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        prompt_sets = next((t.shape[0] for t in (point_coords, boxes, mask_input,
                                                 text_embeddings) if t is not None), 1)
        single = prompt_sets == 1 and self.features.device.type == "cpu"
        with torch_threads(self.single_prompt_threads if single else None):
            text = None if text_embeddings is None else self._text_slot()(text_embeddings)
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes,
                                                      masks=mask_input, text=text)
            low_res, scores = self.decode(sparse, dense, multimask_output,
                                          shared_dense=mask_input is None)
            assert self.input_size is not None and self.original_size is not None
            threshold = None if return_logits else self.model.mask_threshold
            masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size,
                                                 threshold)
        return masks, scores, low_res

    @torch.inference_mode()
    def decode(
        self,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
        shared_dense: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder on encoded prompts for the current image: low-res logits and IoU,
        decoded ``decode_chunk_size`` prompts at a time so that each prompt's image-sized
        tensors stay in cache (``benchmarks/speed.py --chunk-sizes`` compares sizes).

        ``shared_dense``: the dense prompt is the "no mask" embedding (no mask input), so all
        image-sized work of the decoder is the same for every prompt of this image: it is
        done once (``MaskDecoder.image_cache``) and reused by every later call.
        """
        self._require_image()
        decoder = self.model.mask_decoder
        if sparse.shape[0] == 0:  # no prompts (e.g. a detector found nothing): empty results
            outputs = decoder.num_multimask_outputs if multimask_output else 1
            h, w = self.features.shape[-2:]
            empty = self.features.new_zeros(0, outputs, 4 * h, 4 * w)
            return empty, self.features.new_zeros(0, outputs)
        cache = None
        if shared_dense:
            assert self._current is not None
            if self._current.no_mask_cache is None:
                self._current.no_mask_cache = decoder.image_cache(
                    self._current.features, self._dense_pe, dense
                )
            cache = self._current.no_mask_cache
        step = self.decode_chunk_size
        chunks = [
            decoder(self.features, self._dense_pe, sparse[i : i + step], dense[i : i + step],
                    multimask_output, cache)
            for i in range(0, sparse.shape[0], step)
        ]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    # ------------------------------------------------------------------ validation
    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _check_mask_input(self, masks: torch.Tensor) -> torch.Tensor:
        expected = self.model.prompt_encoder.mask_input_size
        if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[2:]) != expected:
            raise SamkitError(
                f"mask_input must be B x 1 x {expected[0]} x {expected[1]} low-res logits, "
                f"got {tuple(masks.shape)}"
            )
        return masks


def _as_tensor(x: ArrayLike | Sequence[float]) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
