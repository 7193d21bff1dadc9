"""Training READ from caches: single runs, sweeps and multi-task runs, every assembled batch shared by all
the runs of one seed (the caches are read once, into memory when they fit; batches are assembled once per
seed). A multi-task run is one READ network with one head per task, its batches drawn across tasks."""
from __future__ import annotations

import json
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cache_store import CacheReader
from cache_store.runtime import resolve_device

from .config import RunConfig
from .data import (
    InMemorySplit,
    OnlineSplit,
    StreamingSplit,
    TrainBatch,
    open_splits,
    read_spec,
)
from .metrics import score
from .read_model import ReadModel, build_read
from .tasks import (
    TaskInfo,
    check_compatible,
    endless_batches,
    epoch_schedule,
    loss_of,
    predictions_of,
    task_weights,
)


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return batch
    inputs = batch.inputs
    move = lambda xs: None if xs is None else [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
    return TrainBatch(batch.index, batch.labels.to(device), type(inputs)(
        inputs.mask.to(device), move(inputs.encoder_hidden), move(inputs.encoder_attention),
        move(inputs.decoder_hidden), move(inputs.cross_attention)))


@dataclass
class TaskData:
    """One task of a run: what it is, where its activations come from, and its opened splits."""

    info: TaskInfo
    cache: object  # CacheReader, or a live source (`train-side --online`)
    splits: dict  # train | validation | test -> InMemorySplit | StreamingSplit | OnlineSplit


@dataclass
class Run:
    """One configuration being trained, with its optimiser, schedule and early-stopping state."""

    config: RunConfig
    model: ReadModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    train_loss: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)  # per epoch: the task's metric, or the tasks' mean
    task_validation: dict[str, list[float]] = field(default_factory=dict)
    best: float = -float("inf")
    best_epoch: int = -1
    best_state: dict | None = None
    stopped: bool = False
    failed: str | None = None  # why training stopped early on an error (a non-finite loss)
    seconds: float = 0.0
    _losses: list[float] = field(default_factory=list)

    # What a resumed run needs back, beyond the model, optimiser and schedule.
    _KEPT = ("train_loss", "validation", "task_validation", "best", "best_epoch", "best_state", "stopped", "failed",
             "seconds")

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), **{k: getattr(self, k) for k in self._KEPT}}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        for k in self._KEPT:
            setattr(self, k, state[k])

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_run(config: RunConfig, cache, tasks: list[TaskInfo] | TaskInfo, steps: int, device: torch.device) -> Run:
    tasks = tasks if isinstance(tasks, list) else [tasks]
    torch.manual_seed(config.seed)
    spec = read_spec(cache, config.width, config.cell, config.recurrence)
    model = build_read(spec, {t.name: (t.num_labels, t.label_head) for t in tasks}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, int(config.warmup * steps))
    # Linear warm-up, then linear decay to zero at the last step.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm))))
    return Run(config, model, optimizer, schedule)


