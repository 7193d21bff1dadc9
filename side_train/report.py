"""What a sweep leaves for a person: summary.csv, summary.md ranked by validation metric, and plots."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("name", "cell", "width", "lr", "seed", "recurrence", "best_validation", "test", "best_epoch",
           "epochs_run", "parameters", "seconds", "status")


def _round(value):
    return None if value is None else round(value, 3)


def _row(m: dict) -> dict:
    c = m["config"]
    return {"name": m["name"], "cell": c["cell"], "width": c["width"], "lr": c["lr"], "seed": c["seed"],
            "recurrence": c["recurrence"], "best_validation": _round(m["best_validation"]),
            "test": _round(m["test"]), "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
            "parameters": m["parameters"], "seconds": m["seconds"], "status": m["status"]}


def write_summary(results: list[dict], out: Path) -> list[Path]:
    """Ranked by validation metric; failed runs (a non-finite loss) last, their status saying why."""
    rows = sorted((_row(m) for m in results),
                  key=lambda r: (r["status"] != "ok", -(r["best_validation"] if r["best_validation"] is not None
                                                         else -float("inf"))))
    metric = results[0]["metric"]
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {results[0]['task']}: {len(rows)} run(s), ranked by validation {metric}", "",
             "| rank | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    lines += [f"| {i} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for i, r in enumerate(rows, 1)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return [out / "summary.csv", out / "summary.md", *_plots(results, out)]


def _plots(results: list[dict], out: Path) -> list[Path]:
    metric = results[0]["metric"]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for m in results:
        loss_ax.plot(range(1, len(m["train_loss"]) + 1), m["train_loss"], label=m["name"])
        val_ax.plot(range(1, len(m["validation"]) + 1), m["validation"], label=m["name"])  # shorter if it failed
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    val_ax.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric}")
    if len(results) <= 12:
        val_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[str, dict[float, list[float]]] = {}  # one line per cell, width and recurrence
    for m in results:
        c = m["config"]
        if m["best_validation"] is not None:
            label = f"{c['cell']} r={c['width']}" + ("" if c["recurrence"] else " no recurrence")
            curves.setdefault(label, {}).setdefault(c["lr"], []).append(m["best_validation"])
    for label, by_lr in sorted(curves.items()):
        lrs = sorted(by_lr)
        means, spreads = [np.mean(by_lr[lr]) for lr in lrs], [np.std(by_lr[lr]) for lr in lrs]
        ax.errorbar(lrs, means, yerr=spreads, fmt="o-", capsize=3, label=label)  # mean and std over seeds
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"best validation {metric}",
           title="sweep: mean over seeds, bars one standard deviation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    return [out / "learning_curves.png", out / "sweep.png"]
