"""`predict-side`: a trained READ checkpoint (single- or multi-task) applied to new rows of text.

Each input is one JSON object (or TSV row, with a header) carrying a task's field names, and optionally
`task` to say which task's input format to use (by default the first of the checkpoint's tasks whose
fields it has). The backbone runs once per input; every head of the checkpoint reads that one pass.
The backbone is pipeline/live.py's Predictor, which the command line (side_train/cli.py) hands in: this
module never imports stage one.

Batches follow training exactly: inputs ordered longest first, the backbone run in the cache's batch
size, activations rounded to the cache's dtype, READ run in training's evaluation batch size. So on a
cache's test examples (given in the split's order) the outputs equal the test predictions training
recorded, bit for bit.
"""
from __future__ import annotations

import csv
import math
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cache_store import UserError
from cache_store.format import stored_layout, stored_topk

from .data import assemble_computed, outlier_channels
from .devices import inputs_to, precision_scope
from .read_model import ReadModel, ReadSpec


@dataclass
class Checkpoint:
    model: ReadModel
    tasks: list[dict]  # per task: name, metric, num_labels, manifest (of the cache it was trained from)
    batch_size: int  # training's evaluation batch size
    projection: dict[str, np.ndarray] | None = None  # --project caches: the basis (format.projection_paths)
    precision: str = "fp32"  # training's (devices.PRECISIONS); checkpoints from before it existed: fp32

    @property
    def manifest(self) -> dict:
        return self.tasks[0]["manifest"]


def load_checkpoint(run_dir: Path) -> Checkpoint:
    config_file, weights = Path(run_dir) / "config.json", Path(run_dir) / "model.safetensors"
    if not (config_file.is_file() and weights.is_file()):
        raise UserError(f"--checkpoint {run_dir}: no READ checkpoint there (config.json and model.safetensors, "
                        "written by train-side in runs/<model>-<task>/<run>)")
    config = json.loads(config_file.read_text())
    if "tasks" not in config:
        raise UserError(f"--checkpoint {run_dir} was written by an older train-side; retrain it")
    # Checkpoints from before `pooling` existed read the first token.
    spec = ReadSpec(**{"pooling": "first", **config["read"]})
    model = ReadModel.from_member_state(spec, {t["name"]: t["num_labels"] for t in config["tasks"]}, load_file(weights))
    projection = None
    if spec.projection:
        basis = Path(run_dir) / "projection.safetensors"
        if not basis.is_file():
            raise UserError(f"--checkpoint {run_dir} was trained on a --project cache but lacks projection.safetensors "
                            "(the basis); retrain it")
        projection = {k: v.numpy() for k, v in load_file(basis).items()}
    return Checkpoint(model.eval(), config["tasks"], config["run"]["batch_size"] * 2, projection,
                      config.get("precision", "fp32"))


def read_rows(text: str, where: str) -> list[dict]:
    """JSON lines (one object per line), or TSV whose first row names the fields."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{where} has no inputs")
    if not lines[0].lstrip().startswith("{"):
        rows = list(csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows:
            raise UserError(f"{where}: a TSV input needs a header row naming the fields, then one row per input")
        return rows
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} line {number} is not JSON ({exc.msg}); give one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} line {number} is not a JSON object; give one object per line")
        rows.append(row)
    return rows


def task_of(row: dict, tasks: list[dict], number: int) -> dict:
    """The task whose input format a row is written in."""
    if "task" in row:
        found = [t for t in tasks if t["name"] == row["task"]]
        if not found:
            raise UserError(f"input {number} asks for task {row['task']!r}; this checkpoint has "
                            f"{', '.join(t['name'] for t in tasks)}")
        task = found[0]
    else:
        fits = [t for t in tasks if all(f in row for f in t["manifest"]["task"]["fields"])]
        task = fits[0] if fits else tasks[0]
    missing = [f for f in task["manifest"]["task"]["fields"] if f not in row]
    if missing:
        raise UserError(f"input {number} lacks {', '.join(missing)}: task {task['name']} reads the fields "
                        f"{', '.join(task['manifest']['task']['fields'])}")
    return task


def predict(checkpoint: Checkpoint, predictor, rows: list[dict], batch_size: int | None = None,
            progress: bool = True) -> Iterator[dict]:
    """One record per input, in input order: the input's task, and every head's prediction (label index
    and name with the probabilities, or a score)."""
    model, manifest = checkpoint.model, checkpoint.manifest
    # READ runs where the backbone does (--device), in training's precision where the device has it
    # (TF32 is CUDA's): on the device training used, the outputs are training's.
    device = getattr(predictor, "device", torch.device("cpu"))
    precision = checkpoint.precision if checkpoint.precision != "tf32" or device.type == "cuda" else "fp32"
    model = model.to(device)
    read_batch = batch_size or checkpoint.batch_size
    attention, per_head = manifest["attention"] != "none", manifest["attention"] == "heads"
    channels = outlier_channels(manifest)
    chosen = [task_of(row, checkpoint.tasks, n) for n, row in enumerate(rows, 1)]
    records: list[dict | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), unit="input", desc="predict-side", disable=not progress)
    for task in checkpoint.tasks:
        positions = [i for i, t in enumerate(chosen) if t is task]
        if not positions:
            continue
        plan = predictor.plan(task["manifest"]["task"], [rows[i] for i in positions])
        # The backbone runs in the cache's batches and READ in training's evaluation batches, both counted
        # from the first example, as when the cache was made and training evaluated: blocks of a common
        # multiple of the two keep both sets of boundaries, so the values are training's to the last bit.
        block = math.lcm(read_batch, predictor.batch_size)
        for start in range(0, plan.n_examples, block):
            index = np.arange(start, min(start + block, plan.n_examples))
            arrays = predictor.compute(plan, index)
            lengths = torch.from_numpy(plan.lengths[index])
            for part in torch.arange(len(index)).split(read_batch):
                inputs = inputs_to(assemble_computed(arrays, lengths, model.spec, attention, per_head, part,
                                                     stored_layout(manifest), stored_topk(manifest), channels), device)
                with torch.no_grad(), precision_scope(precision, device):
                    features = model.features(inputs)  # [1, B, d]: the checkpoint is a model of one member
                    outputs = {t["name"]: model.heads[t["name"]](features)[0].float().cpu() for t in checkpoint.tasks}
                for k, j in enumerate(index[part.numpy()]):
                    position = positions[int(plan.example_index[j])]
                    records[position] = {"index": position, "task": task["name"],
                                         "predictions": {t["name"]: _prediction(t, outputs[t["name"]][k])
                                                         for t in checkpoint.tasks}}
                bar.update(len(part))
    bar.close()
    yield from records


def _prediction(task: dict, output: torch.Tensor) -> dict:
    if task["num_labels"] == 1:
        return {"prediction": output.squeeze(-1).item()}
    index = int(output.argmax(-1))
    words = task["manifest"]["task"]["label_words"]
    return {"prediction": index, "label": words[index], "probabilities": torch.softmax(output, -1).tolist()}
