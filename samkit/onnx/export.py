"""Export SAM to ONNX: an image-encoder graph and a prompt-encoder + mask-decoder graph.

``encoder.onnx``
    ``image`` (``h x w x 3`` uint8 RGB, already resized so that its long side is the model's
    ``image_size``, e.g. by :class:`samkit.images.ResizeLongestSide`) ->
    ``image_embeddings`` (``1 x 256 x g x g``, ``g = image_size / 16``). Normalisation and
    zero padding to the square input happen inside the graph; the resize stays outside because
    samkit resizes with PIL's antialiased bilinear filter, which no ONNX ``Resize`` reproduces.

``decoder.onnx`` (the official SAM ONNX interface, ``return_single_mask=False``)
    ``image_embeddings`` ``1 x 256 x g x g``; ``point_coords`` ``1 x N x 2`` (XY, resized
    frame); ``point_labels`` ``1 x N`` float (1 foreground, 0 background, 2 / 3 box corners,
    -1 padding); ``mask_input`` ``1 x 1 x 4g x 4g``; ``has_mask_input`` ``1``;
    ``orig_im_size`` ``2`` (H, W as float) ->
    ``masks`` ``1 x 4 x H x W`` logits at the original size, ``iou_predictions`` ``1 x 4``,
    ``low_res_masks`` ``1 x 4 x 4g x 4g``. Index 0 is the single-mask output, 1..3 the three
    multimask outputs. The resized size is computed in the graph with the same float64
    rounding as :func:`samkit.images.preprocess_shape`, so every aspect ratio is right.

``decoder_image.onnx`` + ``decoder_prompts.onnx`` (samkit's fast path for prompts without a
mask prompt, see :mod:`samkit.modeling.shared_image`)
    The image graph takes ``image_embeddings`` and returns every image-sized product the
    decoder shares between prompts (names like ``layer0.k``; once per image). The prompts
    graph takes those, ``point_coords``, ``point_labels``, ``mask_index`` (int64 indices of
    the masks to upscale, e.g. ``[1, 2, 3]``) and ``orig_im_size`` -> ``masks``
    ``1 x len(mask_index) x H x W``, ``iou_predictions`` ``1 x 4``, ``low_res_masks``
    ``1 x 4 x 4g x 4g``: the same numbers as ``decoder.onnx`` with ``has_mask_input = 0``.

``decoder_select.onnx`` (the annotation page's graph for mask-prompt refinement, see
:mod:`samkit.engine.web_decoder`; not written by :func:`export_onnx`)
    ``decoder.onnx``'s inputs plus ``mask_index`` -> ``masks`` ``1 x len(mask_index) x H x W``,
    ``iou_predictions`` and ``low_res_masks`` as for ``decoder.onnx``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samkit
from samkit.build import is_trained
from samkit.errors import SamkitError
from samkit.modeling.prompt_encoder import LABEL_PAD, check_point_shapes
from samkit.modeling.resample import resize_matrix
from samkit.modeling.sam import Sam
from samkit.modeling.shared_image import ImageCache
from samkit.onnx.names import (
    DECODER_FILE, DECODER_IMAGE_FILE, DECODER_INPUTS, DECODER_OUTPUTS, DECODER_PROMPTS_FILE,
    ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS, INFO_FILE, INT8_FILES, META_GRAPH,
    META_IMAGE_SIZE, META_MODEL, PROMPTS_INPUTS, SELECT_INPUTS, int8_file)

QUANTIZE_CHOICES = ("int8",)
# Opset 20 has a Gelu op: the exporter's registry emits it for the exact-erf GELUs (one
# fused onnxruntime kernel instead of Erf and four elementwise nodes: 8.4 -> 7.7 ms a
# samkit-tiny prompts decode, equal outputs within 3e-6; docs/onnx.md). The registry has
# native overloads at opsets >= 18, so no version conversion runs. Needs onnxruntime >= 1.17.
OPSET = 20
# Dynamic int8: MatMul / Gemm weights (the bulk of both graphs) as signed int8; see docs/onnx.md.
INT8_OPS = ["MatMul", "Gemm"]
INT8_WEIGHT_TYPE = "QInt8"
# A protobuf file holds at most 2 GiB: bigger encoders (ViT-H) keep weights in a .data file.
PROTOBUF_LIMIT = 2**31 - 2**26
# Each package the export needs, and why (named in the error when one is missing).
EXPORT_PACKAGES = {
    "onnx": "the ONNX format",
    "onnxscript": "torch's ONNX exporter",
    "onnxruntime": "int8 quantization",
}


class EncoderGraph(nn.Module):
    """Resized uint8 ``h x w x 3`` image -> ``1 x C x g x g`` image embedding."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(2, 0, 1).float()
        return self.sam.image_encoder(self.sam.preprocess(x)[None])


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder + upscaling to the original size, for one image."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_size = sam.image_size
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe(), persistent=False)
        low_res = sam.prompt_encoder.mask_input_size[0]
        # Upscaling low-res logits to the padded square: fixed for the model, so a constant
        # (flattened: the graph gathers single entries of it).
        upscale = resize_matrix(self.image_size, low_res)
        self.register_buffer("upscale", upscale.reshape(-1), persistent=False)
        # Band of the runtime operators: an output row mixes upscale rows lo and lo + 1, whose
        # nonzeros lie in `band` consecutive inputs from the first nonzero of row lo.
        used = upscale != 0
        first = used.to(torch.int64).argmax(1)
        last = low_res - 1 - used.flip(1).to(torch.int64).argmax(1)
        span = torch.cat([last[1:], last[-1:]]) - first + 1  # row lo to row lo + 1 (or itself)
        self.band = int(span.max())
        self.register_buffer("band_start", first.clamp(max=low_res - self.band), persistent=False)
        self.low_res = low_res

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low_res, iou = self.decode(image_embeddings, point_coords, point_labels, mask_input,
                                   has_mask_input)
        return self.postprocess(low_res, orig_im_size), iou, low_res

    def decode(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
        point_labels: torch.Tensor, mask_input: torch.Tensor, has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 masks' ``1 x 4 x 4g x 4g`` low-res logits and ``1 x 4`` predicted IoUs."""
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        return self.mask_decoder.predict_masks(image_embeddings, self.dense_pe, sparse, dense)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Points and box corners as one token list: the same sums as
        :meth:`PromptEncoder.embed_points` / :meth:`PromptEncoder.embed_boxes`, with the token
        kind read from the label (2 / 3 = box corners) instead of the call."""
        check_point_shapes(coords, labels)
        encoder = self.prompt_encoder
        pe = encoder.pe_layer.forward_with_coords(coords + 0.5, encoder.input_image_size)
        labels = labels[..., None]
        kind = (labels == LABEL_PAD) * encoder.not_a_point_embed.weight
        for label, embedding in enumerate(encoder.point_embeddings):
            kind = kind + (labels == label) * embedding.weight
        return torch.where(labels == LABEL_PAD, 0.0, pe) + kind

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """The mask prompt's embedding, or the "no mask" one: a blend by the 0/1 flag, as a
        graph cannot branch on an input value."""
        encoder = self.prompt_encoder
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * encoder.embed_masks(mask_input) + (1 - has_mask_input) * no_mask

    def postprocess(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """``1 x M x 4g x 4g`` logits -> ``1 x M x H x W``: the separable operators of
        :func:`samkit.modeling.resample.postprocess_operators`, built from runtime sizes and
        applied as bands (each output row / column is a weighted sum of ``band`` gathered
        input rows / columns; the operators' other weights are zero)."""
        original = orig_im_size.to(torch.float64)
        # float64 like Python, so the rounding equals preprocess_shape's int(x * scale + 0.5).
        scale = self.image_size / original.max()
        resized = torch.floor(original * scale + 0.5).to(torch.int64)
        original = original.to(torch.int64)
        row_index, row_weight = self.upscale_band(original[0], resized[0])
        col_index, col_weight = self.upscale_band(original[1], resized[1])
        # Columns first, on the small 4g x W side, as a pass over rows of the transpose:
        # every Gather copies whole rows (gathers along the last axis are slow in wasm).
        picked = low_res.transpose(2, 3).index_select(2, col_index.reshape(-1))
        wide = (picked.unflatten(2, (-1, self.band)) * col_weight[..., None]).sum(3)
        wide = wide.transpose(2, 3)  # 1 x M x 4g x W
        out = wide.index_select(2, row_index[:, 0]) * row_weight[:, :1]
        for k in range(1, self.band):
            out = out + wide.index_select(2, row_index[:, k]) * row_weight[:, k : k + 1]
        return out

    def upscale_band(
        self, out_size: torch.Tensor, in_size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``out x 4g`` operator that upscales to the square, keeps the first ``in_size``
        rows (the unpadded image) and resizes those to ``out_size``, as its band: ``out x
        band`` input indices and float32 weights (zero where the band is wider than a row's
        nonzeros). Bilinear weights as in ``resize_matrix`` (float32 positions, clamped source
        index); each output row mixes two upscale rows, in float64 like the torch side."""
        scale = (in_size.to(torch.float64) / out_size.to(torch.float64)).to(torch.float32)
        src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        lo = torch.minimum(src.to(torch.int64), in_size - 1)
        hi = torch.minimum(lo + 1, in_size - 1)
        frac = (src - lo.to(torch.float32)).clamp(0, 1).to(torch.float64)[:, None]
        index = self.band_start[lo][:, None] + torch.arange(self.band)
        weight = ((1 - frac) * self.upscale[lo[:, None] * self.low_res + index]
                  + frac * self.upscale[hi[:, None] * self.low_res + index])
        return index, weight.to(torch.float32)


class DecoderSelectGraph(DecoderGraph):
    """:class:`DecoderGraph` plus the prompts graph's ``mask_index`` input: only the masks it
    names are upscaled to the original size. The annotation page's graph for mask-prompt
    refinement, which shows one of the four masks: the full-size upscaling of the other
    three is work nobody sees (docs/engine.md profiles a page decode), while ``decoder.onnx``
    keeps the official interface, which upscales all four."""

    def forward(  # type: ignore[override]
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
        point_labels: torch.Tensor, mask_input: torch.Tensor, has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor, mask_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low_res, iou = self.decode(image_embeddings, point_coords, point_labels, mask_input,
                                   has_mask_input)
        masks = self.postprocess(low_res.index_select(1, mask_index), orig_im_size)
        return masks, iou, low_res


class DecoderImageGraph(nn.Module):
    """``1 x C x g x g`` image embedding -> the decoder's shared image-side products under the
    "no mask" dense prompt, in the order of :attr:`product_names`."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.mask_decoder = sam.mask_decoder
        self.prompt_encoder = sam.prompt_encoder
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe(), persistent=False)
            example = torch.zeros(1, sam.prompt_encoder.embed_dim, *self.dense_pe.shape[-2:])
            self.product_names = list(self.fill(example).products)

    def fill(self, image_embeddings: torch.Tensor) -> ImageCache:
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        cache = self.mask_decoder.image_cache(image_embeddings, self.dense_pe, no_mask)
        return self.mask_decoder.fill_image_cache(cache, self.dense_pe)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        products = self.fill(image_embeddings).products
        # contiguous: some products are broadcast views of a vector, graph outputs are not
        return tuple(products[name].contiguous() for name in self.product_names)


class DecoderPromptsGraph(DecoderGraph):
    """:class:`DecoderGraph` without a mask prompt, reading the image side from the products
    of :class:`DecoderImageGraph` instead of the embedding."""

    def __init__(self, sam: Sam, product_names: list[str]) -> None:
        super().__init__(sam)
        self.product_names = product_names
        self.channels = sam.prompt_encoder.embed_dim

    def forward(  # type: ignore[override]
        self, products: tuple[torch.Tensor, ...], point_coords: torch.Tensor,
        point_labels: torch.Tensor, mask_index: torch.Tensor, orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = ImageCache.from_products(dict(zip(self.product_names, products, strict=True)),
                                         self.channels)
        sparse = self.embed_points(point_coords, point_labels)
        low_res, iou = self.mask_decoder.predict_masks(None, self.dense_pe, sparse, None, cache)
        masks = self.postprocess(low_res.index_select(1, mask_index), orig_im_size)
        return masks, iou, low_res


# --- export -------------------------------------------------------------------------------


def export_onnx(
    sam: Sam, out_dir: str | Path, *, model_name: str = "custom", quantize: str | None = None
) -> dict[str, Path]:
    """Write ``encoder.onnx``, ``decoder.onnx``, ``decoder_image.onnx``,
    ``decoder_prompts.onnx`` (and with ``quantize="int8"`` ``*.int8.onnx`` dynamic-quantized
    copies of all but the image-side graph) plus ``samkit_onnx.json`` into ``out_dir``.

    ``sam`` must be a float32 model on the CPU. Returns the written paths by role.
    """
    check_quantize(quantize)
    require_packages(quantize is not None)
    if sam.device.type != "cpu" or sam.pixel_mean.dtype != torch.float32:
        raise SamkitError("ONNX export needs a float32 model on the CPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "encoder": export_encoder(sam, out / ENCODER_FILE, model_name),
        "decoder": export_decoder(sam, out / DECODER_FILE, model_name),
        **export_shared_decoder(sam, out / DECODER_IMAGE_FILE, out / DECODER_PROMPTS_FILE,
                                model_name),
    }
    if quantize == "int8":
        # The image-side graph runs once per image and stays float32 (see docs/onnx.md).
        for role, path in list(paths.items()):
            if path.name in INT8_FILES:
                paths[f"{role}_int8"] = quantize_int8(path, path.with_name(int8_file(path.name)))
    paths["info"] = write_info(sam, out / INFO_FILE, model_name, paths)
    return paths


def export_encoder(sam: Sam, path: Path, model_name: str = "custom") -> Path:
    """Export :class:`EncoderGraph` with a dynamic image height and width."""
    size = sam.image_size
    example = torch.zeros(size * 3 // 4, size, 3, dtype=torch.uint8)
    dims = {0: torch.export.Dim("height", max=size), 1: torch.export.Dim("width", max=size)}
    return _export(
        EncoderGraph(sam), (example,), (dims,), ENCODER_INPUTS, ENCODER_OUTPUTS, path,
        _metadata(sam, model_name, "encoder"),
    )


def export_decoder(sam: Sam, path: Path, model_name: str = "custom",
                   select_masks: bool = False) -> Path:
    """Export :class:`DecoderGraph` with a dynamic number of points and original size; with
    ``select_masks``, :class:`DecoderSelectGraph` (and a dynamic number of masks)."""
    grid = sam.prompt_encoder.image_embedding_size
    low_res = sam.prompt_encoder.mask_input_size
    example: tuple[torch.Tensor, ...] = (
        torch.zeros(1, sam.prompt_encoder.embed_dim, *grid),
        torch.tensor([[[10.0, 20.0], [0.0, 0.0]]]),
        torch.tensor([[1.0, LABEL_PAD]]),
        torch.zeros(1, 1, *low_res),
        torch.zeros(1),
        torch.tensor([480.0, 640.0]),
    )
    points = torch.export.Dim("num_points")
    dynamic: tuple[Any, ...] = (None, {1: points}, {1: points}, None, None, None)
    if not select_masks:
        return _export(
            DecoderGraph(sam), example, dynamic, DECODER_INPUTS, DECODER_OUTPUTS, path,
            _metadata(sam, model_name, "decoder"), {"masks": [1, 4, "height", "width"]},
        )
    return _export(
        DecoderSelectGraph(sam), (*example, torch.tensor([1, 2, 3])),
        (*dynamic, {0: torch.export.Dim("num_masks")}), SELECT_INPUTS, DECODER_OUTPUTS, path,
        _metadata(sam, model_name, "decoder_select"),
        {"mask_index": ["num_masks"], "masks": [1, "num_masks", "height", "width"]},
    )


def export_shared_decoder(
    sam: Sam, image_path: Path, prompts_path: Path, model_name: str = "custom"
) -> dict[str, Path]:
    """Export :class:`DecoderImageGraph` and :class:`DecoderPromptsGraph` (dynamic number of
    points, of masks to upscale, and original size)."""
    image_graph = DecoderImageGraph(sam)
    names = image_graph.product_names
    grid = sam.prompt_encoder.image_embedding_size
    embedding = torch.zeros(1, sam.prompt_encoder.embed_dim, *grid)
    with torch.no_grad():
        products = image_graph(embedding)
    _export(image_graph, (embedding,), None, ENCODER_OUTPUTS, names, image_path,
            _metadata(sam, model_name, "decoder_image"))
    example = (
        list(products),
        torch.tensor([[[10.0, 20.0], [0.0, 0.0]]]),
        torch.tensor([[1.0, LABEL_PAD]]),
        torch.tensor([1, 2, 3]),
        torch.tensor([480.0, 640.0]),
    )
    points = torch.export.Dim("num_points")
    dynamic = ([None] * len(names), {1: points}, {1: points}, {0: torch.export.Dim("num_masks")},
               None)
    _export(
        DecoderPromptsGraph(sam, names), example, dynamic, [*names, *PROMPTS_INPUTS],
        DECODER_OUTPUTS, prompts_path, _metadata(sam, model_name, "decoder_prompts"),
        {"mask_index": ["num_masks"], "masks": [1, "num_masks", "height", "width"]},
    )
    return {"decoder_image": image_path, "decoder_prompts": prompts_path}


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...] | None,
    input_names: list[str],
    output_names: list[str],
    path: Path,
    metadata: dict[str, str],
    dim_names: dict[str, list[int | str]] | None = None,
) -> Path:
    """``torch.onnx.export`` (the torch.export-based exporter) to ``path``, with metadata."""
    modes = {m: m.training for m in module.modules()}  # restored: the caller's model
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(), example, None, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
        )
    for m, training in modes.items():
        m.training = training
    model = program.model
    model.metadata_props.update(metadata)
    if dim_names:
        _name_dims(model.graph, dim_names)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > PROTOBUF_LIMIT
    program.save(str(path), external_data=big)
    return path


def _name_dims(graph: Any, shapes: dict[str, list[int | str]]) -> None:
    """Set the shapes of named graph inputs / outputs: the exporter calls data-dependent sizes
    ``u0``, ``u1`` and some dynamic ones ``s31``; say what they are."""
    import onnx_ir as ir

    for value in [*graph.inputs, *graph.outputs]:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's chatter (notes about torchvision ops, deprecations inside torch),
    which says nothing about this model; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _metadata(sam: Sam, model_name: str, graph: str) -> dict[str, str]:
    return {META_IMAGE_SIZE: str(sam.image_size), META_MODEL: model_name, META_GRAPH: graph}


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantization of the MatMul / Gemm weights (activations are quantized on
    the fly), keeping the graph's metadata.

    Weights use 7 of their 8 bits (``reduce_range``): on CPUs without VNNI (AVX2 only)
    onnxruntime multiplies uint8 activations by int8 weights with an instruction whose int16
    pair sums saturate at full range. Measured on samkit-tiny's decoder (random weights) on an
    AVX2 CPU: mask IoU against fp32 0.772 mean with 8-bit weights, 0.979 with 7-bit."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    # It logs a generic "consider pre-processing" hint on the root logger; measured on these
    # graphs, pre-processing changed neither speed nor masks.
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            src, dst, op_types_to_quantize=INT8_OPS,
            weight_type=getattr(QuantType, INT8_WEIGHT_TYPE), reduce_range=True,
        )
    finally:
        root.setLevel(level)
    source, quantized = onnx.load(str(src), load_external_data=False), onnx.load(str(dst))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    onnx.save(quantized, str(dst))
    return dst


