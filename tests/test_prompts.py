"""samkit.prompts: the one set of prompt rules, shared by both predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit.errors import SamkitError
from samkit.modeling.prompt_encoder import LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_PAD
from samkit.prompts import POINT_LABELS, check_boxes, check_points


def test_point_labels_are_the_prompt_encoders() -> None:
    assert POINT_LABELS == (LABEL_PAD, LABEL_BACKGROUND, LABEL_FOREGROUND)


def test_arrays_tensors_and_lists_give_the_same_arrays() -> None:
    points, labels = [[[10, 20.5], [3, 4]]], [[1, -1]]
    for form in (np.array, torch.tensor, lambda x: x):
        coords, got = check_points(form(points), form(labels), batched=True)
        assert coords.dtype == np.float32 and got.dtype == np.int64
        np.testing.assert_array_equal(coords, np.array(points, np.float32))
        np.testing.assert_array_equal(got, labels)
    np.testing.assert_array_equal(check_boxes([1, 2, 3, 4]), [[1, 2, 3, 4]])


@pytest.mark.parametrize(("coords", "labels", "batched", "message"), [
    ([[1, 2]], [1], True, "must be B x N x 2"),
    ([[[1, 2]]], [[1]], False, "must be N x 2"),
    ([[1, 2]], [1, 1], False, r"labels must be N = \(1,\)"),
    ([[np.inf, 2]], [1], False, "finite"),
    ([["a", "b"]], [1], False, "finite"),
    ([[1, 2]], [2], False, "must be 1 \\(foreground\\)"),
    ([[1, 2], [3]], [1, 1], False, "numeric arrays"),
])
def test_bad_points_are_one_line_errors(coords, labels, batched: bool, message: str) -> None:
    with pytest.raises(SamkitError, match=message) as err:
        check_points(coords, labels, batched=batched)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("boxes", "message"), [
    ([1, 2, 3], "B x 4"),
    ([[[1, 2, 3, 4]]], "B x 4"),
    ([5, 0, 1, 9], "x1 >= x0"),
    ([0, 0, np.nan, 1], "finite"),
])
def test_bad_boxes_are_one_line_errors(boxes, message: str) -> None:
    with pytest.raises(SamkitError, match=message):
        check_boxes(boxes)
