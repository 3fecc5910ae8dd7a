"""Interactive prompt simulation for training (paper §3 "Losses and training", App. A
"Training algorithm").

For every ground-truth mask of a batch, :func:`simulate_prompts` plays an interactive
annotation session against the model and returns its 11 predictions:

* iteration 0: a foreground point sampled uniformly in the mask, or the mask's bounding box
  with Gaussian noise on each coordinate (std = 10% of the box side, at most 20 px in the
  paper's 1024-px frame, i.e. scaled with the input size), with equal probability; the
  decoder gives 3 masks (ambiguity-aware multimask output). With text prompts on (App. D.5,
  ``text_share``), a mask that has a CLIP embedding of its crop starts from that instead, with
  probability ``text_share``, and keeps it through the session ("we supply the CLIP-based
  prompt first, followed by additional iterative point prompts");
* 8 iterations that each add one point sampled uniformly from the error region of the
  previous prediction (thresholded at 0 vs the ground truth): a false-negative pixel becomes
  a foreground point (label 1), a false-positive pixel a background point (label 0);
* 2 iterations that add no point, one inserted at a random place among the 8 and one at the
  end, so the model learns to refine from its own mask;
* from iteration 1 on, the previous iteration's unthresholded low-res logits (of the mask
  with the highest predicted IoU) are the mask prompt, and the decoder gives its single
  output (token 0) since the prompt is no longer ambiguous.

Gradients: the loss of every iteration is back-propagated, but the mask prompt handed to the
next iteration is detached (as are the sampled points, which are not differentiable anyway).
This keeps each iteration's graph independent, so memory grows linearly with the iterations
instead of back-propagating through an 11-deep recurrence; the paper does not say otherwise.

All masks of a batch are simulated together (one decoder call per prompt kind and
iteration), each in the padded ``S x S`` input frame with its image's valid region. Every
random draw for a mask comes from its own image's generator, so a mask's prompts do not
depend on which images share its batch or process (1 process with batch 2 gives exactly the
prompts of 2 processes with batch 1). The position of the inserted mask-only iteration is
one draw per step, shared by the batch (``schedule_generator``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samkit.modeling.prompt_encoder import LABEL_FOREGROUND, LABEL_PAD

NUM_POINT_ITERATIONS = 8
PAPER_ITERATIONS = NUM_POINT_ITERATIONS + 3  # the first prompt, 8 points, 2 mask-only
BOX_NOISE_FRACTION = 0.1  # std of each coordinate's noise, as a fraction of the box side
BOX_NOISE_CAP_PX = 20.0  # in the paper's frame ...
PAPER_INPUT_SIZE = 1024  # ... which is 1024 px

# (rows R: which of the M masks, points R x P x 2, labels R x P, boxes R x 4 or None,
#  mask prompt R x 1 x 4e x 4e or None, multimask)
#   -> (low-res logits R x k x 4e x 4e, IoU predictions R x k), k = 3 or 1.
# With text prompts on, it is also called with ``text=True`` for the rows prompted by their
# text token (the decoder looks the rows' tokens up itself).
Decoder = Callable[..., tuple[torch.Tensor, torch.Tensor]]

FIRST_PROMPT_KINDS = ("point", "box", "text")


@dataclass
class Prediction:
    """One iteration's output for the M masks (k = 3 if ``multimask`` else 1)."""

    low_res: torch.Tensor  # M x k x 4e x 4e logits (e = embedding grid, S / 16)
    iou_pred: torch.Tensor  # M x k
    multimask: bool
    kind: str  # "prompt" (iteration 0), "point" (added a point) or "mask" (mask prompt only)
    points: torch.Tensor  # M x P x 2 (x, y) error points added so far (for inspection/tests)
    labels: torch.Tensor  # M x P
    first_prompt: torch.Tensor  # M long: the session's first prompt, FIRST_PROMPT_KINDS index
    first_points: torch.Tensor  # M x 2 (x, y): the first click (used where first_prompt is one)
    boxes: torch.Tensor  # M x 4 XYXY: the noisy box (used where first_prompt is one)


class MaskRandom:
    """Random draws for M masks, each from the generator of the image it belongs to."""

    def __init__(self, generators: Sequence[torch.Generator], counts: Sequence[int]) -> None:
        self.generators = list(generators)
        self.counts = list(counts)

    def rand(self, *shape: int) -> torch.Tensor:
        """``M x *shape`` uniform in [0, 1)."""
        return torch.cat([torch.rand(n, *shape, generator=g, device=g.device)
                          for g, n in zip(self.generators, self.counts, strict=False)])

    def randn(self, *shape: int) -> torch.Tensor:
        """``M x *shape`` standard normal."""
        return torch.cat([torch.randn(n, *shape, generator=g, device=g.device)
                          for g, n in zip(self.generators, self.counts, strict=False)])