def write_info(sam: Sam, path: Path, model_name: str, paths: dict[str, Path]) -> Path:
    """A small JSON describing the export, for tools that do not read ONNX metadata."""
    info = {
        "format": "samkit-onnx",
        "samkit_version": samkit.__version__,
        "model": model_name,
        "trained": is_trained(sam),
        "image_size": sam.image_size,
        "embedding_size": list(sam.prompt_encoder.image_embedding_size),
        "mask_input_size": list(sam.prompt_encoder.mask_input_size),
        "pixel_mean": [round(v, 4) for v in sam.pixel_mean.flatten().tolist()],
        "pixel_std": [round(v, 4) for v in sam.pixel_std.flatten().tolist()],
        "mask_threshold": sam.mask_threshold,
        "opset": OPSET,
        "encoder_input": "image: h x w x 3 uint8 RGB, resized so max(h, w) == image_size",
        "decoder_inputs": DECODER_INPUTS,
        "decoder_outputs": DECODER_OUTPUTS,
        "decoder_prompts_inputs": ["<decoder_image outputs>", *PROMPTS_INPUTS],
        "files": {role: p.name for role, p in paths.items()},
    }
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise SamkitError(
            f"unknown --quantize {quantize!r}; choose one of: {', '.join(QUANTIZE_CHOICES)}"
        )


def require_packages(quantize: bool) -> None:
    """One clear line when an optional package the export needs is missing."""
    import importlib.util

    needed = [name for name in EXPORT_PACKAGES if quantize or name != "onnxruntime"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        why = ", ".join(f"{name} ({EXPORT_PACKAGES[name]})" for name in missing)
        raise SamkitError(f"ONNX export needs {why}: pip install 'samkit[onnx]'")
