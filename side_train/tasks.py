"""The tasks one READ network trains on: what each needs from its cache, the check that several caches
can feed one network (`--multi-task`), and how training batches are drawn across tasks."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch import nn

from cache_store import CacheError, UserError
from cache_store.format import differences

# What one READ network's inputs depend on: caches that differ here cannot share a network.
MUST_AGREE = ("backbone", "tokenizer", "format_version", "layers", "attention", "attention_topk", "storage_dtype",
              "quantize", "projection")
SAMPLING = ("proportional", "temperature")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    metric: str
    num_labels: int  # 1 for regression
    label_head: torch.Tensor | None  # [C, d] or None
    manifest: dict  # the cache's manifest (splits and checksums left out): what predict-side rebuilds
    # Regression only, set by train.open_tasks from the training labels: their mean and variance. The head
    # starts at the mean and the loss is the squared error over the variance, so a regression task's loss
    # starts near 1, as cross-entropy's does, whatever its labels' units. Several tasks share one network's
    # gradients: with STS-B's raw 0-5 scores its gradients were about 8 times the classification tasks'.
    label_mean: float = 0.0
    label_var: float = 1.0

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @classmethod
    def from_cache(cls, cache) -> "TaskInfo":
        manifest = {k: v for k, v in cache.manifest.items() if k not in ("splits", "checksums", "complete")}
        task = manifest["task"]
        words = task["label_words"]
        return cls(task["name"], task["metric"], len(words) or 1, cache.label_head() if words else None, manifest)


def loss_of(task: TaskInfo, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.regression:
        return nn.functional.mse_loss(output.squeeze(-1), labels.float()) / task.label_var
    return nn.functional.cross_entropy(output, labels.long())


def predictions_of(task: TaskInfo, output: torch.Tensor) -> torch.Tensor:
    return output.squeeze(-1) if task.regression else output.argmax(-1)


def with_label_scale(task: TaskInfo, labels: torch.Tensor) -> TaskInfo:
    """`task` with its training labels' mean and variance (regression; a classification task as it is)."""
    if not task.regression:
        return task
    labels = labels.double()
    variance = labels.var(unbiased=False).item() if len(labels) > 1 else 0.0
    return replace(task, label_mean=labels.mean().item(), label_var=variance if variance > 0 else 1.0)


def check_compatible(caches: list) -> None:
    """Refuse caches that one READ network cannot read together, saying what differs."""
    first = caches[0]
    names = [c.manifest["task"]["name"] for c in caches]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CacheError(f"task {', '.join(repeated)} is given twice; give each task's cache once")
    wanted = {k: first.manifest.get(k) for k in MUST_AGREE}
    for cache in caches[1:]:
        found = differences({k: cache.manifest.get(k) for k in MUST_AGREE}, wanted)
        if found:
            shown = "; ".join(d.replace("cache has", "it has").replace("asked for", f"{first.path} has")
                              for d in found[:4])
            raise CacheError(f"{cache.path} cannot share a READ network with {first.path}: {shown}. Cache every "
                             "task with the same --model, --init, --attention, --layers, --dtype, --quantize and --project, "
                             "one basis for all (--project-from the first task's cache)")


def task_weights(sizes: dict[str, int], sampling: str, temperature: float) -> dict[str, float]:
    """Probability of drawing each task's next batch: proportional to its training batches, or to their
    1/temperature power (temperature sampling; larger temperatures move towards uniform)."""
    if sampling not in SAMPLING:
        raise UserError(f"--task-sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if temperature <= 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    raw = {name: float(n) ** power for name, n in sizes.items()}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


def epoch_schedule(weights: dict[str, float], steps: int, seed: int) -> list[str]:
    """The task of each of an epoch's `steps` batches; one task gives its name `steps` times."""
    names = list(weights)
    if len(names) == 1:
        return names * steps
    picks = np.random.default_rng(seed).choice(len(names), size=steps, p=[weights[n] for n in names])
    return [names[i] for i in picks]


def endless_batches(split, batch_size: int, seed: int) -> Iterator:
    """A split's shuffled batches, reshuffled whenever they run out (a task drawn more often than it has
    batches in an epoch starts another pass). The first pass is what a single-task epoch sees."""
    cycle = 0
    while True:
        yield from split.batches(batch_size, shuffle=True, seed=seed + cycle * 7_919)
        cycle += 1
