"""What stage two reads activations from: a cache (`CacheReader`) or a live backbone that computes the
same arrays on demand (`pipeline.live.LiveSource`, for `train-side --online`). Both implement
`ActivationSource`; `live` says which kind of split `split()` returns."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch


class SplitSource(Protocol):
    """One split's examples, stored longest first. A stored split (`SplitReader`) reads its arrays
    (`load`, `example`, windows); a live one computes them (`compute(index)`)."""

    name: str
    n_examples: int
    lengths: np.ndarray  # int64 [n]: tokens per example
    labels: np.ndarray  # [n]: class index, or float32 score for regression
    example_index: np.ndarray  # int64 [n]: row in the source split


@runtime_checkable
class ActivationSource(Protocol):
    path: Path  # where the activations come from (a cache's folder, or online:<model>/<task>)
    manifest: dict  # the cache manifest: backbone, tokenizer, task, layers, attention, storage dtype
    live: bool  # False: stored arrays (a cache); True: computed by the backbone for every batch

    def label_head(self) -> torch.Tensor | None:
        """[C, d] float32 LM-head rows of the label words, or None (encoder-only backbones)."""

    def split(self, name: str) -> SplitSource:
        """train | validation | test."""


LIVE_SOURCES = "read_side.sources"  # entry-point group (setup.cfg): the live backbones stage one provides


def open_live(name: str, **options):
    """A live backbone source that stage one registers under `name` in the `read_side.sources` entry points
    (`online`: a task's splits for `train-side --online`; `predictor`: new rows for `predict-side`), so that
    stage two reaches it through this package and never imports stage one."""
    from importlib.metadata import entry_points

    from .errors import UserError

    found = list(entry_points(group=LIVE_SOURCES, name=name))
    if not found:
        raise UserError(f"no live backbone source {name!r} is installed; reinstall this package (pip install -e .)")
    return found[0].load()(**options)
