"""One training forward pass: the image encoder on the batch, then the 11-iteration prompt
simulation for all the batch's masks together, and the losses.

It is an ``nn.Module`` wrapping the ``Sam`` so that DistributedDataParallel sees the whole
step as a single forward (the encoder once, the decoder 11 times) and a single backward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from samkit.modeling.sam import Sam
from samkit.train.data import Batch
from samkit.train.losses import LossTerms, LossWeights, prediction_loss
from samkit.train.prompts import (FIRST_PROMPT_KINDS, PAPER_ITERATIONS, MaskRandom, Prediction,
                                  simulate_prompts, to_input_frame)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar with grad: mean over images of the mean over iterations
    metrics: dict[str, torch.Tensor]  # detached scalars: the names in METRICS


class StepTimer:
    """Wall-clock split of a step into encoder and decoder work, forward and backward.

    The backward split is read off a hook on the image embeddings: the gradient reaches them
    once the decoder iterations' backward is done and before the encoder's begins.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if name == "start":
            self.marks = {}
        self.marks[name] = time.perf_counter()

    def shares(self, step_time: float) -> tuple[float, float]:
        """(encoder, decoder) shares of ``step_time`` (the whole step, data wait and
        optimiser included), forward + backward each."""
        m = self.marks
        encoder = m["encoded"] - m["start"]
        decoder = m["decoded"] - m["encoded"]
        if "embedding_grad" in m:  # encoder trained: its backward follows the decoders'
            decoder += m["embedding_grad"] - m["backward"]
            encoder += m["backward_done"] - m["embedding_grad"]
        else:
            decoder += m["backward_done"] - m["backward"]
        return encoder / step_time, decoder / step_time


