"""Process-wide choices shared by both stages (cache_store is the one package both import): the device
and the allocator's tuning."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from .errors import UserError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks (up to 1 GiB each) for reuse instead of returning them to the OS.

    Every batch allocates and frees the same large buffers (activations, unpadded copies, compressed
    shards). By default glibc serves blocks over 32 MiB with mmap and unmaps them on free, so each
    batch pays first-touch page faults again; on some VMs that costs more than the compression itself
    (measured with scripts/bench/cache_throughput.py). Returns False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def resolve_device(device: str) -> torch.device:
    """auto | cpu | cuda[:i] -> a device; UserError (one line) for a GPU that is not there. Under torchrun,
    auto and cuda mean the GPU of this process's LOCAL_RANK: one device per local rank, and more ranks than
    GPUs are refused (an explicit --device cuda:i puts ranks on one GPU on purpose)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu or auto")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if rank >= gpus:
            raise UserError(f"torchrun started more ranks on this machine than it has GPUs ({gpus}): start at "
                            f"most {gpus} (--nproc-per-node {gpus}), or give --device cuda:0 to share one on purpose")
        device = f"cuda:{rank}"
    return torch.device(device)
