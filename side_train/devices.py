"""Where training runs and what it costs: moving batches to the device, peak memory, the memory budget."""
from __future__ import annotations

import os
import resource

import torch

from .data import TrainBatch


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return batch
    inputs = batch.inputs
    move = lambda xs: None if xs is None else [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
    return TrainBatch(batch.index, batch.labels.to(device), type(inputs)(
        inputs.mask.to(device), move(inputs.encoder_hidden), move(inputs.encoder_attention),
        move(inputs.decoder_hidden), move(inputs.cross_attention)))


def peak_memory_bytes(device: torch.device) -> int:
    """The peak so far: allocated GPU memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def default_memory_bytes() -> int:
    """Half the machine's memory: room for the activations, the models and everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