class TrainStep(nn.Module):
    """``forward(batch, step) -> StepOutput`` for the wrapped ``Sam``; ``seed`` is the run's,
    ``loss_resolution`` the frame of the losses (see ``TrainConfig.loss_resolution``)."""

    def __init__(self, sam: Sam, frozen_encoder: bool, seed: int,
                 loss_resolution: str = "input",
                 prompt_iterations: Sequence[tuple[int, int]] = ((0, PAPER_ITERATIONS),),
                 loss_weights: LossWeights = LossWeights(), box_multimask: bool = True,
                 text_share: float = 0.0, content_dropout: float = 0.0) -> None:
        super().__init__()
        self.sam = sam
        self.frozen_encoder = frozen_encoder
        self.seed = seed
        self.loss_resolution = loss_resolution
        self.prompt_iterations = sorted(tuple(p) for p in prompt_iterations)
        self.loss_weights = loss_weights
        self.box_multimask = box_multimask
        self.text_share = text_share  # App. D.5: share of masks prompted by their crop's CLIP
        # Share of masks decoded, in every iteration, on their image's content-free
        # embedding (its spatial mean): there only the prompt's position can say where the
        # mask is, which trains the decoder's positional path for points (docs/samkit-tiny-runs.md).
        self.content_dropout = content_dropout
        self.timer = StepTimer(sam.device)

    def iterations_at(self, step: int) -> int:
        """Decoder passes of the prompt simulation at ``step``: the ``prompt_iterations``
        entry ``(from_step, iterations)`` with the largest ``from_step <= step``."""
        current = self.prompt_iterations[0][1]
        for from_step, iterations in self.prompt_iterations:
            if step >= from_step:
                current = iterations
        return current

    def embed(self, batch: Batch) -> torch.Tensor:
        """``B x C x e x e`` image embeddings of the batch: from cached stem features when
        the batch carries them, else from the pixels; a frozen stem runs without autograd."""
        sam, encoder = self.sam, self.sam.image_encoder
        trainable = torch.is_grad_enabled() and not self.frozen_encoder
        if batch.features is not None:
            with torch.set_grad_enabled(trainable):
                return encoder.head(*batch.features)
        # Normalise, and zero beyond each image's valid region, as inference pads (collate's
        # padding is 0 in pixels, which normalisation would move off 0): one batched op.
        valid = valid_regions(batch.sizes, sam.image_size).to(batch.images.device)
        x = torch.where(valid[:, None], sam.normalize(batch.images.float()), 0.0)
        if trainable and getattr(encoder, "stem_frozen", False):
            with torch.no_grad():
                features = encoder.stem(x)
            return encoder.head(*features)
        with torch.set_grad_enabled(trainable):
            return encoder(x)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, timed (the step's timer marks all live in this class)."""
        self.timer.mark("backward")
        loss.backward()
        self.timer.mark("backward_done")

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        if self.frozen_encoder:  # frozen means frozen: BN statistics and drop path too
            self.sam.image_encoder.eval()
        return self

    def forward(self, batch: Batch, step: int) -> StepOutput:
        """``step`` (0-based) seeds the one per-step draw of the prompt schedule."""
        sam, size, device = self.sam, self.sam.image_size, batch.images.device
        num_images = len(batch.masks)
        self.timer.mark("start")
        embeddings = self.embed(batch)
        if embeddings.requires_grad:
            embeddings.register_hook(lambda grad: self.timer.mark("embedding_grad"))
        self.timer.mark("encoded")

        # All masks of the batch in the padded frame, with their image's valid region.
        counts = [len(m) for m in batch.masks]
        image_of_mask = torch.repeat_interleave(torch.arange(num_images, device=device),
                                                torch.tensor(counts, device=device))
        gt = torch.cat([F.pad(m, (0, size - w, 0, size - h))
                        for m, (h, w) in zip(batch.masks, batch.sizes.tolist(), strict=False)])
        valid = valid_regions(batch.sizes, size).to(device)[image_of_mask]
        image_pe = sam.prompt_encoder.get_dense_pe()

        # Text prompts (App. D.5): the batch's cached CLIP crop embeddings (NaN rows: masks
        # without one), projected by the text slot once per step for all iterations.
        text_tokens = text_available = None
        if batch.text_embeddings is not None and sam.text_prompt is not None and len(gt):
            clip = torch.cat(batch.text_embeddings).to(device, torch.float)
            text_available = torch.isfinite(clip).all(dim=1)
            text_tokens = sam.text_prompt(torch.nan_to_num(clip, nan=0.0))

        content_free: torch.Tensor | None = None  # M bool, drawn below
        mean_embeddings: torch.Tensor | None = None  # B x C x 1 x 1, with content_free

        def decode(rows, points, labels, boxes, mask_prompt, multimask, text=False):
            sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=boxes,
                                               masks=mask_prompt,
                                               text=text_tokens[rows] if text else None)
            image = embeddings[image_of_mask[rows]]
            if content_free is not None:
                image = torch.where(content_free[rows, None, None, None],
                                    mean_embeddings[image_of_mask[rows]], image)
            return sam.mask_decoder(image, image_pe, sparse, dense, multimask)

        # A zero tied to a trainable parameter: backward (and DDP) still work when no image
        # of the batch has a mask.
        loss = sam.mask_decoder.iou_token.weight.sum() * 0.0
        metrics = dict.fromkeys(METRICS, torch.tensor(float("nan"), device=device))
        if len(gt):
            random = MaskRandom(
                [torch.Generator(device).manual_seed(s) for s in batch.prompt_seeds], counts
            )
            if self.content_dropout:  # drawn first; runs without it keep their prompts
                content_free = random.rand() < self.content_dropout
                mean_embeddings = embeddings.mean(dim=(2, 3), keepdim=True)  # once per image
            schedule = torch.Generator().manual_seed(schedule_seed(self.seed, step))
            predictions = simulate_prompts(decode, gt, valid, random, schedule,
                                           self.iterations_at(step), self.box_multimask,
                                           text_available, self.text_share)
            if self.loss_resolution == "low":
                low = predictions[0].low_res.shape[-1]
                gt_low, valid_low = to_low_res(gt, low), to_low_res(valid, low)
                terms = [prediction_loss(p.low_res, p.iou_pred, gt_low, valid_low,
                                         self.loss_weights) for p in predictions]
            else:
                terms = [checkpoint(input_frame_loss, p.low_res, p.iou_pred, gt, valid,
                                    self.loss_weights, use_reentrant=False)
                         for p in predictions]
            per_mask = torch.stack([t.total for t in terms]).mean(dim=0)  # over iterations
            # Each image weighs the same whatever its mask count; the divisor is the fixed
            # batch size, so DDP's gradient mean over processes is exactly the global mean.
            loss = loss + per_image_mean(per_mask, image_of_mask, num_images).sum() / num_images
            metrics = batch_metrics(terms, predictions[0], image_of_mask, num_images)
        self.timer.mark("decoded")
        return StepOutput(loss, metrics)


