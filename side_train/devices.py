"""Where training runs: its precision, batches made ahead and moved to the device, the memory budget (what
a run costs is meter.py's)."""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Iterator

import torch

from cache_store import UserError
from cache_store.format import dequantize_hidden

from .data import QuantizedRows, TrainBatch
from .read_model import Packing, ReadInputs


PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision: auto is TF32 matmuls on a GPU and plain float32 on the CPU; tf32 exists only on CUDA;
    bf16 is autocast to bfloat16 (weights, optimizer state and losses stay float32)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":
        raise UserError(f"--precision tf32 is a CUDA matmul mode; on {device.type} choose fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bfloat16; choose tf32 or fp32")
    return precision


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device):
    """Run a block's matmuls as `precision` (resolved) says: TF32 or full float32 on CUDA, bfloat16
    autocast for bf16; the previous settings come back on exit."""
    matmul = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul


def inputs_to(inputs: ReadInputs, device: torch.device) -> ReadInputs:
    """READ inputs on the device, where int8 or int4 hidden states are dequantized, so that what crosses to the
    device is the stored bytes (bfloat16 ones READ widens as it reads them, ReadInputs.widened);
    attention maps stay as stored until READ multiplies by them."""
    move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    hidden = lambda xs: [dequantize_hidden(move(x.values), move(x.scale), maybe(x.outliers), maybe(x.channels))  # noqa: E731
                         if isinstance(x, QuantizedRows) else move(x) for x in xs]
    maybe = lambda x: None if x is None else move(x)  # noqa: E731
    maps = lambda xs: None if xs is None else [move(x) for x in xs]  # noqa: E731
    pooled = None if inputs.pooled is None else {p: hidden([x])[0] for p, x in inputs.pooled.items()}
    return ReadInputs(inputs.packing.to(device), hidden(inputs.encoder_hidden), maps(inputs.encoder_attention),
                      hidden(inputs.decoder_hidden), maps(inputs.cross_attention), pooled)


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    return TrainBatch(batch.index, batch.labels.to(device, non_blocking=True), inputs_to(batch.inputs, device))


def pinned(batch: TrainBatch, pin=lambda x: x.pin_memory()) -> TrainBatch:
    """The batch in page-locked host memory, from which a copy to a GPU runs asynchronously (`pin`: what
    is done to each tensor)."""
    pin = (lambda x, to=pin: None if x is None else to(x))  # noqa: E731
    rows = lambda x: (QuantizedRows(pin(x.values), pin(x.scale), pin(x.outliers), pin(x.channels))  # noqa: E731
                      if isinstance(x, QuantizedRows) else pin(x))
    many = lambda xs: None if xs is None else [rows(x) for x in xs]  # noqa: E731
    i = batch.inputs
    inputs = ReadInputs(Packing(pin(i.packing.mask), pin(i.packing.real)), many(i.encoder_hidden),
                        many(i.encoder_attention), many(i.decoder_hidden), many(i.cross_attention),
                        None if i.pooled is None else {p: rows(x) for p, x in i.pooled.items()})
    return TrainBatch(batch.index, pin(batch.labels), inputs)


class Prefetched:
    """Items of an iterator made ahead on a background thread, `depth` at most waiting, in order: the next
    batch is assembled (and pinned, for a GPU) while the device trains on this one. Iterate inside
    `with`; leaving it stops the thread. An exception in the thread is raised where its item would be."""

    _DONE = object()

    def __init__(self, items: Iterator, prepare=lambda item: item, depth: int = 2):
        self.items, self.prepare = items, prepare
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)

    def _fill(self) -> None:
        try:
            for item in self.items:
                if not self._put(self.prepare(item)):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> "Prefetched":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()

    def __iter__(self) -> Iterator:
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def default_memory_bytes() -> int:
    """Half the machine's memory: room for the activations, the models and everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
