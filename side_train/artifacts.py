"""What a finished run leaves in its folder: the best checkpoint tested on every task's test split.

    <run>/config.json              the run's configuration, the READ spec, and per task its cache's manifest
    <run>/model.safetensors        the best-validation weights (ReadModel.member_state): what predict-side loads
    <run>/projection.safetensors   caches made with --project only: the cache's basis (format.projection_paths),
                                   with which predict-side projects new rows as the cache did
    <run>/test_predictions.jsonl   one line per test example: task, example_index, label, prediction
                                   (and probabilities for classification)
    <run>/metrics.json             validation curve, best epoch, test metric, status, parameters, time, memory
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .meter import peak_memory_bytes
from .evaluation import evaluate
from .read_model import ReadModel, ReadSpec
from .stacks import Run


def write_run(run: Run, spec: ReadSpec, tasks: list, folder: Path, batch_size: int, device: torch.device,
              precision: str = "fp32") -> dict:
    """Test the best-validation checkpoint on every task (`tasks`: train.TaskData) and write the run's
    folder; return its metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    status = f"failed: {run.failed}" if run.failed else "ok"
    common = {"config": run.config.as_dict(), "name": run.config.name, "status": status,
              "train_loss": run.train_loss, "epochs_run": len(run.train_loss), "parameters": run.parameters,
              "seconds": round(run.seconds, 3), "peak_memory_bytes": peak_memory_bytes(device),
              "device": device.type, "precision": precision}
    if run.best_state is None:  # failed before its first validation: nothing to test or keep
        metrics = {"task": "+".join(t.info.name for t in tasks), "metric": tasks[0].info.metric if len(tasks) == 1
                   else "mean", "validation": [], "best_validation": None, "best_epoch": None, "test": None,
                   "tasks": {}, **common}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    # The test split is scored by a model of one member with the best weights: what predict-side loads.
    model = ReadModel.from_member_state(spec, {t.info.name: t.info.num_labels for t in tasks}, run.best_state).to(device)
    save_file({k: v.contiguous().cpu() for k, v in run.best_state.items()}, folder / "model.safetensors")
    if spec.projection:
        save_file({k: torch.from_numpy(v) for k, v in tasks[0].cache.projection_arrays().items()},
                  folder / "projection.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "run": run.config.as_dict(), "read": spec.__dict__, "device": device.type, "precision": precision,
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
