"""A training step never waits on the device: no call in stacks.train_step reads a tensor's value on the
host (item, tolist, bool, int, float, numpy, nonzero, a boolean mask's selection) or copies a host list
to the device. On a GPU each such call stalls the queue of launched kernels; counted here on the CPU,
where the same calls are made. Run state is read once per epoch (Stack.epoch_losses)."""
from __future__ import annotations

import collections

import pytest
import torch

from side_train.config import RunConfig
from side_train.data import InMemorySplit, read_spec
from side_train.devices import Prefetched, to_device
from side_train.stacks import make_stacks, train_step
from side_train.tasks import TaskInfo
from cache_store import CacheReader
from pipeline.config import LOSSLESS, CacheConfig

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu")


@pytest.fixture
def counting(monkeypatch):
    """counting() -> a Counter of every host read of a tensor and every host list made into a tensor,
    by name, from then on."""
    return lambda: _count(monkeypatch)


def _count(monkeypatch) -> collections.Counter:
    calls = collections.Counter()

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    getitem = torch.Tensor.__getitem__

    def selecting(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            calls["boolean mask"] += 1
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", selecting)
    monkeypatch.setattr(torch, "tensor", counting("torch.tensor", torch.tensor))
    return calls


@pytest.mark.parametrize("storage", ["lossless", "default"])
def test_a_training_step_makes_no_host_read(storage, tiny_bert, make_cache, counting):
    # make_cache stores losslessly unless told: "default" gives it cache-activations' default storage options
    default = CacheConfig(task="rte")
    options = {} if storage == "lossless" else {name: getattr(default, name) for name in LOSSLESS}
    cache = CacheReader(make_cache(tiny_bert, task="rte", limit=24, **options))
    info = TaskInfo.from_cache(cache)
    # r = 10 over 4 heads: uneven head slices, the path that used to gather with a fresh index and a mask
    configs = [RunConfig(width=10, lr=lr) for lr in (1e-3, 3e-3, 1e-2)]
    (stack,) = make_stacks(configs, cache, [info], 100, torch.device("cpu"))
    split = InMemorySplit(cache.split("train"), read_spec(cache, 10, "gru"))
    batches = [to_device(b, torch.device("cpu")) for b in split.batches(8, shuffle=True)]
    train_step(stack, info, batches[0])  # warm: caches of head indices fill on the first step
    stack.runs[1].stopped = True
    stack.begin_epoch()  # one member early-stopped: the masked update
    counted = counting()
    for batch in batches[1:]:
        train_step(stack, info, batch)
    assert not counted, dict(counted)
    trained = stack.epoch_losses(0, "rte", log=lambda line: None)
    assert trained == [0, 2] and all(len(stack.runs[m].train_loss) == 1 for m in trained)


def test_a_loss_that_is_not_finite_stops_its_member_at_the_epochs_end(tiny_bert, make_cache):
    cache = CacheReader(make_cache(tiny_bert, task="rte", limit=24))
    info = TaskInfo.from_cache(cache)
    (stack,) = make_stacks([RunConfig(width=8, lr=lr) for lr in (1e-3, 1e30)], cache, [info], 100, torch.device("cpu"))
    split = InMemorySplit(cache.split("train"), read_spec(cache, 8, "gru"))
    for batch in split.batches(4, shuffle=False):
        train_step(stack, info, batch)
    lines = []
    assert stack.epoch_losses(0, "rte", lines.append) == [0, 1]
    good, bad = stack.runs
    assert bad.stopped and "training loss became" in bad.failed and lines == [f"{bad.config.name}: {bad.failed}"]
    assert not good.stopped and torch.isfinite(torch.tensor(good.train_loss)).all()
    stack.begin_epoch()
    assert stack.active.tolist() == [True, False] and not stack.everyone


def test_prefetched_items_come_in_order_and_a_failure_is_raised_where_it_happened():
    with Prefetched(iter(range(50)), lambda x: x * 2, depth=3) as items:
        assert list(items) == [2 * x for x in range(50)]

    def broken():
        yield 1
        raise ValueError("assembly failed")

    with Prefetched(broken()) as items, pytest.raises(ValueError, match="assembly failed"):
        list(items)
    with Prefetched(iter(range(10_000)), depth=1) as items:  # leaving early stops the thread
        next(iter(items))
    assert not items.thread.is_alive()


def test_a_pinned_batch_holds_every_tensor_of_the_batch(tiny_bert, make_cache):
    """pinned() on the CPU, each tensor cloned where a GPU machine pins it: the same batch comes back."""
    from side_train.data import QuantizedRows
    from side_train.devices import pinned

    cache = CacheReader(make_cache(tiny_bert, task="rte", limit=24, attention="topk:8", quantize=("attention", "hidden")))
    split = InMemorySplit(cache.split("train"), read_spec(cache, 8, "gru"))
    batch = split.batch(torch.arange(6))
    seen = []
    copy = pinned(batch, pin=lambda x: seen.append(x) or x.clone())
    assert isinstance(copy.inputs.encoder_hidden[0], QuantizedRows) and len(seen) > 2 * len(batch.inputs.encoder_hidden)
    moved, again = to_device(copy, torch.device("cpu")), to_device(batch, torch.device("cpu"))
    assert torch.equal(moved.labels, again.labels) and torch.equal(moved.inputs.mask, again.inputs.mask)
    for a, b in zip(moved.inputs.encoder_hidden + moved.inputs.encoder_attention,
                    again.inputs.encoder_hidden + again.inputs.encoder_attention):
        assert torch.equal(a, b)