@torch.no_grad()
def evaluate(model: ReadModel, task: TaskInfo, split: InMemorySplit | StreamingSplit | OnlineSplit, batch_size: int,
             device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
    """(metric in points, predictions and raw outputs in cache order)."""
    model.eval()
    outputs = torch.cat([model.heads[task.name](model.features(to_device(batch, device).inputs)).float().cpu()
                         for batch in split.batches(batch_size, shuffle=False)])
    model.train()
    predictions = predictions_of(task, outputs).numpy()
    return score(task.metric, split.labels.numpy(), predictions), predictions, outputs.numpy()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def default_memory_bytes() -> int:
    """Half the machine's memory: room for the activations, the models and everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def open_tasks(sources: list, config: RunConfig, memory_bytes: int, log) -> list[TaskData]:
    """Open every task's cache (or live source), check they can share one network, open their splits
    (the memory budget divided between the tasks)."""
    caches = [s if getattr(s, "online", False) else CacheReader(s) for s in sources]
    check_compatible(caches)
    spec = read_spec(caches[0], config.width, config.cell)
    tasks = []
    for cache in caches:
        if cache.manifest["backbone"]["init"] == "random":
            log(f"warning: {cache.path} was cached from a randomly initialised backbone (--init random): "
                "its metrics say nothing about the pretrained model")
        began = time.perf_counter()
        if getattr(cache, "online", False):
            splits = {n: OnlineSplit(cache.split(n), spec, cache.manifest) for n in ("train", "validation", "test")}
            how = "the backbone runs live for every batch"
        else:
            splits, how = open_splits(cache, spec, memory_bytes // len(caches))
        log(f"{cache.path}: {how}; {', '.join(f'{n} {s.n_examples}' for n, s in splits.items())} examples; "
            f"opened in {time.perf_counter() - began:.1f} s")
        tasks.append(TaskData(TaskInfo.from_cache(cache), cache, splits))
    return tasks


STATE_FILE = "training_state.pt"  # in the sweep's folder while it trains: every run's state after the last epoch


def save_state(out: Path, epoch: int, runs: list[Run]) -> None:
    """Every run's state after `epoch`, in one file replaced atomically: a crash leaves the previous
    epoch's whole state or this one's, never a mix of runs at different epochs."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (STATE_FILE + ".partial")
    torch.save({"epoch": epoch, "runs": {r.config.name: r.state() for r in runs}}, partial)
    os.replace(partial, out / STATE_FILE)
    crash_after = os.environ.get("READ_TRAIN_CRASH_AFTER_EPOCH")  # fault injection for the resume tests
    if crash_after is not None and epoch + 1 == int(crash_after):
        os.kill(os.getpid(), signal.SIGKILL)


def load_state(out: Path, runs: list[Run], resume: bool) -> int:
    """The first epoch to train: 0, or the one after the saved state's when resuming."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0
    if not resume:
        raise ValueError(f"{out} holds an unfinished training run ({STATE_FILE}); continue it with --resume, "
                         "or choose another --out")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    names = sorted(r.config.name for r in runs)
    if sorted(saved["runs"]) != names:
        raise ValueError(f"{out} was training runs {', '.join(sorted(saved['runs']))}, not {', '.join(names)}; "
                         "resume with the options it was started with, or choose another --out")
    for run in runs:
        run.restore(saved["runs"][run.config.name])
    return saved["epoch"] + 1


def train(sources, configs: list[RunConfig], out: Path, device: str = "auto", progress: bool = True, log=print,
          memory_bytes: int | None = None, sampling: str = "proportional", temperature: float = 2.0,
          resume: bool = False) -> list[dict]:
    """Train every configuration on one cache (a path) or live activation source (`train-side --online`),
    or with a list of several, one READ network for all those tasks (one head each); write each run's
    outputs under `out`; return their metrics. Caches' splits are held in memory when they fit in
    `memory_bytes` (default: half the machine's), otherwise streamed. Multi-task batches are drawn by
    `sampling` (proportional | temperature, see tasks.task_weights); an epoch has as many batches as
    the tasks' training splits together; early stopping follows the mean of the tasks' metrics.

    Every run's state is saved after each epoch (`STATE_FILE` in `out`); after a crash, `resume=True`
    continues from it and ends as an uninterrupted run would. A run whose loss stops being finite is
    stopped with a message in its metrics; the others go on."""
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if len({c.batch_size for c in configs}) != 1 or len({(c.epochs, c.patience) for c in configs}) != 1:
        raise ValueError("runs of one sweep share batch size, epochs and patience")
    target = resolve_device(device)
    tasks = open_tasks(sources, configs[0], memory_bytes or default_memory_bytes(), log)
    batch_size, epochs, patience = configs[0].batch_size, configs[0].epochs, configs[0].patience
    counts = {t.info.name: t.splits["train"].n_batches(batch_size) for t in tasks}
    weights = task_weights(counts, sampling, temperature)
    if len(tasks) > 1:
        log("tasks drawn " + ", ".join(f"{n} {w:.1%}" for n, w in weights.items()) + f" ({sampling})")
    by_name = {t.info.name: t for t in tasks}
    per_epoch = sum(counts.values())
    runs = [make_run(c, tasks[0].cache, [t.info for t in tasks], epochs * per_epoch, target) for c in configs]
    seeds = sorted({c.seed for c in configs})
    label = "+".join(by_name)
    first = load_state(out, runs, resume)
    if first:
        log(f"resuming {len(runs)} run(s) from {out / STATE_FILE} at epoch {first + 1}")
    bar = tqdm(total=epochs, initial=first, unit="epoch", desc=f"{label}: {len(runs)} run(s)", disable=not progress)
    epoch_seconds = []  # wall time of each epoch for the whole sweep: batches (assembly included) and validation
    remaining = range(first, first if all(r.stopped for r in runs) else epochs)  # none left if all stopped
    for epoch in remaining:
        epoch_began = time.perf_counter()
        for seed in seeds:
            group = [r for r in runs if r.config.seed == seed and not r.stopped]
            if not group:
                continue
            order = seed * 100_003 + epoch
            streams = {t.info.name: endless_batches(t.splits["train"], batch_size, order) for t in tasks}
            for name in epoch_schedule(weights, per_epoch, order):
                batch = to_device(next(streams[name]), target)  # assembled once for the whole group
                info = by_name[name].info
                for run in group:
                    if run.stopped:
                        continue
                    started = time.perf_counter()
                    loss = loss_of(info, run.model.heads[name](run.model.features(batch.inputs)), batch.labels)
                    if not torch.isfinite(loss):
                        run.stopped = True
                        run.failed = (f"training loss became {loss.item()} at epoch {epoch + 1} (task {name}); "
                                      "this configuration was stopped: try a lower --lr")
                        log(f"{run.config.name}: {run.failed}")
                        continue
                    run.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    run.optimizer.step()
                    run.schedule.step()
                    run._losses.append(loss.item())
                    run.seconds += time.perf_counter() - started
                del batch  # free this batch before the generator assembles the next one
            for stream in streams.values():
                stream.close()
        for run in runs:
            if run.stopped and not (run.failed and run._losses):
                continue
            started = time.perf_counter()
            run.train_loss.append(float(np.mean(run._losses)))
            run._losses.clear()
            if run.failed:  # its epoch's losses are kept; its weights are no longer worth validating
                continue
            for t in tasks:
                metric, _, _ = evaluate(run.model, t.info, t.splits["validation"], batch_size * 2, target)
                run.task_validation.setdefault(t.info.name, []).append(metric)
            metric = float(np.mean([v[-1] for v in run.task_validation.values()]))
            run.validation.append(metric)
            if metric > run.best:
                run.best, run.best_epoch = metric, epoch
                run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            elif epoch - run.best_epoch >= patience:
                run.stopped = True
            run.seconds += time.perf_counter() - started
        epoch_seconds.append(round(time.perf_counter() - epoch_began, 3))
        save_state(out, epoch, runs)
        best = max(runs, key=lambda r: r.best)
        bar.set_postfix_str(f"best {best.config.name} {best.best:.2f}")
        bar.update(1)
        if all(r.stopped for r in runs):
            break
    bar.close()
    results = [{**_finish(run, tasks, out / run.config.name, batch_size, target), "sweep_epoch_seconds": epoch_seconds}
            for run in runs]
    (out / STATE_FILE).unlink(missing_ok=True)  # finished: the run folders hold everything now
    return results


def _finish(run: Run, tasks: list[TaskData], folder: Path, batch_size: int, device: torch.device) -> dict:
    """Test the best-validation checkpoint on every task and write what a person (and predict-side) reads."""
    folder.mkdir(parents=True, exist_ok=True)
    status = f"failed: {run.failed}" if run.failed else "ok"
    common = {"config": run.config.as_dict(), "name": run.config.name, "status": status,
              "train_loss": run.train_loss, "epochs_run": len(run.train_loss), "parameters": run.parameters,
              "seconds": round(run.seconds, 3), "peak_memory_bytes": peak_memory_bytes(device)}
    if run.best_state is None:  # failed before its first validation: nothing to test or keep
        metrics = {"task": "+".join(t.info.name for t in tasks), "metric": tasks[0].info.metric if len(tasks) == 1
                   else "mean", "validation": [], "best_validation": None, "best_epoch": None, "test": None,
                   "tasks": {}, **common}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    run.model.load_state_dict(run.best_state)
    save_file({k: v.contiguous().cpu() for k, v in run.best_state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "run": run.config.as_dict(), "read": run.model.spec.__dict__,
        "tasks": [{"name": t.info.name, "metric": t.info.metric, "num_labels": t.info.num_labels,
                   "cache": str(t.cache.path), "manifest": t.info.manifest} for t in tasks],
    }, indent=2))
    per_task = {}
    with open(folder / "test_predictions.jsonl", "w") as handle:
        for t in tasks:
            test = t.splits["test"]
            metric, predictions, outputs = evaluate(run.model, t.info, test, batch_size * 2, device)
            for j in range(test.n_examples):
                row = {"task": t.info.name, "example_index": int(test.example_index[j]),
                       "label": test.labels[j].item(), "prediction": predictions[j].item()}
                if not t.info.regression:
                    row["probabilities"] = torch.softmax(torch.from_numpy(outputs[j]), -1).tolist()
                handle.write(json.dumps(row) + "\n")
            name = t.info.name
            per_task[name] = {"metric": t.info.metric, "validation": run.task_validation[name],
                              "best_validation": run.task_validation[name][run.best_epoch], "test": metric}
    single = len(tasks) == 1
    metrics = {
        "task": "+".join(per_task), "metric": tasks[0].info.metric if single else "mean",
        "validation": run.validation, "best_validation": run.best, "best_epoch": run.best_epoch,
        "test": float(np.mean([p["test"] for p in per_task.values()])), "tasks": per_task, **common,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
