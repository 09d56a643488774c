"""The GLUE metrics (recipes/glue_metrics.py) against their textbook formulas, computed by hand or with numpy."""
import math

import numpy as np
import pytest

from recipes import glue_metrics as gm


def test_accuracy_and_f1_by_hand():
    pred = np.array([1, 1, 0, 1, 0, 0, 1])
    y = np.array([1, 0, 0, 1, 1, 0, 1])
    tp, fp, fn = 3, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert gm.accuracy(pred, y) == pytest.approx(5 / 7)
    assert gm.f1_score(pred, y) == pytest.approx(2 * precision * recall / (precision + recall))
    assert gm.f1_score(np.zeros(4), np.zeros(4)) == 0.0  # no positives anywhere: defined as 0, not NaN


def test_matthews_binary_formula_and_multiclass_covariance_form():
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0])
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert gm.matthews(pred, y) == pytest.approx(expected)
    # Gorodkin's definition: correlation of the one-hot label and prediction matrices.
    rng = np.random.default_rng(0)
    y3, p3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    X, Y = np.eye(3)[p3], np.eye(3)[y3]
    cov = lambda a, b: np.sum((a - a.mean(0)) * (b - b.mean(0)))
    assert gm.matthews(p3, y3) == pytest.approx(cov(X, Y) / math.sqrt(cov(X, X) * cov(Y, Y)))
    assert gm.matthews(np.ones(6, int), np.array([0, 1, 0, 1, 1, 0])) == 0.0  # constant prediction


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 4.0, 3.0, 7.0])
    y = np.array([2.0, 1.0, 5.0, 4.0, 6.0])
    n = len(x)
    num = n * np.sum(x * y) - x.sum() * y.sum()
    den = math.sqrt((n * np.sum(x * x) - x.sum() ** 2) * (n * np.sum(y * y) - y.sum() ** 2))
    assert gm.pearson(x, y) == pytest.approx(num / den)
    # no ties: Spearman's rank-difference formula
    d = np.array([1, 2, 4, 3, 5]) - np.array([2, 1, 4, 3, 5])
    assert gm.spearman(x, y) == pytest.approx(1 - 6 * np.sum(d ** 2) / (n * (n * n - 1)))
    # ties share the average rank
    assert gm.ranks([3.0, 1.0, 3.0, 2.0, 3.0]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert gm.ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert gm.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(gm.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert gm.pearson(np.ones(4), y[:4]) == 0.0
