"""Training and inference build the same prompt embeddings.

The training step simulates interactive sessions (first click, noisy box or text; error
points; mask-only passes) and decodes them in batched groups; ``SamPredictor`` answers one
user prompt at a time. A model trained on tokens that inference never builds learns the
wrong thing without any module failing (first clicks once reached training as "not a point"
tokens), so here every prompt kind of every iteration that the trainer decodes is rebuilt
as a user prompt from the session's own record and encoded by the predictor: the sparse
and dense embeddings the mask decoder receives must agree within float noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samkit.build import build_sam_from_config
from samkit.modeling.prompt_encoder import LABEL_FOREGROUND, check_point_shapes
from samkit.predictor import SamPredictor
from samkit.train import step as step_module
from samkit.train.config import TrainConfig
from samkit.train.data import AugmentConfig, TrainDataset, collate, open_source
from samkit.train.prompts import FIRST_PROMPT_KINDS, PAPER_ITERATIONS, decode_mixed
from samkit.train.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128
CLIP_DIM = 24
# A small plain ViT (LayerNorm only) with a narrow decoder, at 128 px.
TINY = TrainConfig(model="vit_b", model_overrides={
    "image_size": SIZE, "prompt_embed_dim": 64, "decoder_num_heads": 2, "decoder_mlp_dim": 128,
    "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
                "window_size": 4}}).model_config()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training source of 3 images of 96 x 128 (the longest side is the model's: no
    resize, bottom padding), each with 3 disc objects in an id mask."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    for i in range(3):
        ids = np.zeros((h, w), np.uint8)
        for j in range(3):
            cy, cx, r = rng.integers(20, h - 20), rng.integers(20, w - 20), rng.integers(10, 18)
            ids[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = j + 1
        image = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(ids).save(root / "masks" / f"{i}.png")
    return root


class Recorder:
    """Records what the mask decoder receives (sparse and dense prompt embeddings) and,
    inside the training step, which mask rows each decoder call was for."""

    def __init__(self, sam) -> None:
        self.calls: list[dict] = []
        self.rows: list[torch.Tensor] = []
        sam.mask_decoder.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.calls.append({"image": args[0], "sparse": args[2].detach().clone(),
                           "dense": args[3].detach().clone()})

    def wrap(self, simulate):
        def simulate_recording(decode, *args, **kwargs):
            def decode_recording(rows, *a, **k):
                self.rows.append(rows.clone())
                return decode(rows, *a, **k)
            return simulate(decode_recording, *args, **kwargs)
        return simulate_recording


def session_prompts(predictions, i: int, t: int, clip: torch.Tensor | None) -> dict:
    """The user prompt for mask ``i`` at iteration ``t`` of the simulated session, built from
    the session's record alone: the first prompt (click, box or text), the error points so
    far, and the previous iteration's best low-res mask."""
    p = predictions[t]
    kind = FIRST_PROMPT_KINDS[int(p.first_prompt[i])]
    points, labels = p.points[i].numpy(), p.labels[i].numpy()
    prompt: dict = {"multimask_output": p.multimask}
    if kind == "point":
        points = np.concatenate([p.first_points[i][None].numpy(), points])
        labels = np.concatenate([[LABEL_FOREGROUND], labels])
    if kind == "box":
        prompt["box"] = p.boxes[i].numpy()
        prompt["multimask_output"] = False  # box_multimask off, as samkit-tiny trains
    if kind == "text":
        prompt["text_embedding"] = clip[i]
    if len(points):
        prompt["point_coords"], prompt["point_labels"] = points, labels
    if t > 0:
        before = predictions[t - 1]
        best = int(before.iou_pred[i].argmax())
        prompt["mask_input"] = before.low_res[i, best][None].detach().numpy()
    return prompt


