"""Metrics against hand-computed accuracy matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inflora.metrics import (
    accuracy_after,
    average_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    mean_std,
    summarize,
)

# 3 tasks; row i = accuracies on tasks 0..i after training task i.
ACC = [
    [90.0],
    [80.0, 85.0],
    [70.0, 75.0, 88.0],
]
COUNTS = [100, 200, 300]


def test_accuracy_after_task_averaged() -> None:
    assert accuracy_after(ACC, 0) == pytest.approx(90.0)
    assert accuracy_after(ACC, 1) == pytest.approx((80 + 85) / 2)  # 82.5
    assert accuracy_after(ACC, 2) == pytest.approx((70 + 75 + 88) / 3)  # 77.666...
    assert accuracy_after(ACC, -1) == accuracy_after(ACC, 2)


def test_accuracy_after_sample_weighted() -> None:
    # A_1 = (80*100 + 85*200) / 300 = 25000 / 300 = 83.333...
    assert accuracy_after(ACC, 1, COUNTS) == pytest.approx(25000 / 300)
    # A_2 = (70*100 + 75*200 + 88*300) / 600 = (7000 + 15000 + 26400) / 600 = 48400 / 600 = 80.666...
    assert accuracy_after(ACC, 2, COUNTS) == pytest.approx(48400 / 600)
    assert final_accuracy(ACC, COUNTS) == pytest.approx(48400 / 600)


def test_final_and_average_accuracy() -> None:
    assert final_accuracy(ACC) == pytest.approx(233 / 3)
    # task-averaged A_bar = (90 + 82.5 + 77.666...) / 3
    assert average_accuracy(ACC) == pytest.approx((90 + 82.5 + 233 / 3) / 3)
    # sample-weighted A_bar = (90 + 83.333... + 80.666...) / 3 = 254 / 3
    assert average_accuracy(ACC, COUNTS) == pytest.approx(254 / 3)


def test_forgetting_and_bwt_monotone_drop() -> None:
    # F: j=0: max(90, 80) - 70 = 20; j=1: max(85) - 75 = 10  -> mean 15
    assert forgetting(ACC) == pytest.approx(15.0)
    # BWT: j=0: 70 - 90 = -20; j=1: 75 - 85 = -10 -> mean -15
    assert backward_transfer(ACC) == pytest.approx(-15.0)


def test_forgetting_uses_max_over_past_rows_and_differs_from_bwt() -> None:
    acc = [[90.0], [95.0, 85.0], [70.0, 88.0, 80.0]]
    # F: j=0: max(acc[0][0]=90, acc[1][0]=95) - 70 = 25; j=1: max(acc[1][1]=85) - 88 = -3 -> (25 - 3) / 2 = 11
    assert forgetting(acc) == pytest.approx(11.0)
    # BWT: j=0: 70 - 90 = -20; j=1: 88 - 85 = 3 -> (-20 + 3) / 2 = -8.5
    assert backward_transfer(acc) == pytest.approx(-8.5)


def test_single_task() -> None:
    assert forgetting([[77.0]]) == 0.0
    assert backward_transfer([[77.0]]) == 0.0
    assert final_accuracy([[77.0]]) == average_accuracy([[77.0]]) == 77.0


def test_square_nan_upper_triangle_matches_ragged() -> None:
    nan = math.nan
    square = np.array([[90.0, nan, nan], [80.0, 85.0, nan], [70.0, 75.0, 88.0]])
    assert summarize(square, COUNTS) == pytest.approx(summarize(ACC, COUNTS))
    # a list of full-length rows with NaN above the diagonal is accepted too
    assert forgetting(square.tolist()) == pytest.approx(15.0)


def test_summarize_keys_and_values() -> None:
    til = [[95.0], [90.0, 92.0], [85.0, 90.0, 94.0]]
    tid = [[100.0], [90.0, 80.0], [80.0, 70.0, 90.0]]
    s = summarize(ACC, COUNTS, task_il=til, task_id=tid)
    assert set(s) == {
        "final_accuracy",
        "average_accuracy",
        "final_accuracy_task_avg",
        "average_accuracy_task_avg",
        "forgetting",
        "backward_transfer",
        "task_il_accuracy",
        "task_id_accuracy",
    }
    assert s["final_accuracy"] == pytest.approx(48400 / 600)
    assert s["average_accuracy"] == pytest.approx(254 / 3)
    assert s["final_accuracy_task_avg"] == pytest.approx(233 / 3)
    assert s["average_accuracy_task_avg"] == pytest.approx((90 + 82.5 + 233 / 3) / 3)
    assert s["forgetting"] == pytest.approx(15.0)
    assert s["backward_transfer"] == pytest.approx(-15.0)
    # task-IL final row, weighted: (85*100 + 90*200 + 94*300) / 600 = (8500 + 18000 + 28200) / 600 = 91.1666...
    assert s["task_il_accuracy"] == pytest.approx(54700 / 600)
    # task-id final row, weighted: (80*100 + 70*200 + 90*300) / 600 = (8000 + 14000 + 27000) / 600 = 81.666...
    assert s["task_id_accuracy"] == pytest.approx(49000 / 600)
    assert all(isinstance(v, float) for v in s.values())


def test_summarize_without_counts_is_task_averaged() -> None:
    s = summarize(ACC)
    assert set(s) == {
        "final_accuracy",
        "average_accuracy",
        "final_accuracy_task_avg",
        "average_accuracy_task_avg",
        "forgetting",
        "backward_transfer",
    }
    assert s["final_accuracy"] == s["final_accuracy_task_avg"] == pytest.approx(233 / 3)
    assert s["average_accuracy"] == s["average_accuracy_task_avg"]


def test_mean_std() -> None:
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sample variance = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3
    assert m == pytest.approx(2.5)
    assert s == pytest.approx(math.sqrt(5 / 3))
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


@pytest.mark.parametrize(
    ("acc", "match"),
    [
        ([], "empty"),
        ([[90.0], [80.0]], "row 1 has 1 entries"),
        ([[90.0, 1.0], [80.0]], "ragged"),
        ([[90.0], [80.0, math.nan]], r"acc\[1\]\[1\]"),
        ([[90.0], "ab"], "row 1"),
        ([[[90.0]]], "1-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((3, 2)), "ragged"),
        (42, "list of rows"),
    ],
)
def test_malformed_matrix(acc: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        final_accuracy(acc)


def test_bad_counts() -> None:
    with pytest.raises(ValueError, match="one test-sample count per task"):
        final_accuracy(ACC, [100, 200])
    with pytest.raises(ValueError, match="non-negative"):
        average_accuracy(ACC, [100, -1, 300])
    with pytest.raises(ValueError, match="sum to 0"):
        accuracy_after(ACC, 0, [0, 1, 1])
    with pytest.raises(ValueError, match="one test-sample count per task"):
        summarize(ACC, [1, 2, 3, 4])


def test_bad_task_index_and_mismatched_matrices() -> None:
    with pytest.raises(ValueError, match="out of range"):
        accuracy_after(ACC, 3)
    with pytest.raises(ValueError, match="rows"):
        summarize(ACC, task_il=[[1.0], [2.0, 3.0]])
