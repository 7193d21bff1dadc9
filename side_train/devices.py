"""Where training runs and what it costs: moving batches to the device, peak memory, the memory budget."""
from __future__ import annotations

import os
import resource

import torch

from cache_store.format import dequantize_rows

from .data import QuantizedRows, TrainBatch
from .read_model import ReadInputs


def inputs_to(inputs: ReadInputs, device: torch.device) -> ReadInputs:
    """READ inputs on the device, where int8 hidden states are widened to float32 (so that what crosses
    to the device is the stored bytes); attention maps stay as stored until READ multiplies by them."""
    move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    hidden = lambda xs: [dequantize_rows(move(x.values), move(x.scale)) if isinstance(x, QuantizedRows)  # noqa: E731
                         else move(x) for x in xs]
    maps = lambda xs: None if xs is None else [move(x) for x in xs]  # noqa: E731
    pooled = None if inputs.pooled is None else {p: hidden([x])[0] for p, x in inputs.pooled.items()}
    return ReadInputs(inputs.packing.to(device), hidden(inputs.encoder_hidden), maps(inputs.encoder_attention),
                      hidden(inputs.decoder_hidden), maps(inputs.cross_attention), pooled)


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    return TrainBatch(batch.index, batch.labels.to(device, non_blocking=True), inputs_to(batch.inputs, device))


def peak_memory_bytes(device: torch.device) -> int:
    """The peak so far: allocated GPU memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def default_memory_bytes() -> int:
    """Half the machine's memory: room for the activations, the models and everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
