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
from torch import nn
from tqdm.auto import tqdm

from cache_store import CacheReader
from cache_store.runtime import resolve_device

from .config import RunConfig
from .data import InMemorySplit, OnlineSplit, StreamingSplit, TrainBatch, open_splits, read_spec
from .metrics import score
from .read_model import ReadModel, ReadSpec, build_read
from .stacked import StackedAdamW, StackedRead
from .tasks import TaskInfo, check_compatible, endless_batches, epoch_schedule, predictions_of, task_weights


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
    """One configuration's progress and early-stopping state (its weights live in its Stack)."""

    config: RunConfig
    parameters: int  # trainable parameters of this configuration's READ network
    train_loss: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)  # per epoch: the task's metric, or the tasks' mean
    task_validation: dict[str, list[float]] = field(default_factory=dict)
    best: float = -float("inf")
    best_epoch: int = -1
    best_state: dict | None = None  # the best-validation weights, as a ReadModel state dict
    stopped: bool = False
    failed: str | None = None  # why training stopped early on an error (a non-finite loss)
    seconds: float = 0.0  # this run's share of its stack's training and validation time
    _losses: list[float] = field(default_factory=list)

    KEPT = ("train_loss", "validation", "task_validation", "best", "best_epoch", "best_state", "stopped", "failed",
            "seconds")  # what a resumed run needs back


@dataclass
class Stack:
    """The runs of one seed and one shape (cell, width, recurrence), trained as one StackedRead."""

    runs: list[Run]
    model: StackedRead
    optimizer: StackedAdamW
    lrs: torch.Tensor  # [M] peak learning rates
    schedule: object  # step -> factor of the peak learning rate
    step: int = 0

    @property
    def seed(self) -> int:
        return self.runs[0].config.seed

    def active(self) -> torch.Tensor:
        return torch.tensor([not r.stopped for r in self.runs], device=self.lrs.device)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


def init_model(config: RunConfig, cache, tasks: list[TaskInfo] | TaskInfo, device: torch.device = torch.device("cpu")
             ) -> ReadModel:
    """A freshly initialised READ network for one configuration (seeded: the same alone or in a sweep)."""
    tasks = tasks if isinstance(tasks, list) else [tasks]
    torch.manual_seed(config.seed)
    spec = read_spec(cache, config.width, config.cell, config.recurrence, config.pooling, config.dropout)
    return build_read(spec, {t.name: (t.num_labels, t.label_head) for t in tasks}).to(device)


def schedule_of(config: RunConfig, steps: int):
    """Linear warm-up over `warmup` of the steps, then linear decay to zero at the last step."""
    warm = max(1, int(config.warmup * steps))
    return lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))


def make_stacks(configs: list[RunConfig], cache, tasks: list[TaskInfo], steps: int, device: torch.device) -> list[Stack]:
    """Group configurations by seed and shape; each group becomes one Stack."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault((c.seed, c.cell, c.width, c.recurrence, c.pooling, c.dropout, c.weight_decay), []
                          ).append(c)
    stacks = []
    for members in groups.values():
        models = [init_model(c, cache, tasks, device) for c in members]
        runs = [Run(c, sum(p.numel() for p in m.parameters())) for c, m in zip(members, models)]
        model = StackedRead.from_models(models)
        stacks.append(Stack(runs, model, StackedAdamW(model.parameters(), members[0].weight_decay),
                            torch.tensor([c.lr for c in members], device=device), schedule_of(members[0], steps)))
    return stacks


def member_losses(task: TaskInfo, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """outputs [M, B, C] -> each member's mean loss [M]."""
    members, batch = outputs.shape[:2]
    if task.regression:
        return ((outputs.squeeze(-1).float() - labels.float()) ** 2).mean(1)
    flat = nn.functional.cross_entropy(outputs.reshape(members * batch, -1), labels.long().repeat(members),
                                       reduction="none")
    return flat.view(members, batch).mean(1)


@torch.no_grad()
def evaluate_stack(stack: Stack, task: TaskInfo, split, batch_size: int, device: torch.device) -> list[float]:
    """Every member's metric on a split."""
    stack.model.eval()
    outputs = torch.cat([stack.model(to_device(batch, device).inputs, task.name).float().cpu()
                         for batch in split.batches(batch_size, shuffle=False)], dim=1)  # [M, n, C]
    stack.model.train()
    labels = split.labels.numpy()
    return [score(task.metric, labels, predictions_of(task, out).numpy()) for out in outputs]


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


