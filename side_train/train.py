"""`train-side`'s loop: single runs, sweeps and multi-task runs from caches (or a live backbone).

A sweep's configurations that share a seed and a shape train as the members of one ReadModel (stacks.py);
every batch is assembled once per seed and read by all of that seed's stacks; the caches are read once,
into memory when they fit. A multi-task run is one READ network with one head per task, its batches drawn
across tasks. After each epoch: validation and early stopping (`close_epoch`), then the state is saved
for `--resume` (state.py). At the end every run's best checkpoint is tested and written (artifacts.py).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cache_store import ActivationSource, CacheReader, UserError
from cache_store.runtime import resolve_device
from cache_store.world import current_world

from .artifacts import write_run
from .config import RunConfig
from .data import OnlineSplit, open_splits, read_spec
from .devices import Prefetched, default_memory_bytes, pinned, precision_scope, resolve_precision, to_device
from .evaluation import evaluate_members
from .stacks import Stack, make_stacks, train_step
from .state import load_state, save_state, state_file
from .tasks import TaskInfo, check_compatible, endless_batches, epoch_schedule, task_weights, with_label_scale


@dataclass
class TaskData:
    """One task of a run: what it is, where its activations come from, and its opened splits."""

    info: TaskInfo
    cache: ActivationSource  # a CacheReader, or a live backbone (`train-side --online`)
    splits: dict  # train | validation | test -> InMemorySplit | StreamingSplit | OnlineSplit


def open_tasks(sources: list, config: RunConfig, memory_bytes: int, log) -> list[TaskData]:
    """Open every task's cache (or live source), check they can share one network, open their splits
    (the memory budget divided between the tasks)."""
    caches: list[ActivationSource] = [s if isinstance(s, ActivationSource) else CacheReader(s) for s in sources]
    check_compatible(caches)
    spec = read_spec(caches[0], config.width, config.cell)
    tasks = []
    for cache in caches:
        if cache.manifest["backbone"]["init"] == "random":
            log(f"warning: {cache.path} was cached from a randomly initialised backbone (--init random): "
                "its metrics say nothing about the pretrained model")
        began = time.perf_counter()
        if cache.live:
            splits = {n: OnlineSplit(cache.split(n), spec, cache.manifest) for n in ("train", "validation", "test")}
            how = "the backbone runs live for every batch"
        else:
            splits, how = open_splits(cache, spec, memory_bytes // len(caches), config.batch_size)
        log(f"{cache.path}: {how}; {', '.join(f'{n} {s.n_examples}' for n, s in splits.items())} examples; "
            f"opened in {time.perf_counter() - began:.1f} s")
        info = with_label_scale(TaskInfo.from_cache(cache), splits["train"].labels)
        tasks.append(TaskData(info, cache, splits))
    return tasks


def train(sources, configs: list[RunConfig], out: Path, device: str = "auto", progress: bool = True, log=print,
          memory_bytes: int | None = None, sampling: str = "proportional", temperature: float = 2.0,
          resume: bool = False, precision: str = "auto") -> list[dict]:
    """Train every configuration on one cache (a path) or live activation source (`train-side --online`),
    or with a list of several, one READ network for all those tasks (one head each); write each run's
    outputs under `out`; return their metrics. Caches' splits are held in memory when they fit in
    `memory_bytes` (default: half the machine's), otherwise streamed. Multi-task batches are drawn by
    `sampling` (proportional | temperature, see tasks.task_weights); an epoch has as many batches as
    the tasks' training splits together; early stopping follows the mean of the tasks' metrics.

    Every run's state is saved after each epoch (`STATE_FILE` in `out`); after a crash, `resume=True`
    continues from it and ends as an uninterrupted run would. A run whose loss stops being finite is
    stopped with a message in its metrics; the others go on. `precision` (devices.PRECISIONS): the
    matmuls' precision, TF32 on a GPU and float32 on the CPU by default."""
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if len({c.batch_size for c in configs}) != 1 or len({(c.epochs, c.patience) for c in configs}) != 1:
        raise UserError("runs of one sweep share batch size, epochs and patience")
    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    world = current_world()
    if memory_bytes is None:  # the processes of one machine share its memory
        memory_bytes = default_memory_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    tasks = open_tasks(sources, configs[0], memory_bytes, log)
    batch_size, epochs = configs[0].batch_size, configs[0].epochs
    counts = {t.info.name: t.splits["train"].n_batches(batch_size) for t in tasks}
    weights = task_weights(counts, sampling, temperature)
    if len(tasks) > 1:
        log("tasks drawn " + ", ".join(f"{n} {w:.1%}" for n, w in weights.items()) + f" ({sampling})")
    stacks = make_stacks(configs, tasks[0].cache, [t.info for t in tasks], epochs * sum(counts.values()), target)
    # Under torchrun each rank trains whole stacks (every rank builds them all the same way): a run's
    # numbers do not depend on which process trains it.
    stacks = stacks[world.rank::world.size]
    runs = sorted((r for s in stacks for r in s.runs), key=lambda r: configs.index(r.config))  # as given
    state = state_file(world)
    first = load_state(out, stacks, resume, state)
    if first:
        log(f"resuming {len(runs)} run(s) from {out / state} at epoch {first + 1}")
    bar = tqdm(total=epochs, initial=first, unit="epoch", desc=f"{'+'.join(counts)}: {len(runs)} run(s)",
               disable=not progress)
    epoch_seconds = []  # wall time of each epoch for the whole sweep: batches (assembly included) and validation
    with precision_scope(precision, target):
        for epoch in range(first, first if all(r.stopped for r in runs) else epochs):  # none left if all stopped
            began = time.perf_counter()
            train_epoch(stacks, tasks, weights, epoch, batch_size, target, log)
            for stack in stacks:
                close_epoch(stack, tasks, epoch, configs[0].patience, batch_size, target, log)
            epoch_seconds.append(round(time.perf_counter() - began, 3))
            save_state(out, epoch, stacks, state)
            best = max(runs, key=lambda r: r.best)
            bar.set_postfix_str(f"best {best.config.name} {best.best:.2f}")
            bar.update(1)
            if all(r.stopped for r in runs):
                break
        bar.close()
        spec_of = {r.config.name: s.model.spec for s in stacks for r in s.runs}
        results = [{**write_run(run, spec_of[run.config.name], tasks, out / run.config.name, batch_size, target,
                                precision), "sweep_epoch_seconds": epoch_seconds} for run in runs]
    (out / state).unlink(missing_ok=True)  # finished: the run folders hold everything now
    if world.distributed:  # every rank's runs, in the order given, for rank 0's summary
        order = {c.name: i for i, c in enumerate(configs)}
        results = sorted((r for part in world.gather(results) for r in part), key=lambda r: order[r["name"]])
    return results


def train_epoch(stacks: list[Stack], tasks: list[TaskData], weights: dict[str, float], epoch: int, batch_size: int,
                device: torch.device, log) -> None:
    """One epoch of every stack still training. Each seed's batches are assembled once and read by all
    of that seed's stacks; the order of batches and tasks depends only on the seed and the epoch."""
    by_name = {t.info.name: t for t in tasks}
    steps = sum(t.splits["train"].n_batches(batch_size) for t in tasks)
    for seed in sorted({s.seed for s in stacks}):
        group = [s for s in stacks if s.seed == seed and not all(r.stopped for r in s.runs)]
        if not group:
            continue
        order = seed * 100_003 + epoch
        streams = {t.info.name: endless_batches(t.splits["train"], batch_size, order) for t in tasks}
        scheduled = ((name, next(streams[name])) for name in epoch_schedule(weights, steps, order))
        # On a GPU the next batch is assembled (into pinned memory) on a thread while the device trains on
        # this one; on the CPU both would share the same cores, and assembling in turn is faster.
        ahead = Prefetched(scheduled, lambda item: (item[0], pinned(item[1]))) if device.type == "cuda" \
            else contextlib.nullcontext(scheduled)
        with ahead as ahead:
            for name, batch in ahead:
                batch = to_device(batch, device)  # assembled once for the whole group
                for stack in group:
                    started = time.perf_counter()
                    train_step(stack, by_name[name].info, batch)
                    for run in stack.runs:
                        run.seconds += (time.perf_counter() - started) / len(stack.runs)
                del batch
        for stream in streams.values():
            stream.close()


def close_epoch(stack: Stack, tasks: list[TaskData], epoch: int, patience: int, batch_size: int,
                device: torch.device, log=print) -> None:
    """Close the epoch of every member: mean training loss, validation metrics, best checkpoint, patience."""
    started = time.perf_counter()
    members = stack.epoch_losses(epoch, "+".join(t.info.name for t in tasks), log)  # every member that trained
    members = [m for m in members if not stack.runs[m].stopped]  # a failed member's weights are not validated
    if not members:
        stack.begin_epoch()
        return
    metrics = {t.info.name: evaluate_members(stack.model, t.info, t.splits["validation"], batch_size * 2, device)
               for t in tasks}
    for m in members:
        run = stack.runs[m]
        for name, values in metrics.items():
            run.task_validation.setdefault(name, []).append(values[m])
        metric = float(np.mean([v[-1] for v in run.task_validation.values()]))
        run.validation.append(metric)
        if metric > run.best:
            run.best, run.best_epoch = metric, epoch
            run.best_state = stack.model.member_state(m)
        elif epoch - run.best_epoch >= patience:
            run.stopped = True
    for m in members:
        stack.runs[m].seconds += (time.perf_counter() - started) / len(members)
    stack.begin_epoch()
