"""The GLUE metrics: accuracy, F1 of the positive class, Matthews correlation, Pearson and Spearman correlation.

Why it exists: these few formulas decide every number in Table 1, so they are written out in numpy, each small
enough to check against its textbook definition (the tests do) instead of coming from a library.
Undefined values (a constant prediction) are 0.0, as sklearn does for Matthews, so results.json stays valid JSON.
"""
import math

import numpy as np

def accuracy(pred, y):
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def f1_score(pred, y):
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    pred, y = np.asarray(pred), np.asarray(y)
    tp = np.sum((pred == 1) & (y == 1))
    fp = np.sum((pred == 1) & (y != 1))
    fn = np.sum((pred != 1) & (y == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews(pred, y):
    """Matthews correlation from the confusion matrix (the multiclass form; equals the binary one)."""
    pred, y = np.asarray(pred), np.asarray(y)
    k = int(max(pred.max(), y.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y, pred), 1)
    n, correct = conf.sum(), np.trace(conf)
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    denom = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denom) if denom else 0.0


def pearson(a, b):
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom else 0.0


def ranks(a):
    """1-based ranks, ties sharing their average rank (what Spearman needs)."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]]  # start of each run of equal values
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(a)]
    out = np.empty(len(a))
    out[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]
    return out


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


METRICS = {"accuracy": accuracy, "f1": f1_score, "matthews": matthews, "pearson": pearson, "spearman": spearman}
