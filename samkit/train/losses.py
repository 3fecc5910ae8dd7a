"""Mask and IoU losses (paper §3 "Losses and training").

* Mask loss = 20 x focal + 1 x dice (the paper's 20:1 ratio, after DETR). Focal loss uses
  the RetinaNet defaults (gamma = 2, alpha = 0.25): the paper cites focal loss [65] and
  DETR-style training without giving alpha/gamma, and these are the values of the reference
  implementations it builds on (RetinaNet, DETR/MaskFormer ``sigmoid_focal_loss``).
* With 3 ambiguity outputs only the lowest mask loss is back-propagated ("we only
  backpropagate from the lowest loss", §3), so the model may spread valid answers over them.
* The IoU head is trained with MSE between each predicted IoU and the true IoU of the
  corresponding thresholded mask with the ground truth, for *all* outputs (the paper
  supervises the IoU prediction of every mask; that is what ranks the 3 at inference).
* Optional (``LossWeights.balanced_bce``, off by default: not in the paper): a class-balanced
  BCE, the mean cross-entropy over a mask's foreground pixels plus the mean over its
  background, halved (HED's balancing, Xie & Tu 2015). Focal and soft dice give a small
  object almost no pull once an output is confidently empty there: focal's mean is over all
  pixels, so its foreground share scales with the object's area, and dice's gradient goes
  through the sigmoid's vanishing slope. The balanced term's foreground half weighs the same
  for every object size.

Resolution: the low-res logits (4 x the embedding grid, e.g. 256^2 for 1024 px) are
upsampled to the padded ``S x S`` input frame and compared with the full-resolution ground
truth; the padding is masked out of every term (``valid``). Downsampling the ground truth
instead would be 16x cheaper but turns sharp edges and thin structures into soft targets;
the upsampled logits are exactly what inference thresholds, so the loss sees what users
see. The cost is memory, which ``samkit.train.step`` removes with activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class LossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    balanced_bce: float = 0.0


@dataclass
class LossTerms:
    """Loss of one prediction, per mask (``M``); only ``total`` carries gradients."""

    total: torch.Tensor  # M: mask loss of the selected output + weighted IoU MSE
    focal: torch.Tensor  # M, of the selected output
    dice: torch.Tensor  # M, of the selected output
    iou_mse: torch.Tensor  # M, mean over all outputs
    iou: torch.Tensor  # M x k true IoU of each output


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over the valid pixels.

    ``logits`` ``M x k x H x W``; ``target`` and ``valid`` ``M x 1 x H x W`` (0/1 float)
    -> ``M x k``.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * ce * (1 - p_t) ** gamma * valid
    return loss.flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft dice ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` over the valid pixels,
    with p = sigmoid(logits).

    The +1 (as in DETR) keeps an empty prediction of an empty target at loss 0 and the
    gradient finite. ``M x k x H x W`` and ``M x 1 x H x W`` -> ``M x k``.
    """
    prob = (logits.sigmoid() * valid).flatten(2)
    target = target.flatten(2)
    numerator = 2 * (prob * target).sum(-1) + 1
    denominator = prob.sum(-1) + target.sum(-1) + 1
    return 1 - numerator / denominator


def balanced_bce_loss(logits: torch.Tensor, target: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """``(mean BCE over the foreground + mean BCE over the valid background) / 2``; a mask
    without foreground pixels gets its background half only. ``M x k x H x W`` logits,
    ``M x 1 x H x W`` target and valid (0/1 float) -> ``M x k``."""
    ce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    foreground, background = target * valid, (1 - target) * valid
    fg = (ce * foreground).flatten(2).sum(-1) / foreground.flatten(2).sum(-1).clamp(min=1)
    bg = (ce * background).flatten(2).sum(-1) / background.flatten(2).sum(-1).clamp(min=1)
    return (fg + bg) / 2


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks ``M x k x H x W`` vs ``M x 1 x H x W`` -> ``M x k`` (1 if both empty)."""
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)


def prediction_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> LossTerms:
    """Loss of one iteration's prediction; the padding (outside ``valid``) is ignored.

    Args:
        logits: ``M x k x H x W`` mask logits in the padded input frame.
        iou_pred: ``M x k`` predicted IoUs.
        gt: ``M x H x W`` bool ground truth (false outside ``valid``).
        valid: ``M x H x W`` bool, the image region of each mask's image.
    """
    logits = logits.float()  # the loss is always computed in fp32, also under bf16 autocast
    target = gt[:, None].float()
    inside = valid[:, None]
    focal = focal_loss(logits, target, inside.float())
    dice = dice_loss(logits, target, inside.float())
    combined = weights.focal * focal + weights.dice * dice  # M x k
    if weights.balanced_bce:
        combined = combined + weights.balanced_bce * balanced_bce_loss(logits, target,
                                                                       inside.float())
    best = combined.detach().argmin(dim=1, keepdim=True)  # the min over the ambiguity outputs
    with torch.no_grad():
        iou = mask_iou((logits > 0) & inside, gt[:, None])
    iou_mse = ((iou_pred.float() - iou) ** 2).mean(dim=1)
    return LossTerms(
        total=combined.gather(1, best)[:, 0] + weights.iou * iou_mse,
        focal=focal.gather(1, best)[:, 0].detach(),
        dice=dice.gather(1, best)[:, 0].detach(),
        iou_mse=iou_mse.detach(),
        iou=iou,
    )
