"""Configurations of stage two: one READ training run, and the grid a sweep expands."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from .read_model import CELLS, POOLINGS


@dataclass(frozen=True)
class RunConfig:
    cell: str = "gru"  # rnn | gru | lstm
    width: int = 144  # side width r: a multiple of 8, 12 and 16 heads (t5-small, t5-base and MiniLM, t5-large)
    lr: float = 3e-4  # peak learning rate of AdamW
    seed: int = 0  # seeds initialisation and batch order
    recurrence: bool = True  # share parameters across layers (False: the paper's Table 2 ablation)
    epochs: int = 30
    patience: int = 5  # stop after this many epochs without a better validation metric
    batch_size: int = 32
    warmup: float = 0.06  # fraction of all steps spent warming the learning rate up
    weight_decay: float = 0.01
    pooling: str = "mean"  # encoder-only backbones: how the heads read the corrected tokens (mean | first)
    dropout: float = 0.0  # on the features the heads read

    def __post_init__(self):
        checks = [
            (self.cell in CELLS, f"--rnn must be drawn from {', '.join(CELLS)}, got {self.cell!r}"),
            (self.width > 0, f"--hidden must be positive, got {self.width}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.patience > 0, f"--patience must be positive, got {self.patience}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (0 <= self.dropout < 1, f"--dropout must be a fraction in [0, 1), got {self.dropout}"),
            (self.weight_decay >= 0, f"--weight-decay must not be negative, got {self.weight_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def name(self) -> str:
        shared = "" if self.recurrence else "-norec"
        return f"{self.cell}-r{self.width}-lr{self.lr:g}-s{self.seed}{shared}"

    def as_dict(self) -> dict:
        return asdict(self)


def grid(cells, widths, lrs, seeds, **shared) -> list[RunConfig]:
    """Every combination, in a stable order."""
    return [RunConfig(cell=c, width=w, lr=lr, seed=s, **shared)
            for c, w, lr, s in itertools.product(cells, widths, lrs, seeds)]
