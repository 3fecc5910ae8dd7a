"""Prompt simulator (paper App. A): error-region points, the 11-iteration schedule,
multimask at iteration 0 only, detached mask prompts, box noise, per-image randomness."""

from __future__ import annotations

import pytest
import torch

from samkit.train.prompts import (
    BOX_NOISE_CAP_PX,
    FIRST_PROMPT_KINDS,
    PAPER_INPUT_SIZE,
    MaskRandom,
    iteration_schedule,
    mask_boxes,
    noisy_boxes,
    sample_error_points,
    simulate_prompts,
)

S = 32


def rand_for(m: int, seed: int = 0) -> MaskRandom:
    return MaskRandom([torch.Generator().manual_seed(seed)], [m])


def full_valid(m: int, h: int = S, w: int = S) -> torch.Tensor:
    valid = torch.zeros(m, S, S, dtype=torch.bool)
    valid[:, :h, :w] = True
    return valid


def test_error_points_foreground_in_false_negatives_background_in_false_positives() -> None:
    m = 400
    gt = torch.zeros(m, S, S, dtype=torch.bool)
    gt[:, 4:20, 4:20] = True
    pred = torch.zeros_like(gt)
    pred[:, 10:26, 10:26] = True  # overlaps gt: FN = gt - pred, FP = pred - gt
    pred[:, :, 28:] = True  # a false positive in the padding must never be sampled
    valid = full_valid(m, w=28)
    coords, labels = sample_error_points(pred, gt, valid, rand_for(m))
    x, y = coords[:, 0].long(), coords[:, 1].long()
    fn = (gt & ~pred)[0]
    fp = (pred & ~gt & valid)[0]
    assert set(labels.tolist()) == {0, 1}
    assert fn[y[labels == 1], x[labels == 1]].all()
    assert fp[y[labels == 0], x[labels == 0]].all()
    # Uniform over the union: the share of FN points matches the FN share of the region.
    share = fn.sum() / (fn.sum() + fp.sum())
    assert abs((labels == 1).float().mean() - share) < 0.08


def test_perfect_prediction_adds_a_padding_point() -> None:
    gt = torch.zeros(3, S, S, dtype=torch.bool)
    gt[:, 5:9, 5:9] = True
    _, labels = sample_error_points(gt.clone(), gt, full_valid(3), rand_for(3))
    assert labels.tolist() == [-1, -1, -1]


def test_schedule_has_11_iterations_two_mask_only_one_at_the_end() -> None:
    slots = set()
    for seed in range(200):
        kinds = iteration_schedule(11, torch.Generator().manual_seed(seed))
        assert len(kinds) == 11
        assert kinds[0] == "prompt" and kinds[-1] == "mask"
        assert kinds.count("point") == 8 and kinds.count("mask") == 2
        slots.add(kinds.index("mask"))
    assert slots == set(range(1, 10))  # the inserted one lands anywhere among the 8


def test_shorter_sessions_for_cheap_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    assert iteration_schedule(1, gen) == ["prompt"]
    assert iteration_schedule(2, gen) == ["prompt", "point"]
    assert iteration_schedule(3, gen) == ["prompt", "point", "point"]
    four = iteration_schedule(4, gen)
    assert four[0] == "prompt" and four[-1] == "mask" and sorted(four[1:3]) == ["mask", "point"]
    with pytest.raises(ValueError):
        iteration_schedule(0, gen)


def test_step_follows_the_prompt_iterations_schedule() -> None:
    from samkit.build import build_sam_from_config
    from samkit.registry import get_config
    from samkit.train.step import TrainStep

    sam = build_sam_from_config(get_config("vit_t"))
    step = TrainStep(sam, True, 0, prompt_iterations=[[0, 1], [100, 4], [300, 11]])
    assert [step.iterations_at(s) for s in (0, 99, 100, 299, 300, 10**6)] == [1, 1, 4, 4, 11, 11]


