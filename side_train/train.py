"""Training READ from a cache: single runs and sweeps, every assembled batch shared by all the runs
of one seed (the cache is read once, into memory; batches are assembled once per seed)."""
from __future__ import annotations

import json
import os
import resource
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
from .read_model import ReadModel, build_read


@dataclass(frozen=True)
class TaskInfo:
    name: str
    metric: str
    num_labels: int  # 1 for regression
    label_head: torch.Tensor | None  # [C, d] or None

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @classmethod
    def from_cache(cls, cache: CacheReader) -> "TaskInfo":
        task = cache.manifest["task"]
        words = task["label_words"]
        return cls(task["name"], task["metric"], len(words) or 1, cache.label_head() if words else None)


def loss_of(task: TaskInfo, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.regression:
        return nn.functional.mse_loss(output.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(output, labels.long())


def predictions_of(task: TaskInfo, output: torch.Tensor) -> torch.Tensor:
    return output.squeeze(-1) if task.regression else output.argmax(-1)


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return batch
    inputs = batch.inputs
    move = lambda xs: None if xs is None else [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
    return TrainBatch(batch.index, batch.labels.to(device), type(inputs)(
        inputs.mask.to(device), move(inputs.encoder_hidden), move(inputs.encoder_attention),
        move(inputs.decoder_hidden), move(inputs.cross_attention)))


@dataclass
class Run:
    """One configuration being trained, with its optimiser, schedule and early-stopping state."""

    config: RunConfig
    model: ReadModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    train_loss: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best: float = -float("inf")
    best_epoch: int = -1
    best_state: dict | None = None
    stopped: bool = False
    seconds: float = 0.0
    _losses: list[float] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_run(config: RunConfig, cache: CacheReader, task: TaskInfo, steps: int, device: torch.device) -> Run:
    torch.manual_seed(config.seed)
    spec = read_spec(cache, config.width, config.cell, config.recurrence)
    model = build_read(spec, {task.name: (task.num_labels, task.label_head)}).to(device)
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
    outputs = torch.cat([model(to_device(batch, device).inputs)[task.name].float().cpu()
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


def train(source, configs: list[RunConfig], out: Path, device: str = "auto",
          progress: bool = True, log=print, memory_bytes: int | None = None) -> list[dict]:
    """Train every configuration on one cache (a path) or live activation source (`train-side --online`);
    write each run's outputs under `out`; return their metrics. A cache's splits are held in memory when
    they fit in `memory_bytes` (default: half the machine's), otherwise streamed."""
    if len({c.batch_size for c in configs}) != 1 or len({(c.epochs, c.patience) for c in configs}) != 1:
        raise ValueError("runs of one sweep share batch size, epochs and patience")
    target = resolve_device(device)
    cache = source if getattr(source, "online", False) else CacheReader(source)
    if cache.manifest["backbone"]["init"] == "random":
        log(f"warning: {cache.path} was cached from a randomly initialised backbone (--init random): "
            "its metrics say nothing about the pretrained model")
    task = TaskInfo.from_cache(cache)
    spec = read_spec(cache, configs[0].width, configs[0].cell)
    began = time.perf_counter()
    if getattr(cache, "online", False):
        splits = {n: OnlineSplit(cache.split(n), spec, cache.manifest) for n in ("train", "validation", "test")}
        how = "the backbone runs live for every batch"
    else:
        splits, how = open_splits(cache, spec, memory_bytes or default_memory_bytes())
    log(f"{cache.path}: {how}; {', '.join(f'{n} {s.n_examples}' for n, s in splits.items())} examples; "
        f"opened in {time.perf_counter() - began:.1f} s")
    batch_size, epochs, patience = configs[0].batch_size, configs[0].epochs, configs[0].patience
    steps = epochs * splits["train"].n_batches(batch_size)
    runs = [make_run(c, cache, task, steps, target) for c in configs]
    seeds = sorted({c.seed for c in configs})
    bar = tqdm(total=epochs, unit="epoch", desc=f"{task.name}: {len(runs)} run(s)", disable=not progress)
    epoch_seconds = []  # wall time of each epoch for the whole sweep: batches (assembly included) and validation
    for epoch in range(epochs):
        epoch_began = time.perf_counter()
        for seed in seeds:
            group = [r for r in runs if r.config.seed == seed and not r.stopped]
            if not group:
                continue
            for batch in splits["train"].batches(batch_size, shuffle=True, seed=seed * 100_003 + epoch):
                batch = to_device(batch, target)  # assembled once for the whole group
                for run in group:
                    started = time.perf_counter()
                    loss = loss_of(task, run.model(batch.inputs)[task.name], batch.labels)
                    run.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    run.optimizer.step()
                    run.schedule.step()
                    run._losses.append(loss.item())
                    run.seconds += time.perf_counter() - started
                del batch, loss  # free this batch before the generator assembles the next one
        for run in runs:
            if run.stopped:
                continue
            started = time.perf_counter()
            run.train_loss.append(float(np.mean(run._losses)))
            run._losses.clear()
            metric, _, _ = evaluate(run.model, task, splits["validation"], batch_size * 2, target)
            run.validation.append(metric)
            if metric > run.best:
                run.best, run.best_epoch = metric, epoch
                run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            elif epoch - run.best_epoch >= patience:
                run.stopped = True
            run.seconds += time.perf_counter() - started
        epoch_seconds.append(round(time.perf_counter() - epoch_began, 3))
        best = max(runs, key=lambda r: r.best)
        bar.set_postfix_str(f"best {best.config.name} {best.best:.2f}")
        bar.update(1)
        if all(r.stopped for r in runs):
            break
    bar.close()
    return [{**_finish(run, task, cache, splits["test"], out / run.config.name, batch_size, target),
             "sweep_epoch_seconds": epoch_seconds} for run in runs]


def _finish(run: Run, task: TaskInfo, cache, test: InMemorySplit | StreamingSplit | OnlineSplit, folder: Path,
            batch_size: int, device: torch.device) -> dict:
    """Test the best-validation checkpoint and write what a person looks at."""
    folder.mkdir(parents=True, exist_ok=True)
    run.model.load_state_dict(run.best_state)
    metric, predictions, outputs = evaluate(run.model, task, test, batch_size * 2, device)
    save_file({k: v.contiguous().cpu() for k, v in run.best_state.items()}, folder / "model.safetensors")
    spec = run.model.spec
    (folder / "config.json").write_text(json.dumps({
        "run": run.config.as_dict(), "read": spec.__dict__, "cache": str(cache.path),
        "task": task.name, "metric": task.metric, "num_labels": task.num_labels,
    }, indent=2))
    with open(folder / "test_predictions.jsonl", "w") as handle:
        for j in range(test.n_examples):
            row = {"example_index": int(test.example_index[j]), "label": test.labels[j].item(),
                   "prediction": predictions[j].item()}
            if not task.regression:
                row["probabilities"] = torch.softmax(torch.from_numpy(outputs[j]), -1).tolist()
            handle.write(json.dumps(row) + "\n")
    metrics = {
        "task": task.name, "metric": task.metric, "config": run.config.as_dict(), "name": run.config.name,
        "validation": run.validation, "best_validation": run.best, "best_epoch": run.best_epoch,
        "test": metric, "train_loss": run.train_loss, "epochs_run": len(run.train_loss),
        "parameters": run.parameters, "seconds": round(run.seconds, 3),
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