def simulate_prompts(
    decode: Decoder,
    gt: torch.Tensor,
    valid: torch.Tensor,
    random: MaskRandom,
    schedule_generator: torch.Generator,
    num_iterations: int = PAPER_ITERATIONS,
    box_multimask: bool = True,
    text_available: torch.Tensor | None = None,
    text_share: float = 0.0,
) -> list[Prediction]:
    """Run the paper's 11-iteration interactive session for ``gt``: ``M x S x S`` bool masks
    in the padded input frame, false outside ``valid`` (``M x S x S``, each mask's image).
    ``num_iterations`` shortens it (see :func:`iteration_schedule`). With ``box_multimask``
    off, a first prompt that is a box trains the single output (token 0, what box prompts
    are answered with at inference, e.g. the box protocol of ``samkit eval points``); its
    mask stands in for all 3 so the batch keeps one layout. ``text_available`` (``M`` bool):
    the masks that have a text token; each starts from it with probability ``text_share``
    (drawn after the other first-prompt draws, so runs without text are unchanged)."""
    m, size = gt.shape[0], gt.shape[-1]
    rows = torch.arange(m, device=gt.device)

    # Iteration 0's prompt: a foreground point or a noisy box, each with probability 1/2.
    use_box = random.rand() < 0.5
    first_point, _ = sample_uniform(gt, random)
    cap = BOX_NOISE_CAP_PX * size / PAPER_INPUT_SIZE
    boxes = noisy_boxes(mask_boxes(gt), valid_extent(valid), random, cap)
    use_text = None
    if text_available is not None:
        use_text = text_available & (random.rand() < text_share)
    first_prompt = use_box.long()
    if use_text is not None:
        first_prompt = torch.where(use_text, FIRST_PROMPT_KINDS.index("text"), first_prompt)

    # Error points added later (the same layout for both prompt kinds): M x P x 2 and M x P.
    points = torch.zeros(m, 0, 2, device=gt.device)
    labels = torch.zeros(m, 0, dtype=torch.long, device=gt.device)
    mask_prompt: torch.Tensor | None = None
    previous = torch.zeros_like(gt)  # the last prediction thresholded at 0, M x S x S

    predictions = []
    for kind in iteration_schedule(num_iterations, schedule_generator):
        if kind == "point":
            new_point, new_label = sample_error_points(previous, gt, valid, random)
            points = torch.cat([points, new_point[:, None]], dim=1)
            labels = torch.cat([labels, new_label[:, None]], dim=1)
        multimask = kind == "prompt"
        low_res, iou_pred = decode_mixed(
            decode, use_box, first_point, boxes, points, labels, mask_prompt, multimask,
            box_multimask, use_text,
        )
        predictions.append(Prediction(low_res, iou_pred, multimask, kind, points, labels,
                                      first_prompt, first_point, boxes))

        # Feed the best mask (by predicted IoU) back, unthresholded and detached; its
        # thresholded upsampling is where the next error point comes from.
        best = iou_pred.argmax(dim=1)
        mask_prompt = low_res[rows, best][:, None].detach()
        previous = to_input_frame(mask_prompt, size)[:, 0] > 0
    return predictions


def iteration_schedule(num_iterations: int, generator: torch.Generator) -> list[str]:
    """The kinds of the ``num_iterations`` decoder passes of one session.

    11 (the paper): ``["prompt", <8 "point"s with one "mask" inserted at a random place
    among them>, "mask"]``; in general ``n >= 4`` gives ``n - 3`` points and the two
    mask-only passes. Shorter sessions train the first prompt and the first corrections at
    a fraction of the cost (``TrainConfig.prompt_iterations``): ``n <= 3`` is the first
    prompt and ``n - 1`` error points (each point pass also gets the previous mask as its
    mask prompt, as later clicks do at inference).
    """
    if num_iterations < 1:
        raise ValueError(f"a session has at least 1 iteration, got {num_iterations}")
    if num_iterations <= 3:
        return ["prompt"] + ["point"] * (num_iterations - 1)
    middle = ["point"] * (num_iterations - 3)
    slot = int(torch.randint(0, len(middle) + 1, (1,), generator=generator).item())
    middle.insert(slot, "mask")
    return ["prompt", *middle, "mask"]


