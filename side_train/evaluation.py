"""Scoring READ on a split: every member of a model at once (validation), or a model of one member with
its predictions and raw outputs (the test split, which predict-side reproduces)."""
from __future__ import annotations

import numpy as np
import torch

from .devices import to_device
from .metrics import score
from .read_model import ReadModel
from .tasks import TaskInfo, predictions_of


def _outputs(model: ReadModel, task: TaskInfo, split, batch_size: int, device: torch.device) -> torch.Tensor:
    """[M, n, C] in cache order, float32 on the CPU."""
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(to_device(batch, device).inputs, task.name).float().cpu()
                             for batch in split.batches(batch_size, shuffle=False)], dim=1)
    model.train()
    return outputs


def evaluate_members(model: ReadModel, task: TaskInfo, split, batch_size: int, device: torch.device) -> list[float]:
    """Every member's metric on a split, in points."""
    labels = split.labels.numpy()
    return [score(task.metric, labels, predictions_of(task, out).numpy())
            for out in _outputs(model, task, split, batch_size, device)]


def evaluate(model: ReadModel, task: TaskInfo, split, batch_size: int,
             device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
    """A model of one member's (metric in points, predictions and raw outputs in cache order)."""
    outputs = _outputs(model, task, split, batch_size, device)[0]
    predictions = predictions_of(task, outputs).numpy()
    return score(task.metric, split.labels.numpy(), predictions), predictions, outputs.numpy()