METRICS = ("focal", "dice", "iou_mse", "miou", "miou_first", "miou_first_point", "miou_first_box")


def input_frame_loss(low_res: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor,
                     valid: torch.Tensor, weights: LossWeights) -> LossTerms:
    """The loss of low-res logits upsampled to the ``S x S`` input frame.

    Run under activation checkpointing: the ``M x k x S x S`` intermediates (16x the
    low-res size, several per iteration) would otherwise be kept for all 11 iterations;
    recomputing them in backward costs a few elementwise passes.
    """
    return prediction_loss(to_input_frame(low_res, gt.shape[-1]), iou_pred, gt, valid, weights)


def to_low_res(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``M x S x S`` bool -> ``M x s x s`` bool: area-downsampled, then pixels at least half
    covered (the targets of ``loss_resolution="low"``)."""
    return F.interpolate(masks[:, None].float(), (size, size), mode="area")[:, 0] >= 0.5


def schedule_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def valid_regions(sizes: torch.Tensor, size: int) -> torch.Tensor:
    """``B x S x S`` bool: the top-left ``h x w`` image region of each padded input."""
    ys = torch.arange(size)[None, :, None]
    xs = torch.arange(size)[None, None, :]
    return (ys < sizes[:, 0, None, None]) & (xs < sizes[:, 1, None, None])


def per_image_mean(values: torch.Tensor, image_of_mask: torch.Tensor,
                   num_images: int) -> torch.Tensor:
    """Mean of per-mask ``values`` (M) over each image's masks: ``B`` (0 without masks)."""
    sums = values.new_zeros(num_images).index_add(0, image_of_mask, values)
    counts = values.new_zeros(num_images).index_add(0, image_of_mask,
                                                    torch.ones_like(values))
    return sums / counts.clamp(min=1)


def batch_metrics(terms: list[LossTerms], first: Prediction, image_of_mask: torch.Tensor,
                  num_images: int) -> dict[str, torch.Tensor]:
    """Log values, averaged per image then over the images with masks: loss terms averaged
    over the iterations; mIoU of the last iteration, and of the first iteration's mask with
    the highest predicted IoU (what a single click or box gives a user). That first-prompt
    mIoU is also logged apart for the masks prompted by a point and by a box (a plain mean
    over those masks, NaN when the batch has none): the two kinds fit at different rates."""
    rows = torch.arange(len(first.iou_pred), device=first.iou_pred.device)
    first_iou = terms[0].iou[rows, first.iou_pred.argmax(dim=1)].detach()
    per_mask = {
        "focal": torch.stack([t.focal for t in terms]).mean(dim=0),
        "dice": torch.stack([t.dice for t in terms]).mean(dim=0),
        "iou_mse": torch.stack([t.iou_mse for t in terms]).mean(dim=0),
        "miou": terms[-1].iou[:, 0],
        "miou_first": first_iou,
    }
    has_masks = torch.bincount(image_of_mask, minlength=num_images) > 0
    metrics = {k: per_image_mean(v.detach(), image_of_mask, num_images)[has_masks].mean()
               for k, v in per_mask.items()}
    for kind in ("point", "box"):
        metrics[f"miou_first_{kind}"] = first_iou[
            first.first_prompt == FIRST_PROMPT_KINDS.index(kind)].mean()  # NaN if none
    return metrics
