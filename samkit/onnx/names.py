"""What an exported samkit ONNX folder holds: file names, graph metadata keys, input and
output names. The contract between the exporter (:mod:`samkit.onnx.export`, which needs
torch) and :class:`~samkit.onnx.predictor.OnnxSamPredictor` (which needs only onnxruntime).
"""

from __future__ import annotations

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_IMAGE_FILE = "decoder_image.onnx"
DECODER_PROMPTS_FILE = "decoder_prompts.onnx"
# decoder.onnx's graph with the prompts graph's mask_index: the annotation page's graph for
# mask-prompt refinement (samkit.engine.web_decoder); not part of an export-onnx folder.
DECODER_SELECT_FILE = "decoder_select.onnx"
INT8_SUFFIX = ".int8.onnx"
# The graphs that get a dynamic int8 copy (``--quantize int8``, and the page's int8 variant):
# all but the image-side decoder graph, which runs once per image and whose outputs feed
# every prompt.
INT8_FILES = (ENCODER_FILE, DECODER_FILE, DECODER_PROMPTS_FILE, DECODER_SELECT_FILE)
INFO_FILE = "samkit_onnx.json"
# Stored in each graph's metadata, so a predictor needs nothing but the two .onnx files.
META_IMAGE_SIZE = "samkit.image_size"
META_MODEL = "samkit.model"
META_GRAPH = "samkit.graph"
ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_INPUTS = [
    "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
    "orig_im_size",
]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]
PROMPTS_INPUTS = ["point_coords", "point_labels", "mask_index", "orig_im_size"]
SELECT_INPUTS = [*DECODER_INPUTS, "mask_index"]
# Point label values the decoder graphs take, as the prompt encoder's (samkit.modeling,
# which needs torch; tests/test_onnx.py checks they agree): padding and the box corners.
LABEL_PAD = -1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3


def int8_file(name: str) -> str:
    """The file name of graph ``name``'s int8 copy (``decoder.onnx`` -> ``decoder.int8.onnx``)."""
    return name.removesuffix(".onnx") + INT8_SUFFIX
