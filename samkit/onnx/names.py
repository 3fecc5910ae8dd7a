"""What an exported samkit ONNX folder holds: file names, graph metadata keys, input and
output names. The contract between the exporter (:mod:`samkit.onnx.export`, which needs
torch) and :class:`~samkit.onnx.predictor.OnnxSamPredictor` (which needs only onnxruntime).
"""

from __future__ import annotations

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_IMAGE_FILE = "decoder_image.onnx"
DECODER_PROMPTS_FILE = "decoder_prompts.onnx"
INT8_SUFFIX = ".int8.onnx"
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
# Point label values the decoder graphs take, as the prompt encoder's (samkit.modeling,
# which needs torch; tests/test_onnx.py checks they agree): padding and the box corners.
LABEL_PAD = -1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3
