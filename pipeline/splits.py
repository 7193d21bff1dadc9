"""The paper's split protocol (after Zhang et al. 2020 and Karimi Mahabadi et al. 2021), seeded, with every
row's source index kept for provenance.

- MNLI: validation_mismatched is validation, validation_matched is test.
- train < 10k rows: GLUE's validation set is shuffled and halved into validation and test.
- otherwise: 1,000 seeded train rows become validation, GLUE's validation set is test.

A user's data (pipeline/user_data.py) may give other source splits:

- train, validation and test: each as given.
- train and test: seeded train rows (a tenth, at most 1,000) become validation.
- train alone: two such sets of seeded train rows become validation and test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .glue_data import Rows

SMALL_TRAIN = 10_000
HOLDOUT = 1_000
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    name: str
    source: str  # the GLUE split the rows come from
    rows: Rows
    example_index: np.ndarray  # int64 [n]: row of each example in `source`


def make_splits(task_name: str, source: dict[str, Rows], seed: int) -> tuple[str, dict[str, Split]]:
    """Return (protocol name, splits by name)."""
    rng = np.random.default_rng(seed)
    train = source["train"]
    if "validation" not in source and "validation_matched" not in source:  # a user's train (and test) only
        holdout = max(1, min(HOLDOUT, len(train) // 10))
        if len(train) < (2 if "test" in source else 3) * holdout + 1:
            raise InputError(f"task {task_name}: {len(train)} train rows are too few to hold out validation "
                             "and test rows from; give more rows, or validation and test files")
        order = rng.permutation(len(train))
        if "test" in source:
            protocol = "train-holdout-validation"
            parts = {"train": ("train", np.sort(order[holdout:])), "validation": ("train", np.sort(order[:holdout])),
                     "test": ("test", np.arange(len(source["test"])))}
        else:
            protocol = "train-holdout-validation-test"
            parts = {"train": ("train", np.sort(order[2 * holdout:])),
                     "validation": ("train", np.sort(order[:holdout])),
                     "test": ("train", np.sort(order[holdout:2 * holdout]))}
    elif "test" in source:  # a user's three files
        protocol = "as-given"
        parts = {name: (name, np.arange(len(source[name]))) for name in SPLITS}
    elif "validation_matched" in source:  # MNLI
        protocol = "mnli-mismatched-validation"
        parts = {
            "train": ("train", np.arange(len(train))),
            "validation": ("validation_mismatched", np.arange(len(source["validation_mismatched"]))),
            "test": ("validation_matched", np.arange(len(source["validation_matched"]))),
        }
    elif len(train) < SMALL_TRAIN:
        protocol = "halve-validation"
        order = rng.permutation(len(source["validation"]))
        half = (len(order) + 1) // 2
        parts = {
            "train": ("train", np.arange(len(train))),
            "validation": ("validation", np.sort(order[:half])),
            "test": ("validation", np.sort(order[half:])),
        }
    else:
        protocol = "train-holdout-1000"
        order = rng.permutation(len(train))
        parts = {
            "train": ("train", np.sort(order[HOLDOUT:])),
            "validation": ("train", np.sort(order[:HOLDOUT])),
            "test": ("validation", np.arange(len(source["validation"]))),
        }
    splits = {
        name: Split(name, src, [source[src][i] for i in index], index.astype(np.int64))
        for name, (src, index) in parts.items()
    }
    return protocol, splits