def test_box_noise_std_is_10_percent_of_side_capped() -> None:
    n = 4000
    size = PAPER_INPUT_SIZE
    # Boxes of side 50 (std 5) and 600 (std capped at 20), far from the image border.
    sides = torch.tensor([50.0, 600.0]).repeat_interleave(n // 2)
    x1 = torch.full((n,), 200.0)
    boxes = torch.stack([x1, x1, x1 + sides - 1, x1 + sides - 1], dim=1)
    extent = torch.full((n, 2), float(size))
    noisy = noisy_boxes(boxes, extent, rand_for(n), BOX_NOISE_CAP_PX)
    for half, expected in ((slice(0, n // 2), 5.0), (slice(n // 2, n), 20.0)):
        std = (noisy[half] - boxes[half]).std(dim=0)
        assert torch.allclose(std, torch.full((4,), expected), rtol=0.08), std
    assert ((noisy - boxes).abs().amax(dim=0) < 6 * 20).all()


def test_noisy_boxes_stay_inside_the_image_and_ordered() -> None:
    n = 500
    boxes = torch.tensor([[0.0, 0.0, 9.0, 5.0]]).repeat(n, 1)
    extent = torch.tensor([[12.0, 8.0]]).repeat(n, 1)
    noisy = noisy_boxes(boxes, extent, rand_for(n), 20.0)
    assert (noisy >= 0).all() and (noisy[:, [0, 2]] <= 11).all() and (noisy[:, [1, 3]] <= 7).all()
    assert (noisy[:, 0] <= noisy[:, 2]).all() and (noisy[:, 1] <= noisy[:, 3]).all()


def test_mask_boxes_are_tight_inclusive() -> None:
    masks = torch.zeros(1, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert mask_boxes(masks).tolist() == [[3.0, 2.0, 8.0, 4.0]]


class RecordingDecoder:
    """Stands in for prompt encoder + mask decoder: logits from one learnable scalar."""

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.calls: list[dict] = []

    def __call__(self, rows, points, labels, boxes, mask_prompt, multimask):
        self.calls.append({"rows": rows.clone(), "points": points.clone(),
                           "labels": labels.clone(), "boxes": boxes,
                           "mask_prompt": mask_prompt, "multimask": multimask})
        k = 3 if multimask else 1
        logits = self.weight * torch.randn(len(rows), k, S // 4, S // 4)
        return logits, torch.rand(len(rows), k)


def simulate(m: int = 6, seed: int = 0):
    gt = torch.zeros(m, S, S, dtype=torch.bool)
    gt[:, 8:20, 6:24] = True
    decoder = RecordingDecoder()
    preds = simulate_prompts(decoder, gt, full_valid(m), rand_for(m, seed),
                             torch.Generator().manual_seed(seed))
    return gt, decoder, preds


def test_simulation_iterations_multimask_and_mask_prompts() -> None:
    _, decoder, preds = simulate()
    kinds = [p.kind for p in preds]
    assert len(preds) == 11 and kinds.count("mask") == 2 and kinds[-1] == "mask"
    assert [p.multimask for p in preds] == [True] + [False] * 10
    assert preds[0].low_res.shape == (6, 3, S // 4, S // 4)
    assert preds[1].low_res.shape == (6, 1, S // 4, S // 4)
    # Error points: one more per "point" iteration, none added by "mask" iterations.
    counts = [p.points.shape[1] for p in preds]
    expected, n = [], 0
    for kind in kinds:
        n += kind == "point"
        expected.append(n)
    assert counts == expected
    for call in decoder.calls:
        # One label per point in every call (the decoder stand-in would accept any shape).
        assert call["labels"].shape == call["points"].shape[:2]
        if call["multimask"]:
            assert call["mask_prompt"] is None  # iteration 0: no mask prompt yet
        else:
            assert call["mask_prompt"] is not None and not call["mask_prompt"].requires_grad
    assert all(p.low_res.requires_grad for p in preds)  # every iteration's loss backprops


def test_first_prompt_is_a_point_in_the_mask_or_a_box_with_equal_probability() -> None:
    m = 600
    gt, decoder, _ = simulate(m)
    first = [c for c in decoder.calls if c["multimask"]]
    box_rows = torch.cat([c["rows"] for c in first if c["boxes"] is not None])
    point_calls = [c for c in first if c["boxes"] is None]
    assert abs(len(box_rows) / m - 0.5) < 0.08
    for call in point_calls:  # one foreground point inside the mask
        assert call["points"].shape[1] == 1 and call["labels"].shape == call["points"].shape[:2]
        assert (call["labels"] == 1).all()  # (true of an empty tensor too: the shape first)
        x, y = call["points"][:, 0, 0].long(), call["points"][:, 0, 1].long()
        assert gt[call["rows"], y, x].all()
    for call in (c for c in first if c["boxes"] is not None):  # the box alone
        assert call["points"].shape[1] == 0
    # Each prediction records its rows' first-prompt kind (what the log splits mIoU by).
    _, _, preds = simulate(m)
    recorded = torch.zeros(m, dtype=torch.bool)
    recorded[box_rows] = True
    assert torch.equal(preds[0].first_prompt == FIRST_PROMPT_KINDS.index("box"), recorded)
    assert set(preds[0].first_prompt.tolist()) == {0, 1}


def test_prompts_of_an_image_do_not_depend_on_its_batch_mates() -> None:
    """What makes 2 processes x batch 1 see the same prompts as 1 process x batch 2."""
    gt_a = torch.zeros(2, S, S, dtype=torch.bool)
    gt_a[:, 2:12, 2:12] = True
    gt_b = torch.zeros(3, S, S, dtype=torch.bool)
    gt_b[:, 15:30, 10:20] = True

    def first_points(gts, seeds):
        decoder = RecordingDecoder()
        torch.manual_seed(0)  # the stub's logits
        random = MaskRandom([torch.Generator().manual_seed(s) for s in seeds],
                            [len(g) for g in gts])
        gt = torch.cat(gts)
        simulate_prompts(decoder, gt, full_valid(len(gt)), random,
                         torch.Generator().manual_seed(7))
        return {int(r): (call["points"][i] if call["boxes"] is None else call["boxes"][i])
                for call in decoder.calls if call["multimask"]
                for i, r in enumerate(call["rows"])}

    together = first_points([gt_a, gt_b], [11, 22])
    alone = first_points([gt_b], [22])
    for row in range(3):
        assert torch.equal(together[row + 2], alone[row])


def test_box_first_prompts_can_train_the_single_output() -> None:
    """box_multimask=False: the box group of iteration 0 is decoded with one output (token
    0), which stands in for all 3; the point group keeps its 3 outputs."""
    from samkit.train.prompts import decode_mixed

    calls = []

    def decode(rows, points, labels, boxes, mask_prompt, multimask):
        calls.append((boxes is not None, multimask))
        k = 3 if multimask else 1
        low = torch.arange(k, dtype=torch.float32).view(1, k, 1, 1).repeat(len(rows), 1, 4, 4)
        return low, torch.zeros(len(rows), k)

    use_box = torch.tensor([True, False, True])
    args = (use_box, torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, 0, 2),
            torch.zeros(3, 0, dtype=torch.long), None)
    low, iou = decode_mixed(decode, *args, multimask=True, box_multimask=False)
    assert sorted(calls) == [(False, True), (True, False)]
    assert low.shape == (3, 3, 4, 4) and iou.shape == (3, 3)
    assert (low[0] == 0).all() and (low[2] == 0).all()  # token 0's mask, 3 times
    assert low[1, :, 0, 0].tolist() == [0, 1, 2]
    calls.clear()
    decode_mixed(decode, *args, multimask=True, box_multimask=True)
    assert sorted(calls) == [(False, True), (True, True)]


def test_batch_metrics_split_the_first_prompt_miou_by_kind() -> None:
    from samkit.train.losses import LossTerms
    from samkit.train.step import batch_metrics

    # 3 masks on 2 images: a point (chosen output IoU 0.2), a box (0.8), a point (0.5).
    iou = torch.tensor([[0.9, 0.2, 0.0], [0.8, 0.8, 0.8], [0.5, 0.1, 0.1]])
    iou_pred = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.5], [0.9, 0.0, 0.0]])
    zeros = torch.zeros(3)
    terms = [LossTerms(zeros, zeros, zeros, zeros, iou)]
    first = simulate(3)[2][0]
    first.iou_pred, first.first_prompt = iou_pred, torch.tensor([0, 1, 0])
    metrics = batch_metrics(terms, first, torch.tensor([0, 0, 1]), 2)
    assert torch.isclose(metrics["miou_first_point"], torch.tensor(0.35))
    assert torch.isclose(metrics["miou_first_box"], torch.tensor(0.8))
    assert torch.isclose(metrics["miou_first"], torch.tensor((0.5 + 0.5) / 2))  # per image
    first.first_prompt = torch.tensor([0, 0, 0])
    assert batch_metrics(terms, first, torch.tensor([0, 0, 1]), 2)["miou_first_box"].isnan()
