"""Tables, plots and a JSON summary from methods.py's results (JSON lines, one per finished
configuration and seed). Per (backbone, task, method) the configuration with the best mean validation
metric over its seeds is chosen, and its test metric at each seed's best validation epoch is reported
(mean and spread over seeds)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

LABELS = {"read": "READ (cache)", "read-norec": "READ, no recurrence", "read-online": "READ (online)",
          "full": "full fine-tuning", "bitfit": "BitFit", "lora": "LoRA", "prompt": "prompt tuning",
          "probe": "linear probe"}


def load(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def choose(rows: list[dict]) -> dict:
    """(backbone, task, method) -> the best configuration's summary over its seeds."""
    by_config = defaultdict(list)
    for r in rows:
        by_config[(r["backbone"], r["task"], r["method"], json.dumps(r["config"], sort_keys=True))].append(r)
    best = {}
    for (backbone, task, method, config), runs in by_config.items():
        validation = float(np.mean([r["validation"] for r in runs]))
        current = best.get((backbone, task, method))
        if current is None or validation > current["validation"]:
            tests = [r["test"] for r in runs]
            best[(backbone, task, method)] = {
                "config": json.loads(config), "seeds": sorted(r["seed"] for r in runs),
                "validation": validation, "test": float(np.mean(tests)), "test_std": float(np.std(tests)),
                "test_per_seed": tests, "trainable": runs[0]["trainable"],
                "trainable_percent": runs[0]["trainable_percent"],
                "peak_memory_mib": float(np.mean([r["peak_memory_bytes"] for r in runs])) / 2**20,
                "memory_kind": runs[0]["memory_kind"],
                "train_seconds": float(np.mean([sum(r["epoch_seconds"]) for r in runs])),
                "epoch_seconds": float(np.mean([np.mean(r["epoch_seconds"]) for r in runs])),
                "energy_joules": (float(np.mean([r["energy_joules"] for r in runs]))
                                  if all(r["energy_joules"] is not None for r in runs) else None),
                "device": runs[0]["device"],
            }
    return best


def _fmt(value, digits=1):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _score(c: dict) -> str:
    """Test mean, with its spread where there are several seeds."""
    return f"{c['test']:.2f} ± {c['test_std']:.2f}" if len(c["seeds"]) > 1 else f"{c['test']:.2f}"


def tables(best: dict) -> str:
    """Markdown, per backbone: one row per method with a column per task (test metric, mean ± std over
    seeds), their average, then trainable share, peak memory, time per epoch and energy averaged over the
    tasks the method has run; the issue's targets where both sides have run; then one table per task."""
    out = []
    for backbone in sorted({b for b, _, _ in best}):
        tasks = sorted({t for b, t, _ in best if b == backbone})
        methods = [m for m in LABELS if any((backbone, t, m) in best for t in tasks)]
        out.append(f"### {backbone}\n")
        out.append("| method | " + " | ".join(tasks) + " | average | trainable | peak memory (MiB) "
                   "| s / epoch | energy (J) |")
        out.append("|" + " --- |" * (len(tasks) + 6))
        for m in methods:
            cells = [best.get((backbone, t, m)) for t in tasks]
            have = [c for c in cells if c]
            average = f"{np.mean([c['test'] for c in have]):.2f}" if len(have) == len(tasks) else "–"
            mean = lambda k: (None if any(c[k] is None for c in have) else float(np.mean([c[k] for c in have])))  # noqa: E731
            out.append(f"| {LABELS[m]} | " + " | ".join(_score(c) if c else "–" for c in cells)
                       + f" | {average} | {_fmt(mean('trainable_percent'), 3)}% "
                       f"| {_fmt(mean('peak_memory_mib'), 0)} | {_fmt(mean('epoch_seconds'))} "
                       f"| {_fmt(mean('energy_joules'), 0)} |")
        kinds = sorted({c["memory_kind"] for (b, _, _), c in best.items() if b == backbone})
        devices = sorted({c["device"] for (b, _, _), c in best.items() if b == backbone})
        out.append(f"\nTest metric at the best validation epoch of the configuration with the best mean validation "
                   f"metric (mean ± std over its seeds; no spread where one seed ran). The average needs every "
                   f"task; trainable share, memory, time and energy are means over the tasks the method has run. "
                   f"Memory: {', '.join(kinds)}. Device: {', '.join(devices)}.\n")
        out += targets({t: {m: best[(backbone, t, m)] for m in methods if (backbone, t, m) in best} for t in tasks})
        for t in tasks:
            out.append(f"\n#### {t}\n")
            out.append("| method | test | validation | seeds | trainable | peak memory (MiB) | s / epoch | energy (J) "
                       "| configuration |")
            out.append("|" + " --- |" * 9)
            for m in methods:
                c = best.get((backbone, t, m))
                if c:
                    out.append(f"| {LABELS[m]} | {_score(c)} | {c['validation']:.2f} | {len(c['seeds'])} "
                               f"| {_fmt(c['trainable_percent'], 3)}% | {_fmt(c['peak_memory_mib'], 0)} "
                               f"| {_fmt(c['epoch_seconds'])} | {_fmt(c['energy_joules'], 0)} "
                               f"| {json.dumps(c['config'])} |")
        out.append("")
    return "\n".join(out)


