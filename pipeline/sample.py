"""The seeded sample of train examples that fitted storage choices are chosen on: `--project`'s PCA basis
and `--outliers`' channels. Up to SAMPLE_EXAMPLES examples, drawn with the run's seed, shared evenly
between a store's tasks; the backbone runs over them in batches before anything is written."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from cache_store.writer import SplitPlan

from .backbones import Backbone, BackboneOutput
from .padding import pad_examples

SAMPLE_EXAMPLES = 1024  # train examples a fitted choice sees (all of them when fewer)


@dataclass
class Sample:
    plans: dict[str | None, SplitPlan]  # task -> its train plan (None: the one task of a single cache)
    index: dict[str | None, np.ndarray]  # task -> the sampled examples, ascending
    seed: int

    def describe(self, tokens: int) -> dict:
        """What a manifest records of the sample a choice was fitted on."""
        names = [t for t in self.plans if t is not None]
        return {"task": "+".join(names) or None, "split": "train", "examples": sum(len(i) for i in self.index.values()),
                "tokens": tokens, "seed": self.seed}


def draw(plans: SplitPlan | dict[str, SplitPlan], seed: int, plan_task: str | None = None) -> Sample:
    """Up to SAMPLE_EXAMPLES train examples of one plan (of task `plan_task`), or shared evenly between
    several tasks' plans ({task: plan})."""
    plans = plans if isinstance(plans, dict) else {plan_task: plans}
    rng = np.random.default_rng(seed)
    share = SAMPLE_EXAMPLES // len(plans)
    index = {task: np.sort(rng.choice(plan.n_examples, min(plan.n_examples, share), replace=False))
             for task, plan in plans.items()}
    return Sample(plans, index, seed)


@torch.inference_mode()
def forward(backbone: Backbone, sample: Sample, batch_size: int, progress: bool,
            desc: str) -> Iterator[tuple[BackboneOutput, torch.Tensor]]:
    """The backbone's outputs (no attention maps) over the sample, batch by batch, each with its real
    tokens' mask (bool [B, L], on the backbone's device)."""
    batches = [(task, index[start:start + batch_size]) for task, index in sample.index.items()
               for start in range(0, len(index), batch_size)]
    for task, chunk in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        ids, mask = pad_examples(sample.plans[task], chunk, backbone.tokenizer.pad_token_id or 0)
        out = backbone.forward(ids.to(backbone.device), mask.to(backbone.device), False)
        yield out, mask.bool().to(backbone.device)
