"""Configurations of stage two: one READ training run, and the grid a sweep expands."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from cache_store import UserError
from cache_store.commands import documented

from .read_model import CELLS, POOLINGS


@dataclass(frozen=True)
class RunConfig:
    cell: str = documented("gru", f"The side network's cell: {', '.join(CELLS)}.")
    width: int = documented(144, "Side width r, any positive number: with per-head attention maps each head mixes "
                                 "a slice of about r/A columns (144 splits evenly over the 8, 12 and 16 heads "
                                 "of t5-small, t5-base, all-MiniLM-L6-v2 and t5-large).")
    lr: float = documented(1e-3, "Peak learning rate of AdamW (--multi-task: 3e-4 unless given).")
    seed: int = documented(0, "Seeds initialisation and batch order.")
    recurrence: bool = documented(False, "Share one layer's parameters across every layer, as the paper's READ "
                                         "does (default: one set per layer, which generalised better on "
                                         "all-MiniLM-L6-v2; --preset paper turns it on).")
    epochs: int = documented(10, "Training epochs; the learning rate falls linearly to zero over them.")
    patience: int = documented(10, "Stop after this many epochs without a better validation metric (the "
                                   "default trains every epoch and keeps the best).")
    batch_size: int = documented(32, "Examples per training batch.")
    warmup: float = 0.06  # fraction of all steps spent warming the learning rate up
    weight_decay: float = documented(0.01, "AdamW's decoupled weight decay.")
    pooling: str = documented("auto", "What the heads read of an encoder or decoder-only stack's corrected "
                                      "tokens: their mean, the first ([CLS]) or the last real one; auto: the last "
                                      "for a decoder-only backbone, else the mean.")
    dropout: float = documented(0.0, "Dropout on the features the heads read.")
    side_dropout: float = documented(0.0, "Dropout on the side state each cell writes (what later layers and Up "
                                          "read).")
    layer_drop: float = documented(0.0, "Per example, skip each layer's update after the first with this "
                                        "probability (stochastic depth over layers).")
    cutoff: float = documented(0.0, "Drop this fraction of each example's tokens (never its first) from the "
                                    "cached hidden states and attention maps READ reads.")
    noise: float = documented(0.0, "Add Gaussian noise of this many standard deviations of each layer's cached "
                                   "hidden states.")
    down_norm: bool = documented(False, "Normalise each layer's cached hidden state (LayerNorm, no affine) "
                                        "before Down reads it.")
    layer_mix: bool = documented(False, "Encoder-only backbones: the heads read a learned softmax mix of every "
                                        "layer's pooled hidden state (plus READ's correction), not only the last's.")
    output_gate: bool = documented(False, "Gate the correction: the heads read s*base + (1-s)*Up(h_N), "
                                          "s = sigmoid(z) learned, z = 1 at the start.")
    token_mix: bool = documented(False, "Add a small self-attention block (one head, width r, residual) over each "
                                        "example's final encoder-side states: a path between tokens beside the "
                                        "frozen attention maps, for sentence pairs.")

    def __post_init__(self):
        checks = [
            (self.cell in CELLS, f"--rnn must be drawn from {', '.join(CELLS)}, got {self.cell!r}"),
            (self.width > 0, f"--hidden must be positive, got {self.width}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.patience > 0, f"--patience must be positive, got {self.patience}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.pooling in ("auto", *POOLINGS),
             f"--pooling must be auto or one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (0 <= self.dropout < 1, f"--dropout must be a fraction in [0, 1), got {self.dropout}"),
            (0 <= self.side_dropout < 1, f"--side-dropout must be a fraction in [0, 1), got {self.side_dropout}"),
            (0 <= self.layer_drop < 1, f"--layer-drop must be a fraction in [0, 1), got {self.layer_drop}"),
            (0 <= self.cutoff < 1, f"--cutoff must be a fraction in [0, 1), got {self.cutoff}"),
            (self.noise >= 0, f"--noise must not be negative, got {self.noise}"),
            (self.weight_decay >= 0, f"--weight-decay must not be negative, got {self.weight_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def spec_choices(self) -> dict:
        """The fields that shape the network (ReadSpec's), beside width and cell."""
        return {name: getattr(self, name) for name in SPEC_FIELDS}

    def stack_key(self) -> tuple:
        """Configurations equal in everything but the learning rate train as the members of one stack."""
        return tuple(sorted((k, v) for k, v in asdict(self).items() if k != "lr"))

    @property
    def name(self) -> str:
        shared = "-rec" if self.recurrence else ""
        return f"{self.cell}-r{self.width}-lr{self.lr:g}-s{self.seed}{shared}"

    def as_dict(self) -> dict:
        return asdict(self)


SPEC_FIELDS = ("recurrence", "pooling", "dropout", "side_dropout", "layer_drop", "down_norm", "layer_mix",
               "output_gate", "token_mix")


# train-side --preset NAME: RunConfig values. "paper" is the paper's READ: equation (1)'s network, its
# parameters shared across layers, and nothing beside it.
PRESETS: dict[str, dict] = {
    "paper": {"recurrence": True, "dropout": 0.0, "side_dropout": 0.0, "layer_drop": 0.0, "cutoff": 0.0,
              "noise": 0.0, "down_norm": False, "layer_mix": False, "output_gate": False, "token_mix": False},
}


# One network over several tasks takes more steps per epoch at the same peak rate: at 1e-3 two of three
# five-task runs on all-MiniLM-L6-v2 lost tasks after a rise of the training loss in epoch 2; at 3e-4 none
# did (docs/method-study.md, "Multi-task READ").
MULTI_TASK_LR = 3e-4


def grid(cells, widths, lrs, seeds, **shared) -> list[RunConfig]:
    """Every combination, in a stable order."""
    return [RunConfig(cell=c, width=w, lr=lr, seed=s, **shared)
            for c, w, lr, s in itertools.product(cells, widths, lrs, seeds)]