def targets(by_task: dict[str, dict[str, dict]]) -> list[str]:
    """The issue's four targets for READ from the cache, each over the tasks where both methods have run."""
    def paired(other: str, key: str):
        pairs = [(row["read"][key], row[other][key]) for row in by_task.values() if "read" in row and other in row]
        return [p for p in pairs if None not in p]

    lines = ["| target | tasks | READ | other | measured | met |", "| --- | --- | --- | --- | --- | --- |"]
    checks = [("within 1.5 points of full fine-tuning", "full", "test", lambda r, o: r - o, lambda v: v >= -1.5, "{:+.2f}"),
              ("at least 3 points above the linear probe", "probe", "test", lambda r, o: r - o, lambda v: v >= 3, "{:+.2f}"),
              ("peak memory at most 0.3 of full fine-tuning's", "full", "peak_memory_mib", lambda r, o: r / o,
               lambda v: v <= 0.3, "{:.2f}x"),
              ("time per epoch below LoRA's", "lora", "epoch_seconds", lambda r, o: r / o, lambda v: v < 1, "{:.2f}x")]
    for name, other, key, compare, ok, fmt in checks:
        pairs = paired(other, key)
        if not pairs:
            continue
        read, theirs = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
        value = compare(read, theirs)
        lines.append(f"| READ {name} | {len(pairs)} of {len(by_task)} | {read:,.2f} | {theirs:,.2f} "
                     f"| {fmt.format(value)} | {'yes' if ok(value) else '**no**'} |")
    return ["Targets (means over the tasks where both have run):\n", *lines] if len(lines) > 2 else []


def plots(best: dict, out: Path) -> list[Path]:
    """Figure 2 of the paper, per backbone over all its tasks and per task: test metric (averaged over the
    tasks) against energy (time on a CPU, where energy is not measured) and against peak memory, one
    point per method measured on every one of those tasks."""
    written = []
    for backbone in sorted({b for b, _, _ in best}):
        tasks = sorted({t for b, t, _ in best if b == backbone})
        groups = [(tasks, f"figure2-{backbone}.png")] + [([t], f"figure2-{backbone}-{t}.png") for t in tasks]
        for group, name in groups if len(tasks) > 1 else groups[:1]:
            path = _figure([[best.get((backbone, t, m)) for t in group] for m in LABELS], backbone, group, out / name)
            written += [path] if path else []
    return written


def _figure(cells_per_method: list, backbone: str, tasks: list[str], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}
    for m, cells in zip(LABELS, cells_per_method):
        if all(cells):
            energy = None if any(c["energy_joules"] is None for c in cells) else sum(c["energy_joules"] for c in cells)
            points[m] = (float(np.mean([c["test"] for c in cells])), energy,
                         sum(c["train_seconds"] for c in cells), max(c["peak_memory_mib"] for c in cells))
    if not points:
        return None
    use_energy = all(p[1] is not None for p in points.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, (metric, energy, seconds, memory) in points.items():
        for ax, x in zip(axes, (energy if use_energy else seconds, memory)):
            ax.scatter(x, metric, s=40)
            ax.annotate(LABELS[m], (x, metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].set_xlabel("training energy, J" if use_energy else "training time, s (energy is not measured on a CPU)")
    axes[1].set_xlabel("peak training memory, MiB")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("test metric" + (f", average of {len(tasks)} tasks" if len(tasks) > 1 else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{backbone}: {', '.join(tasks)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    best = choose(load(results)) if results.is_file() else {}
    table = out / "table.md"
    table.write_text(tables(best))
    summary = out / "summary.json"
    summary.write_text(json.dumps([{"backbone": b, "task": t, "method": m, **v} for (b, t, m), v in sorted(best.items())],
                                  indent=1))
    return [table, summary, *plots(best, out)]
