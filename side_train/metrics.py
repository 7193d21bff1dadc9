"""GLUE metrics from scikit-learn and SciPy (never hand-written), in points (0-100) as GLUE reports them:
one for each name of cache_store.format.METRIC_NAMES, which a cache manifest's task.metric holds."""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from cache_store.format import METRIC_NAMES


def _accuracy(labels, predictions):
    return accuracy_score(labels, predictions)


def _matthews(labels, predictions):
    return matthews_corrcoef(labels, predictions)


def _f1_accuracy(labels, predictions):
    return (f1_score(labels, predictions) + accuracy_score(labels, predictions)) / 2


def _pearson_spearman(labels, predictions):
    if np.std(predictions) == 0 or np.std(labels) == 0:  # correlation undefined: count it as none
        return 0.0
    return (pearsonr(labels, predictions)[0] + spearmanr(labels, predictions)[0]) / 2


METRICS = {"accuracy": _accuracy, "matthews": _matthews, "f1_accuracy": _f1_accuracy,
           "pearson_spearman": _pearson_spearman}
assert tuple(METRICS) == METRIC_NAMES, "every metric a manifest may name is computed here"


def score(metric: str, labels: np.ndarray, predictions: np.ndarray) -> float:
    """The task's metric in points."""
    return 100.0 * float(METRICS[metric](np.asarray(labels), np.asarray(predictions)))
