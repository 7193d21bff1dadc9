"""The MiniLM study's READ with streaming windows of whole batches (scripts/results/minilm.jsonl) against the
same study with 512-example windows (scripts/results/minilm-512-windows.jsonl): per task, the learning rate with
the best mean validation metric, its test mean ± std over seeds, peak memory and seconds per epoch.

    python scripts/study_windows.py [RESULTS_FOLDER]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TASKS = ("sst2", "cola", "stsb", "mrpc", "rte")


def read_rows(path: Path) -> list[dict]:
    return [row for row in map(json.loads, path.open()) if row["method"] == "read"]


def best(rows: list[dict], task: str) -> tuple[float, list[dict]] | None:
    """(learning rate, its rows over seeds) with the best mean validation metric on `task`."""
    by_lr: dict[float, list[dict]] = {}
    for row in rows:
        if row["task"] == task:
            by_lr.setdefault(row["config"]["lr"], []).append(row)
    if not by_lr:
        return None
    return max(by_lr.items(), key=lambda item: np.mean([r["validation"] for r in item[1]]))


def main(folder: Path) -> None:
    studies = {"512 examples": read_rows(folder / "minilm-512-windows.jsonl"),
               "whole batches (now)": read_rows(folder / "minilm.jsonl")}
    print("| task | windows | lr | seeds | validation | test | peak memory (MiB) | s / epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for task in TASKS:
        for name, rows in studies.items():
            found = best(rows, task)
            if found is None:
                continue
            lr, runs = found
            test = [r["test"] for r in runs]
            spread = f" ± {np.std(test):.2f}" if len(test) > 1 else ""
            memory = np.mean([r["peak_memory_bytes"] for r in runs]) / 2**20
            seconds = np.mean([np.mean(r["epoch_seconds"]) for r in runs])
            print(f"| {task} | {name} | {lr:g} | {len(runs)} | {np.mean([r['validation'] for r in runs]):.2f} | "
                  f"{np.mean(test):.2f}{spread} | {memory:,.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("scripts/results"))