def save_state(out: Path, epoch: int, stacks: list[Stack]) -> None:
    """Every run's state after `epoch`, in one file replaced atomically: a crash leaves the previous
    epoch's whole state or this one's, never a mix of runs at different epochs."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (STATE_FILE + ".partial")
    torch.save({"epoch": epoch,
                "stacks": {tuple(r.config.name for r in s.runs): s.state() for s in stacks},
                "runs": {r.config.name: {k: getattr(r, k) for k in Run.KEPT} for s in stacks for r in s.runs}},
               partial)
    os.replace(partial, out / STATE_FILE)
    crash_after = os.environ.get("READ_TRAIN_CRASH_AFTER_EPOCH")  # fault injection for the resume tests
    if crash_after is not None and epoch + 1 == int(crash_after):
        os.kill(os.getpid(), signal.SIGKILL)


def load_state(out: Path, stacks: list[Stack], resume: bool) -> int:
    """The first epoch to train: 0, or the one after the saved state's when resuming."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0
    if not resume:
        raise ValueError(f"{out} holds an unfinished training run ({STATE_FILE}); continue it with --resume, "
                         "or choose another --out")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    names = sorted(r.config.name for s in stacks for r in s.runs)
    if sorted(saved["runs"]) != names:
        raise ValueError(f"{out} was training runs {', '.join(sorted(saved['runs']))}, not {', '.join(names)}; "
                         "resume with the options it was started with, or choose another --out")
    for stack in stacks:
        stack.restore(saved["stacks"][tuple(r.config.name for r in stack.runs)])
        for run in stack.runs:
            for key, value in saved["runs"][run.config.name].items():
                setattr(run, key, value)
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
    stacks = make_stacks(configs, tasks[0].cache, [t.info for t in tasks], epochs * per_epoch, target)
    runs = sorted((r for s in stacks for r in s.runs), key=lambda r: configs.index(r.config))  # as given
    seeds = sorted({c.seed for c in configs})
    label = "+".join(by_name)
    first = load_state(out, stacks, resume)
    if first:
        log(f"resuming {len(runs)} run(s) from {out / STATE_FILE} at epoch {first + 1}")
    bar = tqdm(total=epochs, initial=first, unit="epoch", desc=f"{label}: {len(runs)} run(s)", disable=not progress)
    epoch_seconds = []  # wall time of each epoch for the whole sweep: batches (assembly included) and validation
    remaining = range(first, first if all(r.stopped for r in runs) else epochs)  # none left if all stopped
    for epoch in remaining:
        epoch_began = time.perf_counter()
        for seed in seeds:
            group = [s for s in stacks if s.seed == seed and not all(r.stopped for r in s.runs)]
            if not group:
                continue
            order = seed * 100_003 + epoch
            streams = {t.info.name: endless_batches(t.splits["train"], batch_size, order) for t in tasks}
            for name in epoch_schedule(weights, per_epoch, order):
                batch = to_device(next(streams[name]), target)  # assembled once for the whole group
                for stack in group:
                    started = time.perf_counter()
                    _train_step(stack, by_name[name].info, batch, epoch, log)
                    for run in stack.runs:
                        run.seconds += (time.perf_counter() - started) / len(stack.runs)
                del batch  # free this batch before the generator assembles the next one
            for stream in streams.values():
                stream.close()
        for stack in stacks:
            _validate(stack, tasks, epoch, patience, batch_size, target)
        epoch_seconds.append(round(time.perf_counter() - epoch_began, 3))
        save_state(out, epoch, stacks)
        best = max(runs, key=lambda r: r.best)
        bar.set_postfix_str(f"best {best.config.name} {best.best:.2f}")
        bar.update(1)
        if all(r.stopped for r in runs):
            break
    bar.close()
    spec_of = {r.config.name: s.model.spec for s in stacks for r in s.runs}
    results = [{**_finish(run, spec_of[run.config.name], tasks, out / run.config.name, batch_size, target),
                "sweep_epoch_seconds": epoch_seconds} for run in runs]
    (out / STATE_FILE).unlink(missing_ok=True)  # finished: the run folders hold everything now
    return results


def _train_step(stack: Stack, task: TaskInfo, batch: TrainBatch, epoch: int, log) -> None:
    """One optimiser step for every member still training; a member whose loss is not finite stops."""
    active = stack.active()
    losses = member_losses(task, stack.model(batch.inputs, task.name), batch.labels)  # [M]
    finite = torch.isfinite(losses.detach())
    for m, run in enumerate(stack.runs):
        if active[m] and not finite[m]:
            run.stopped, active[m] = True, False
            run.failed = (f"training loss became {losses[m].item()} at epoch {epoch + 1} (task {task.name}); "
                          "this configuration was stopped: try a lower --lr")
            log(f"{run.config.name}: {run.failed}")
    stack.optimizer.zero_grad()
    torch.where(active, losses, 0).sum().backward()  # members share no parameter: each gets its own gradient
    stack.optimizer.step(stack.lrs * stack.schedule(stack.step), active)
    stack.step += 1
    for m, value in enumerate(losses.detach().tolist()):
        if active[m]:
            stack.runs[m]._losses.append(value)


def _validate(stack: Stack, tasks: list[TaskData], epoch: int, patience: int, batch_size: int,
              device: torch.device) -> None:
    """Close the epoch of every member: mean training loss, validation metrics, best checkpoint, patience."""
    started = time.perf_counter()
    members = [m for m, r in enumerate(stack.runs) if r._losses]  # every member that trained this epoch
    for m in members:
        run = stack.runs[m]
        run.train_loss.append(float(np.mean(run._losses)))
        run._losses.clear()
    members = [m for m in members if not stack.runs[m].stopped]  # a failed member's weights are not validated
    if not members:
        return
    metrics = {t.info.name: evaluate_stack(stack, t.info, t.splits["validation"], batch_size * 2, device)
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


def _finish(run: Run, spec: ReadSpec, tasks: list[TaskData], folder: Path, batch_size: int,
            device: torch.device) -> dict:
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
    # The test split is scored by a plain ReadModel with the best weights: what predict-side loads.
    model = build_read(spec, {t.info.name: (t.info.num_labels, None) for t in tasks}).to(device)
    model.load_state_dict(run.best_state)
    save_file({k: v.contiguous().cpu() for k, v in run.best_state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "run": run.config.as_dict(), "read": spec.__dict__,
        "tasks": [{"name": t.info.name, "metric": t.info.metric, "num_labels": t.info.num_labels,
                   "cache": str(t.cache.path), "manifest": t.info.manifest} for t in tasks],
    }, indent=2))
    per_task = {}
    with open(folder / "test_predictions.jsonl", "w") as handle:
        for t in tasks:
            test = t.splits["test"]
            metric, predictions, outputs = evaluate(model, t.info, test, batch_size * 2, device)
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