def sample_uniform(region: torch.Tensor, random: MaskRandom) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """One pixel uniformly from each ``M x H x W`` bool region: ``(x, y)`` coords ``M x 2``
    (float) and ``M`` bool "region was non-empty" (coords are (0, 0) where it was empty).

    The argmax of i.i.d. uniform scores over the region is a uniform draw from it.
    """
    m, h, w = region.shape
    scores = random.rand(h, w)
    flat = torch.where(region, scores, -1.0).view(m, -1).argmax(dim=1)
    found = region.view(m, -1).any(dim=1)
    coords = torch.stack([flat % w, flat // w], dim=1).float()
    return coords * found[:, None], found


def sample_error_points(
    prediction: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, random: MaskRandom
) -> tuple[torch.Tensor, torch.Tensor]:
    """A point uniformly from the error region ``(prediction xor gt) and valid`` of each mask.

    Returns coords ``M x 2`` and labels ``M``: 1 (foreground) on a false negative, 0
    (background) on a false positive, and -1 (the prompt encoder's "not a point") when the
    prediction is already perfect, which adds no information.
    """
    coords, found = sample_uniform((prediction ^ gt) & valid, random)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    labels = gt[torch.arange(len(gt), device=gt.device), y, x].long()  # 1 = missed foreground
    return coords, torch.where(found, labels, LABEL_PAD)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive pixel coords) of ``M x H x W`` non-empty masks: ``M x 4``."""
    _, h, w = masks.shape
    cols = masks.any(dim=1)  # M x W
    rows = masks.any(dim=2)  # M x H
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1)
    y1 = torch.where(rows, ys, h).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def valid_extent(valid: torch.Tensor) -> torch.Tensor:
    """``M x 2`` (width, height) of each mask's top-left valid region ``M x S x S``."""
    return torch.stack([valid[:, 0].sum(dim=1), valid[:, :, 0].sum(dim=1)], dim=1).float()


def noisy_boxes(boxes: torch.Tensor, extent: torch.Tensor, random: MaskRandom,
                cap_px: float) -> torch.Tensor:
    """Add Gaussian noise to each XYXY coordinate with std = 10% of that axis' box side,
    capped at ``cap_px``; then clip to the image (``extent`` ``M x 2`` = width, height) and
    keep x1 <= x2, y1 <= y2."""
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    side = torch.stack([width, height, width, height], dim=1)
    std = (BOX_NOISE_FRACTION * side).clamp(max=cap_px)
    noisy = boxes + random.randn(4) * std
    upper = (extent - 1).repeat(1, 2)  # x, y, x, y
    noisy = torch.minimum(noisy.clamp(min=0), upper)
    x1, x2 = torch.minimum(noisy[:, 0], noisy[:, 2]), torch.maximum(noisy[:, 0], noisy[:, 2])
    y1, y2 = torch.minimum(noisy[:, 1], noisy[:, 3]), torch.maximum(noisy[:, 1], noisy[:, 3])
    return torch.stack([x1, y1, x2, y2], dim=1)


def decode_mixed(
    decode: Decoder,
    use_box: torch.Tensor,
    first_point: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    mask_prompt: torch.Tensor | None,
    multimask: bool,
    box_multimask: bool = True,
    use_text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode masks whose first prompt was a box and masks whose first prompt was a point
    (and, with ``use_text``, masks whose first prompt is their text token).

    The groups have different token layouts (box corners + points, vs points + the
    "not a point" pad the official model expects without a box, vs error points + the pad
    carrying the text), so they are decoded in separate batched calls and put back in the
    original order.
    """
    outputs, order = [], []
    if use_text is not None:
        rows = use_text.nonzero()[:, 0]
        if len(rows):
            outputs.append(decode(rows, points[rows], labels[rows], None,
                                  mask_prompt[rows] if mask_prompt is not None else None,
                                  multimask, text=True))
            order.append(rows)
    for box_group in (True, False):
        group = use_box == box_group
        if use_text is not None:
            group = group & ~use_text
        rows = group.nonzero()[:, 0]
        if len(rows) == 0:
            continue
        group_points, group_labels = points[rows], labels[rows]
        if not box_group:
            group_points = torch.cat([first_point[rows, None], group_points], dim=1)
            # One label per row: the error-point labels may have no column yet (iteration
            # 0), and a label tensor shaped from them would be M x 0, which the prompt
            # encoder refuses (it used to broadcast the pad label over the click).
            foreground = torch.full((len(rows), 1), LABEL_FOREGROUND, dtype=labels.dtype,
                                    device=labels.device)
            group_labels = torch.cat([foreground, group_labels], dim=1)
        outputs.append(decode(
            rows,
            group_points,
            group_labels,
            boxes[rows] if box_group else None,
            mask_prompt[rows] if mask_prompt is not None else None,
            multimask and (box_multimask or not box_group),
        ))
        if multimask and box_group and not box_multimask:  # 1 output standing in for 3
            low, iou = outputs[-1]
            outputs[-1] = (low.expand(-1, 3, -1, -1), iou.expand(-1, 3))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    low_res = torch.cat([o[0] for o in outputs])[inverse]
    iou_pred = torch.cat([o[1] for o in outputs])[inverse]
    return low_res, iou_pred


def to_input_frame(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """``M x k x 4e x 4e`` logits -> ``M x k x S x S``, bilinear to the padded input frame
    exactly as ``Sam.postprocess_masks`` does first (the frame of the losses and of the
    error regions)."""
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
