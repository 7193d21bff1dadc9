"""Which side-network choices make READ generalise: each candidate trained on the all-MiniLM-L6-v2 caches
(`--limit 4000`, `cache-activations`' default storage) over a learning-rate grid, test metric at the best
validation epoch. The caches:

    cache-activations --task cola,mrpc,rte,sst2,stsb --model models/all-MiniLM-L6-v2 --name all-MiniLM-L6-v2 \
        --data-dir ../shared/data/glue --limit 4000

    python scripts/study/generalise.py --stage screen    # MRPC, STS-B, SST-2; seed 0; every candidate
    python scripts/study/generalise.py --stage confirm --candidates baseline,best   # five tasks, seeds 0-2
    python scripts/study/generalise.py --stage confirm --candidates best --multi-task  # one network, five heads

A candidate is a set of `train-side` options (`CANDIDATES`). One process trains one (task, candidate,
seed): its learning rates as the members of one sweep, as `train-side --lr a,b,c` does. Every finished
(task, candidate, learning rate, seed) is appended to the results' JSON lines and skipped when the command
is run again, so the study can be stopped and continued. `--report` prints the tables from the results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# name -> train-side options (RunConfig fields) on top of the paper's READ (`--preset paper`) and the
# study's budget; each changes one thing unless its name says otherwise.
CANDIDATES: dict[str, dict] = {
    "paper": {},
    "cutoff-0.1": {"cutoff": 0.1},
    "cutoff-0.2": {"cutoff": 0.2},
    "noise-0.1": {"noise": 0.1},
    "noise-0.3": {"noise": 0.3},
    "side-dropout-0.1": {"side_dropout": 0.1},
    "side-dropout-0.3": {"side_dropout": 0.3},
    "layer-drop-0.2": {"layer_drop": 0.2},
    "dropout-0.1": {"dropout": 0.1},
    "width-256": {"width": 256},
    "no-recurrence": {"recurrence": False},
    "down-norm": {"down_norm": True},
    "layer-mix": {"layer_mix": True},
    "output-gate": {"output_gate": True},
    "token-mix": {"token_mix": True},
    "weight-decay-0.1": {"weight_decay": 0.1},
}
STAGES = {"screen": (("sst2", "stsb", "mrpc"), (0,)), "confirm": (("cola", "mrpc", "rte", "sst2", "stsb"), (0, 1, 2))}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, default="screen")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="comma-separated names of CANDIDATES, or name=a+b to combine candidates")
    p.add_argument("--tasks", help="comma-separated (default: the stage's)")
    p.add_argument("--seeds", help="comma-separated (default: the stage's)")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--epochs", type=int, default=10, help="every run takes all of them; the best epoch is kept")
    p.add_argument("--caches", type=Path, default=ROOT / "caches/all-MiniLM-L6-v2/cola+mrpc+rte+sst2+stsb",
                   help="a folder of the tasks' caches: the store `cache-activations --task cola,mrpc,rte,sst2,stsb` "
                        "writes")
    p.add_argument("--results", type=Path, default=ROOT / "scripts/study/results/generalise.jsonl")
    p.add_argument("--baselines", type=Path, default=ROOT / "scripts/study/results/minilm.jsonl",
                   help="the method study's results, for the targets")
    p.add_argument("--multi-task", action="store_true",
                   help="one READ network over the stage's tasks per candidate and seed (rows: 'NAME (multi-task)')")
    p.add_argument("--report", action="store_true", help="print the stage's tables and stop")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def options_of(name: str) -> dict:
    """A candidate's options: one of CANDIDATES, or `label=a+b` combining several."""
    parts = name.split("=", 1)[-1].split("+")
    unknown = [p for p in parts if p not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    merged = {}
    for part in parts:
        merged.update(CANDIDATES[part])
    return merged


def key(task: str, candidate: str, lr: float, seed: int, epochs: int) -> str:
    return json.dumps([task, candidate, lr, seed, epochs])


def done(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {key(r["task"], r["candidate"], r["config"]["lr"], r["seed"], r["config"]["epochs"]) for r in rows}


def worker(payload: dict) -> list[dict]:
    """In a fresh process: one (task, candidate, seed) over its learning rates, as one sweep; or, with
    several tasks, one multi-task READ network over them (a row per task, the epoch chosen by the mean
    of their validation metrics, as `train-side --multi-task` chooses it)."""
    from side_train.config import PRESETS, RunConfig
    from side_train.train import train

    options = options_of(payload["candidate"])
    configs = [RunConfig(lr=lr, seed=payload["seed"], epochs=payload["epochs"], patience=payload["epochs"],
                         **{**PRESETS["paper"], **options}) for lr in payload["lrs"]]
    tasks = payload["task"].split("+")
    caches = [Path(payload["caches"]) / task for task in tasks]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = train(caches, configs, Path(out), progress=False, log=lambda line: None)
    wall = time.perf_counter() - began
    rows = []
    for config, metrics in zip(configs, results):
        for task in tasks:
            one = metrics if len(tasks) == 1 else {**metrics, **metrics["tasks"].get(task, {})}
            rows.append({"backbone": "all-MiniLM-L6-v2", "task": task, "method": "read",
                         "candidate": payload["candidate"] + (" (multi-task)" if len(tasks) > 1 else ""),
                         "options": options, "config": {"lr": config.lr, "epochs": config.epochs},
                         "seed": config.seed, "status": metrics["status"], "validation": one["best_validation"],
                         "test": one["test"], "best_epoch": metrics["best_epoch"], "validation_curve": one["validation"],
                         "train_loss": metrics["train_loss"], "epoch_seconds": metrics["sweep_epoch_seconds"],
                         "trainable": metrics["parameters"], "sweep_wall_seconds": round(wall, 1),
                         "sweep_members": len(configs), "device": "cpu"})
    return rows


def summarise(results: Path, lrs: list[float], tasks, seeds) -> dict:
    """(candidate, epochs) -> task -> the learning rate among `lrs` with the best mean validation over
    `seeds`, and its test metric per seed; `tasks` only."""
    import numpy as np

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by = {}  # (candidate, epochs) -> task -> lr -> rows
    for r in rows:
        if r["config"]["lr"] in lrs and r["status"] == "ok" and r["task"] in tasks and r["seed"] in seeds:
            per_lr = by.setdefault((r["candidate"], r["config"]["epochs"]), {}).setdefault(r["task"], {})
            per_lr.setdefault(r["config"]["lr"], []).append(r)
    summary = {}
    for run, per_task in by.items():
        for task, per_lr in per_task.items():
            lr, found = max(per_lr.items(), key=lambda kv: np.mean([r["validation"] for r in kv[1]]))
            summary.setdefault(run, {})[task] = {"lr": lr, "tests": [r["test"] for r in found]}
    return summary


def baselines(path: Path) -> dict:
    """method -> task -> test metric, for LoRA, full fine-tuning and the probe from the method study's
    results (the same rows and splits; they are not rerun here)."""
    from scripts.compare.report import choose, load

    return {method: {task: c["test"] for (backbone, task, m), c in choose(load(path)).items()
                     if m == method and backbone == "all-MiniLM-L6-v2"} for method in ("lora", "full", "probe")}


def report(results: Path, lrs: list[float], baseline_path: Path, tasks, seeds) -> str:
    """Per candidate and task: test mean ± standard deviation over seeds at the chosen learning rate; the
    mean over tasks; then, for candidates with 3 seeds of every task of the confirm stage, the accuracy
    targets against the method study's baselines."""
    import numpy as np

    summary = summarise(results, lrs, tasks, seeds)
    tasks = sorted(tasks)
    lines = ["| candidate | epochs | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 3) + "|"]
    confirm, screened = STAGES["confirm"][0], STAGES["screen"][0]
    for (candidate, epochs), per_task in sorted(summary.items()):
        if set(tasks) == set(confirm) and not (set(per_task) - set(screened)):
            continue  # screened only: that table is the screen's
        cells = []
        for task in tasks:
            found = per_task.get(task)
            spread = f" ± {np.std(found['tests']):.2f}" if found and len(found["tests"]) > 1 else ""
            cells.append(f"{np.mean(found['tests']):.2f}{spread} ({found['lr']:g}, n={len(found['tests'])})"
                         if found else "")
        mean = f"{np.mean([np.mean(per_task[t]['tests']) for t in tasks]):.2f}" if len(per_task) == len(tasks) else ""
        lines.append(f"| {candidate} | {epochs} | " + " | ".join(cells) + f" | {mean} |")
    if not baseline_path.is_file() or set(tasks) != set(confirm):
        return "\n".join(lines)
    base = baselines(baseline_path)
    average = {m: np.mean([base[m][t] for t in confirm]) for m in base}
    lines += ["", f"Targets on the five-task average (LoRA {average['lora']:.2f}, full fine-tuning "
                  f"{average['full']:.2f}, probe {average['probe']:.2f}), for candidates with 3 seeds of every task:",
              "", "| candidate | average | vs LoRA | vs full fine-tuning | tasks below the probe |", "|---" * 5 + "|"]
    for (candidate, epochs), per_task in sorted(summary.items()):
        if not all(t in per_task and len(per_task[t]["tests"]) >= 3 for t in confirm):
            continue
        means = {t: float(np.mean(per_task[t]["tests"])) for t in confirm}
        mine = np.mean(list(means.values()))
        below = [t for t in confirm if means[t] < base["probe"][t]]
        lines.append(f"| {candidate} | {mine:.2f} | {mine - average['lora']:+.2f} "
                     f"({'met' if mine >= average['lora'] else 'not met'}) | {mine - average['full']:+.2f} "
                     f"({'within 3' if mine >= average['full'] - 3 else 'not within 3'}"
                     f"{', within 1.5' if mine >= average['full'] - 1.5 else ''}) | {', '.join(below) or 'none'} |")
    complete = {run: per_task for run, per_task in summary.items() if all(t in per_task for t in confirm)}
    for (candidate, epochs), multi in sorted(complete.items()):
        single = complete.get((candidate.removesuffix(" (multi-task)"), epochs))
        if not candidate.endswith(" (multi-task)") or single is None:
            continue
        diffs = {t: np.mean(multi[t]["tests"]) - np.mean(single[t]["tests"]) for t in confirm}
        mean = np.mean(list(diffs.values()))
        lines += ["", f"{candidate} against the single-task networks (test, multi-task minus single-task; the "
                      f"target is within 1 point on the average): {mean:+.2f} "
                      f"({'met' if mean >= -1 else 'not met'})", "",
                  "| " + " | ".join(confirm) + " | average |", "|---" * (len(confirm) + 1) + "|",
                  "| " + " | ".join(f"{diffs[t]:+.2f}" for t in confirm) + f" | {mean:+.2f} |"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    lrs = [float(v) for v in args.lrs.split(",")]
    tasks = args.tasks.split(",") if args.tasks else STAGES[args.stage][0]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else STAGES[args.stage][1]
    if args.report:
        print(report(args.results, lrs, args.baselines, tasks, seeds))
        return
    candidates = args.candidates.split(",")
    for name in candidates:
        options_of(name)  # every name known before anything runs
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for candidate in candidates:  # every task of one candidate before the next candidate
        for task in (["+".join(tasks)] if args.multi_task else tasks):
            label = candidate + (" (multi-task)" if args.multi_task else "")
            for seed in seeds:
                finished = done(args.results)
                todo = [lr for lr in lrs if any(key(t, label, lr, seed, args.epochs) not in finished
                                                for t in task.split("+"))]
                if not todo:
                    continue
                began = time.perf_counter()
                payload = {"task": task, "candidate": candidate, "seed": seed, "lrs": todo, "epochs": args.epochs,
                           "caches": str(args.caches)}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(payload)],
                                      stdout=subprocess.PIPE, text=True)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode or not lines:
                    print(f"{task} {label} seed {seed}: failed (exit {proc.returncode})", file=sys.stderr)
                    continue
                rows = json.loads(lines[-1])
                with open(args.results, "a") as handle:  # whole lines, once the sweep has finished
                    for row in rows:
                        handle.write(json.dumps(row) + "\n")
                summary = ", ".join(f"{r['task']} lr {r['config']['lr']:g}: {r['validation']:.2f}/{r['test']:.2f}"
                                    for r in rows)
                print(f"{label} seed {seed}: {summary} ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
