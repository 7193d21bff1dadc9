"""The one configuration of a `cache-activations` run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_store import ATTENTION_MODES, SPLITS, STORAGE_DTYPES

from .backbones import INITS, backbone_name
from .errors import InputError
from .tasks import TASKS

MODES = ("new", "resume", "overwrite")


@dataclass(frozen=True)
class CacheConfig:
    task: str  # a name from the task registry
    model: str = "t5-base"  # hub id or local folder (config.json + tokenizer [+ weights])
    init: str = "pretrained"  # pretrained | random (seeded weights built from the model's config)
    seed: int = 0  # seeds the split protocol and random init
    data_dir: Path | None = None  # GLUE tsv layout; None = Hugging Face hub
    out: Path = Path("caches")  # the cache goes to out/<backbone>/<task>
    splits: tuple[str, ...] = SPLITS
    batch_size: int = 32
    max_length: int = 128  # tokens per example, truncating longer inputs
    dtype: str = "bfloat16"  # storage dtype of every float array
    attention: str = "heads"  # heads | mean | none
    layers: tuple[int, ...] | None = None  # stored layer indices (encoder and decoder); None = all
    limit: int | None = None  # keep at most this many examples of each split
    device: str = "auto"  # auto | cpu | cuda[:i]
    mode: str = "new"  # new (refuse an existing cache) | resume | overwrite
    shard_mb: float = 64.0  # shard size; whole shards are buffered per array while writing

    def __post_init__(self):
        checks = [
            (self.task in TASKS, f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.max_length > 0, f"--max-length must be positive, got {self.max_length}"),
            (self.dtype in STORAGE_DTYPES, f"--dtype must be one of {', '.join(STORAGE_DTYPES)}"),
            (self.attention in ATTENTION_MODES, f"--attention must be one of {', '.join(ATTENTION_MODES)}"),
            (bool(self.splits) and set(self.splits) <= set(SPLITS), f"--splits must be drawn from {', '.join(SPLITS)}"),
            (self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}"),
            (self.layers is None or (bool(self.layers) and min(self.layers) >= 0),
             "--layers must be 'all' or non-negative layer indices"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.shard_mb > 0, "--shard-mb must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def cache_dir(self) -> Path:
        suffix = "-random" if self.init == "random" else ""
        return Path(self.out) / f"{backbone_name(self.model)}{suffix}" / self.task

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 2**20)
