"""Losses against hand-computed values: focal (alpha 0.25, gamma 2), dice, the min over the
multimask outputs, the IoU MSE, and the padding left out."""

from __future__ import annotations

import math

import torch

from samkit.train.losses import (LossWeights, balanced_bce_loss, dice_loss, focal_loss, mask_iou,
                                 prediction_loss)

LN2 = math.log(2)


def px(values: list[float]) -> torch.Tensor:
    """A 1 x 1 x 1 x N "image" (one mask, one output)."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_focal_loss_hand_computed() -> None:
    ones = px([1.0])
    # p = 0.5: ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25 (positive) or 0.75 (negative).
    assert torch.allclose(focal_loss(px([0.0]), px([1.0]), ones), torch.tensor(0.25 * 0.25 * LN2))
    assert torch.allclose(focal_loss(px([0.0]), px([0.0]), ones), torch.tensor(0.75 * 0.25 * LN2))
    # logit ln 3 -> p = 0.75 on a positive: ce = ln(4/3), (1 - 0.75)^2 = 1/16.
    expected = 0.25 * math.log(4 / 3) / 16
    assert torch.allclose(focal_loss(px([math.log(3)]), px([1.0]), ones), torch.tensor(expected))
    # Mean over valid pixels only: the second pixel (huge loss) is padding.
    loss = focal_loss(px([0.0, -20.0]), px([1.0, 1.0]), px([1.0, 0.0]))
    assert torch.allclose(loss, torch.tensor(0.25 * 0.25 * LN2))


def test_dice_loss_hand_computed() -> None:
    # p = (0.5, 0.5), t = (1, 0): 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3.
    assert torch.allclose(dice_loss(px([0.0, 0.0]), px([1.0, 0.0]), px([1.0, 1.0])),
                          torch.tensor(1 / 3))
    # A confident, correct prediction: ~0; an empty target predicted empty: ~0.
    assert dice_loss(px([30.0, -30.0]), px([1.0, 0.0]), px([1.0, 1.0])) < 1e-6
    assert dice_loss(px([-30.0, -30.0]), px([0.0, 0.0]), px([1.0, 1.0])) < 1e-6
    # A padded pixel predicted foreground does not count.
    assert dice_loss(px([30.0, 30.0]), px([1.0, 0.0]), px([1.0, 0.0])) < 1e-6


def test_mask_iou() -> None:
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).view(1, 2, 1, 4)
    gt = torch.tensor([1, 0, 1, 0], dtype=torch.bool).view(1, 1, 1, 4)
    assert torch.allclose(mask_iou(pred, gt), torch.tensor([[1 / 3, 0.0]]))


def test_multimask_takes_the_min_and_iou_head_supervises_all_outputs() -> None:
    gt = torch.tensor([[[True, True, False, False]]])  # 1 x 1 x 4
    valid = torch.ones_like(gt)
    big = 30.0
    logits = torch.tensor([
        [big, big, -big, -big],  # perfect: IoU 1
        [big, -big, -big, -big],  # half: IoU 0.5
        [-big, -big, big, big],  # wrong: IoU 0
    ]).view(1, 3, 1, 4).requires_grad_()
    iou_pred = torch.tensor([[0.2, 0.2, 0.2]], requires_grad=True)
    terms = prediction_loss(logits, iou_pred, gt, valid)
    assert torch.allclose(terms.iou, torch.tensor([[1.0, 0.5, 0.0]]))
    expected_mse = (0.8**2 + 0.3**2 + 0.2**2) / 3
    assert torch.allclose(terms.iou_mse, torch.tensor([expected_mse]))
    # The perfect output has ~0 mask loss and is the one selected.
    assert terms.focal.item() < 1e-6 and terms.dice.item() < 1e-6
    assert torch.allclose(terms.total, torch.tensor([expected_mse]), atol=1e-6)
    terms.total.sum().backward()
    assert logits.grad[0, 1:].abs().sum() == 0  # only the lowest-loss mask gets gradient
    assert (iou_pred.grad != 0).all()  # every IoU prediction is supervised


def test_single_output_combines_focal_20_dice_1_iou_1() -> None:
    gt = torch.tensor([[[True, False]]])
    logits = torch.zeros(1, 1, 1, 2)
    iou_pred = torch.tensor([[0.2]])
    terms = prediction_loss(logits, iou_pred, gt, torch.ones_like(gt))
    focal = (0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2) / 2
    dice = 1 / 3
    iou = 0.0  # logit 0 is not > 0: the predicted mask is empty
    expected = 20 * focal + dice + (0.2 - iou) ** 2
    assert torch.allclose(terms.total, torch.tensor([expected]))


def test_padding_does_not_change_the_loss() -> None:
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, 1:4, 1:5] = True
    valid = torch.zeros_like(gt)
    valid[:, :6, :7] = True
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    iou_pred = torch.rand(2, 3)
    a = prediction_loss(logits, iou_pred, gt, valid)
    noisy = logits.clone()
    noisy[..., 6:, :] = 100.0
    noisy[..., :, 7:] = -100.0
    b = prediction_loss(noisy, iou_pred, gt, valid)
    assert torch.allclose(a.total, b.total) and torch.equal(a.iou, b.iou)


def test_balanced_bce_hand_computed() -> None:
    # Logit 0 everywhere: ln 2 on each half, whatever the object's size.
    for fg in (1, 3):
        target = px([1.0] * fg + [0.0] * (8 - fg))
        loss = balanced_bce_loss(px([0.0] * 8), target, px([1.0] * 8))
        assert torch.allclose(loss, torch.tensor(LN2))
    # Foreground logit ln 3 (ce ln 4/3), background -ln 3 (ce ln 4/3), a padded pixel ignored.
    loss = balanced_bce_loss(px([math.log(3), -math.log(3), 50.0]), px([1.0, 0.0, 0.0]),
                             px([1.0, 1.0, 0.0]))
    assert torch.allclose(loss, torch.tensor(math.log(4 / 3)))
    # No foreground: the background half alone.
    assert torch.allclose(balanced_bce_loss(px([0.0, 0.0]), px([0.0, 0.0]), px([1.0, 1.0])),
                          torch.tensor(LN2 / 2))


def test_balanced_bce_pulls_a_small_object_as_hard_as_a_large_one() -> None:
    """An output confidently empty on the object: the foreground gradient from focal + dice
    shrinks with the object's area, the balanced term's total pull does not."""
    def pull(area: int, weights: LossWeights) -> float:
        gt = torch.zeros(1, 1, 64, dtype=torch.bool)
        gt[..., :area] = True
        logits = torch.full((1, 1, 1, 64), -6.0, requires_grad=True)
        prediction_loss(logits, torch.zeros(1, 1), gt, torch.ones_like(gt),
                        weights).total.sum().backward()
        return -logits.grad[..., :area].sum().item()  # > 0: pushes the object's logits up

    paper, balanced = LossWeights(), LossWeights(balanced_bce=1.0)
    assert pull(2, paper) < 0.1 * pull(32, paper)
    extra_small = pull(2, balanced) - pull(2, paper)
    extra_large = pull(32, balanced) - pull(32, paper)
    assert math.isclose(extra_small, extra_large, rel_tol=0.01) and extra_small > 0.4
    # Off by default: the paper's loss unchanged.
    assert LossWeights().balanced_bce == 0.0
