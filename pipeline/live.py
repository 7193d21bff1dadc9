"""The live activation source: the frozen backbone computes, for any examples, exactly the arrays a cache
would hold (same names and ragged layout, float32, nothing rounded or written). `train-side --online`
finds it through the `read_side.sources` entry point, so neither stage imports the other."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import CacheConfig
from .job import Prepared, extract, pad_examples, prepare


class LiveSplit:
    """A split whose activations are computed on demand, `forward_passes` counting backbone calls."""

    def __init__(self, ready: Prepared, name: str, attentions: bool):
        self.ready, self.name, self.attentions = ready, name, attentions
        plan = ready.plans[name]
        self.plan = plan
        self.lengths, self.labels, self.example_index = plan.lengths, plan.labels, plan.example_index
        self.n_examples = plan.n_examples
        self.forward_passes = 0

    @torch.inference_mode()
    def compute(self, index) -> dict[str, torch.Tensor]:
        """Every array for examples `index`, concatenated in that order along the ragged axis."""
        index = np.asarray(index)
        backbone = self.ready.backbone
        ids, mask = pad_examples(self.plan, index, backbone.tokenizer.pad_token_id or 0)
        out = backbone.forward(ids.to(backbone.device), mask.to(backbone.device), self.attentions)
        self.forward_passes += 1
        arrays = extract(out, self.plan.lengths[index].tolist(), self.ready.specs, "float32")
        return {path: torch.from_numpy(value) for path, value in arrays.items()}


class LiveSource:
    """Looks like an opened cache to stage two: a manifest, the label head, and splits."""

    online = True

    def __init__(self, config: CacheConfig):
        self.ready = prepare(config)
        self.manifest = {**self.ready.manifest, "storage_dtype": "float32", "format_version": None}
        self.path = Path(f"online:{self.manifest['backbone']['name']}/{config.task}")
        self.attentions = config.attention != "none"

    def label_head(self) -> torch.Tensor | None:
        head = self.ready.label_head
        return None if head is None else torch.from_numpy(head)

    def split(self, name: str) -> LiveSplit:
        return LiveSplit(self.ready, name, self.attentions)


def open_online(model: str, task: str, data_dir=None, limit=None, init: str = "pretrained", seed: int = 0,
                device: str = "auto", max_length: int = 128, attention: str = "heads") -> LiveSource:
    return LiveSource(CacheConfig(task=task, model=model, init=init, seed=seed, data_dir=data_dir, limit=limit,
                                  device=device, max_length=max_length, attention=attention, dtype="float32"))