@pytest.mark.parametrize("text", [False, True])
def test_training_prompts_equal_the_predictors(scenes, text: bool, monkeypatch) -> None:
    torch.manual_seed(0)
    sam = build_sam_from_config(TINY)
    if text:
        sam.attach_text_prompt(CLIP_DIM, "tiny-clip")
    sam.eval()
    dataset = TrainDataset([open_source(str(scenes))],
                           AugmentConfig(SIZE, (1.0, 1.0), hflip=False), seed=0)
    batch = collate([dataset[(0, i)] for i in range(3)], SIZE)
    clip = None
    if text:  # a CLIP crop embedding for every mask but the first of each image
        clip = torch.nn.functional.normalize(
            torch.randn(sum(len(m) for m in batch.masks), CLIP_DIM,
                        generator=torch.Generator().manual_seed(2)), dim=-1)
        clip[::3] = float("nan")
        batch.text_embeddings = list(clip.split([len(m) for m in batch.masks]))
    step = TrainStep(sam, frozen_encoder=True, seed=3,
                     prompt_iterations=((0, PAPER_ITERATIONS),), box_multimask=False,
                     text_share=0.7 if text else 0.0)
    recorder = Recorder(sam)
    captured: list = []
    simulate = recorder.wrap(step_module.simulate_prompts)

    def simulate_and_keep(*args, **kwargs):
        captured.append(simulate(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(step_module, "simulate_prompts", simulate_and_keep)
    with torch.no_grad():
        step(batch, 0)
    predictions = captured[0]
    kinds = {FIRST_PROMPT_KINDS[int(k)] for k in predictions[0].first_prompt}
    assert kinds == ({"point", "box", "text"} if text else {"point", "box"})
    assert [p.kind for p in predictions].count("mask") == 2
    assert (torch.cat([p.labels for p in predictions[1:]], 1) == 0).any()  # a background point
    train_calls, train_rows = recorder.calls, recorder.rows
    assert len(train_calls) == len(train_rows)

    # Each decoder call of the step is one group (text, box, point) of one iteration; the
    # groups of an iteration cover every mask once.
    image_of_mask = torch.repeat_interleave(torch.arange(3),
                                            torch.tensor([len(m) for m in batch.masks]))
    masks = len(image_of_mask)
    images = [np.asarray(Image.open(scenes / "images" / f"{i}.png")) for i in range(3)]
    predictor = SamPredictor(sam)
    checked = set()
    covered = 0
    for rows, recorded in zip(train_rows, train_calls, strict=True):
        t = covered // masks
        for r, i in enumerate(rows.tolist()):
            predictor.set_image(images[int(image_of_mask[i])])
            recorder.calls = []
            predictor.predict(**session_prompts(predictions, i, t, clip))
            (inference,) = recorder.calls
            for key, tol in (("sparse", 1e-5), ("dense", 1e-5), ("image", 1e-4)):
                torch.testing.assert_close(recorded[key][r:r + 1], inference[key],
                                           atol=tol, rtol=tol)
            checked.add((t, i))
        covered += len(rows)
    assert len(checked) == covered == len(predictions) * masks


def test_two_first_clicks_give_different_tokens() -> None:
    """Two masks whose first prompts are clicks at different places: the trainer's tokens
    for them differ, and the click token is the foreground point's (not the pad's)."""
    torch.manual_seed(0)
    encoder = build_sam_from_config(TINY).prompt_encoder
    tokens: list[torch.Tensor] = []

    def decode(rows, points, labels, boxes, mask_prompt, multimask, text=False):
        sparse, _ = encoder(points=(points, labels), boxes=boxes, masks=mask_prompt)
        tokens.append(sparse)
        return torch.zeros(len(rows), 3, 32, 32), torch.zeros(len(rows), 3)

    first_points = torch.tensor([[10.0, 20.0], [90.0, 60.0]])
    no_errors = torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.long)
    decode_mixed(decode, torch.tensor([False, False]), first_points, torch.zeros(2, 4),
                 *no_errors, None, True)
    (sparse,) = tokens
    assert sparse.shape[:2] == (2, 2)  # the click and the pad
    assert not torch.allclose(sparse[0, 0], sparse[1, 0])
    expected = encoder.embed_points(first_points[:, None], torch.ones(2, 1, dtype=torch.long),
                                    pad=True)
    torch.testing.assert_close(sparse, expected)
    pad = encoder.not_a_point_embed.weight[0]
    assert not torch.allclose(sparse[0, 0], pad) and torch.allclose(sparse[0, 1], pad)


@pytest.mark.parametrize("points, labels", [
    ((2, 1, 2), (2, 0)),  # the defect: M x 0 labels for one click each
    ((2, 1, 2), (2, 1, 1)), ((2, 3, 2), (2, 2)), ((2, 1, 2), (1, 1)), ((2, 2), (2,)),
])
def test_points_and_labels_of_other_shapes_are_refused(points, labels) -> None:
    encoder = build_sam_from_config(TINY).prompt_encoder
    with pytest.raises(ValueError, match="must be B x N"):
        encoder(points=(torch.zeros(points), torch.ones(labels, dtype=torch.long)),
                boxes=None, masks=None)
    with pytest.raises(ValueError, match="must be B x N"):
        check_point_shapes(torch.zeros(points), torch.ones(labels))


def test_the_predictor_refuses_labels_of_another_shape() -> None:
    """The user-facing entries: ``predict`` / ``predict_batch`` check the arrays (one line,
    ``SamkitError``), ``predict_torch`` (tensors in the input frame) reaches the prompt
    encoder's guard."""
    from samkit.errors import SamkitError

    torch.manual_seed(0)
    predictor = SamPredictor(build_sam_from_config(TINY).eval())
    predictor.set_image(np.zeros((96, 128, 3), np.uint8))
    with pytest.raises(SamkitError, match="point labels must be"):
        predictor.predict(np.array([[10.0, 20.0]]), np.zeros(0))
    with pytest.raises(SamkitError, match="point labels must be"):
        predictor.predict_batch(np.zeros((2, 1, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="labels must be B x N"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 0, dtype=torch.int))
