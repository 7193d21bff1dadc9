"""What each compact storage choice (format v2) costs READ, against the bfloat16 version 1 layout.

For every task and storage choice it makes the cache (`cache-activations --limit N` with the choice's
options, under --caches/<choice>/), measures its bytes per token on disk (hidden states and attention
maps apart), and trains READ from it over the seeds, with one fixed configuration for every choice (the
side width, learning rate and epochs given). Every finished (task, choice, seed) is appended to
--results (JSON lines) and skipped when run again, so the study can be run in pieces; the table is
rebuilt from that file each time (--report-only: nothing trained).

    python scripts/study/storage.py --model models/all-MiniLM-L6-v2 --data-dir ../shared/data/glue \\
        --tasks sst2,mrpc,cola,stsb,rte --seeds sst2=0,1,2 --seeds mrpc=0,1,2 --limit 2000

Choices (`CHOICES`): the name, then cache-activations' options. `bf16` is the reference: what version 1
stored. READ is trained at train-side's defaults unless --width, --lr or --epochs say otherwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LOSSLESS = ["--attention", "heads", "--quantize", "none", "--project", "0", "--layers", "all"]  # version 1's storage
READ = ["--project", "0", "--layers", "read"]
CHOICES = {  # each choice is given in full: cache-activations' defaults are one of them
    "bf16": LOSSLESS,
    "int8-hidden": [*LOSSLESS, "--quantize", "hidden"],
    "uint8-attention": [*LOSSLESS, "--quantize", "attention"],
    "int8+uint8": [*LOSSLESS, "--quantize", "attention,hidden"],
    "top16+int8+uint8": [*LOSSLESS, "--attention", "topk:16", "--quantize", "attention,hidden"],
    "top8+int8+uint8": [*LOSSLESS, "--attention", "topk:8", "--quantize", "attention,hidden"],
    "p64+top8+int8+uint8": ["--project", "64", "--attention", "topk:8", "--quantize", "attention,hidden"],
    "p32+top8+int8+uint8": ["--project", "32", "--attention", "topk:8", "--quantize", "attention,hidden"],
    "p32+top4+int8+uint8": ["--project", "32", "--attention", "topk:4", "--quantize", "attention,hidden"],
    "top8+int4+uint8": [*LOSSLESS, "--attention", "topk:8", "--quantize", "attention,hidden4"],
    "top4+int8+uint8": [*LOSSLESS, "--attention", "topk:4", "--quantize", "attention,hidden"],
    "top4+int4+uint8": [*LOSSLESS, "--attention", "topk:4", "--quantize", "attention,hidden4"],
    "p192+top8+int8+uint8": ["--project", "192", "--attention", "topk:8", "--quantize", "attention,hidden"],
    "p128+top8+int8+uint8": ["--project", "128", "--attention", "topk:8", "--quantize", "attention,hidden"],
    "top8+int4+uint8+zstd": [*LOSSLESS, "--attention", "topk:8", "--quantize", "attention,hidden4", "--codec", "zstd"],
    "top8+int8+uint8+zstd": [*LOSSLESS, "--attention", "topk:8", "--quantize", "attention,hidden", "--codec", "zstd"],
    # From here on the hidden states READ reads, layers 1..N (`--layers read`, cache-activations' default): layer
    # 0 is never read, so leaving it out changes no metric (tests/test_compact_cache.py), only the bytes.
    "top8+int4o8+uint8": [*READ, "--attention", "topk:8", "--quantize", "attention,hidden4", "--outliers", "8"],
    "top8+int6+uint8": [*READ, "--attention", "topk:8", "--quantize", "attention,hidden6"],
    "top4+int6+uint8": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden6"],
    "top4+int6+uint8+zstd": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden6", "--codec", "zstd"],
    "top4+int5+uint8": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden5"],
    "top4+int5+uint8+zstd": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden5", "--codec", "zstd"],
    "top4+int8+uint8+zstd": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden", "--codec", "zstd"],
    "top8+int8+uint8+read": [*READ, "--attention", "topk:8", "--quantize", "attention,hidden"],
    "top4+int6+uint8+zstd1": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden6", "--codec", "zstd:1"],
    "top4+int5+uint8+zstd1": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden5", "--codec", "zstd:1"],
    "top4+int6o8+uint8": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden6", "--outliers", "8"],
    "top4+int6o8+uint8+zstd1": [*READ, "--attention", "topk:4", "--quantize", "attention,hidden6", "--outliers", "8",
                                "--codec", "zstd:1"],
}
# A codec or layer 0 changes the bytes on disk and nothing READ reads (tests/test_compact_cache.py): such a
# choice is cached for its size, and its metrics are those of the choice that stores the same values.
SAME_VALUES = {"top8+int4+uint8+zstd": "top8+int4+uint8", "top8+int8+uint8+zstd": "top8+int8+uint8",
               "top4+int6+uint8+zstd": "top4+int6+uint8", "top4+int5+uint8+zstd": "top4+int5+uint8",
               "top4+int8+uint8+zstd": "top4+int8+uint8", "top8+int8+uint8+read": "top8+int8+uint8",
               "top4+int6+uint8+zstd1": "top4+int6+uint8", "top4+int5+uint8+zstd1": "top4+int5+uint8",
               "top4+int6o8+uint8+zstd1": "top4+int6o8+uint8"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--init", default="pretrained", help="cache-activations --init (random: code checks only)")
    p.add_argument("--name", default=None, help="the backbone's name in the cache folders (cache-activations --name)")
    p.add_argument("--tasks", default="sst2,mrpc,cola,stsb,rte")
    p.add_argument("--choices", default=",".join(CHOICES))
    p.add_argument("--seeds", action="append", default=[], help="TASK=s,s,...; tasks not named use --default-seeds")
    p.add_argument("--default-seeds", default="0")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--lr", type=float, default=None, help="default: train-side's")
    p.add_argument("--width", type=int, default=None, help="default: train-side's")
    p.add_argument("--epochs", type=int, default=None, help="default: train-side's")
    p.add_argument("--caches", type=Path, default=Path("caches/compact"))
    p.add_argument("--runs", type=Path, default=Path("runs/compact"))
    p.add_argument("--results", type=Path, default=Path("scripts/study/results/compact-v2-minilm.jsonl"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    from side_train.config import RunConfig  # READ as train-side trains it by default when the study runs

    args.lr, args.width, args.epochs = (args.lr or RunConfig.lr, args.width or RunConfig.width,
                                        args.epochs or RunConfig.epochs)
    return args


def bytes_per_token(cache: Path) -> dict[str, float]:
    """Bytes on disk per token of the backbone arrays, by kind (hidden with its scales; attention with
    its key positions, self and cross), over every split."""
    from cache_store import CacheReader
    from cache_store.format import shard_keys

    reader = CacheReader(cache)
    sizes = {"hidden": 0, "attention": 0}
    tokens = 0
    for name in reader.split_names:
        split = reader.split(name)
        tokens += int(split.lengths.sum())
        for path in split.array_paths():
            kind = "attention" if "attention" in path.split("/")[1] else "hidden"
            present = reader.location.sizes(split.name)
            sizes[kind] += sum(present.get(key, 0) for key in shard_keys(split.group[path]))
    return {kind: size / tokens for kind, size in sizes.items()}


def ensure_cache(args, task: str, choice: str) -> Path:
    out = args.caches / choice
    command = [sys.executable, "-m", "pipeline.cli", "--task", task, "--model", args.model, "--data-dir", args.data_dir,
               "--limit", str(args.limit), "--init", args.init, "--out", str(out), "--quiet", *CHOICES[choice]]
    if args.name:
        command += ["--name", args.name]
    found = [p for p in out.glob(f"*/{task}") if (p / "zarr.json").is_file()] if out.is_dir() else []
    if not found:
        subprocess.run(command, check=True)
        found = [p for p in out.glob(f"*/{task}") if (p / "zarr.json").is_file()]
    return found[0]


def train_once(args, cache: Path, task: str, choice: str, seed: int) -> dict:
    from side_train.config import RunConfig
    from side_train.train import train

    config = RunConfig(width=args.width, lr=args.lr, epochs=args.epochs, patience=args.epochs, seed=seed)
    began = time.perf_counter()
    # resume=True: a study killed mid-run continues that run where it stopped (and ends as it would have)
    (result,) = train([cache], [config], args.runs / choice / task, progress=False, log=lambda line: None, resume=True)
    return {"task": task, "choice": choice, "seed": seed, "options": CHOICES[choice],
            "config": {"width": args.width, "lr": args.lr, "epochs": args.epochs, "limit": args.limit},
            "validation": result["best_validation"], "test": result["test"],
            "bytes_per_token": bytes_per_token(cache), "seconds": round(time.perf_counter() - began, 1)}


def key(row: dict) -> tuple:
    return row["task"], row["choice"], row["seed"], json.dumps(row["config"], sort_keys=True)


def report(rows: list[dict], choices: list[str]) -> str:
    """Per choice: bytes per token over the tasks (and its share of bf16's), and test metrics compared with
    bf16 seed for seed: on each task only the seeds both have count, so a task one choice ran on more
    seeds weighs no differently. The spread column gives, per task, the mean difference from bf16, its
    standard deviation over the paired seeds and their number."""
    by = {}
    for r in rows:
        by.setdefault((r["choice"], r["task"]), {})[r["seed"]] = r
    tasks = sorted({t for _, t in by})
    lines = ["| storage | hidden B/token | attention B/token | total | of bf16 | test | test - bf16 | per task: "
             "difference ± sd (seeds) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # bf16's row: its metric ± sd (seeds)
    reference = {t: by[("bf16", t)] for t in tasks if ("bf16", t) in by}
    for choice in choices:
        have = [t for t in tasks if (choice, t) in by and t in reference and set(by[(choice, t)]) & set(reference[t])]
        if not have:
            continue
        sizes = [next(iter(by[(choice, t)].values()))["bytes_per_token"] for t in have]  # the same for every seed
        hidden, attention = np.mean([s["hidden"] for s in sizes]), np.mean([s["attention"] for s in sizes])
        base = np.mean([sum(next(iter(reference[t].values()))["bytes_per_token"].values()) for t in have])
        test, differences, parts = [], [], []
        for t in have:
            seeds = sorted(set(by[(choice, t)]) & set(reference[t]))
            ours = np.array([by[(choice, t)][s]["test"] for s in seeds])
            d = ours - np.array([reference[t][s]["test"] for s in seeds])
            test.append(ours.mean())
            differences.append(d.mean())
            if choice == "bf16":  # the reference's own metrics instead of its zero differences
                parts.append(f"{t} {ours.mean():.2f} ± {ours.std():.2f} ({len(ours)})")
            else:
                parts.append(f"{t} {d.mean():+.2f}" + (f" ± {d.std():.2f}" if len(d) > 1 else "") + f" ({len(d)})")
        name = choice if len(have) == len(reference) else f"{choice} ({len(have)} of {len(reference)} tasks)"
        lines.append(f"| {name} | {hidden:,.0f} | {attention:,.0f} | {hidden + attention:,.0f} | "
                     f"{(hidden + attention) / base:.2f} | {np.mean(test):.2f} | "
                     f"{np.mean(differences):+.2f} | {', '.join(parts)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    rows = [json.loads(line) for line in args.results.open()] if args.results.is_file() else []
    done = {key(r) for r in rows}
    choices = [c for c in args.choices.split(",") if c]
    unknown = [c for c in choices if c not in CHOICES]
    if unknown:
        sys.exit(f"error: unknown choice(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    seeds = {t: [int(s) for s in v.split(",")] for t, v in (item.split("=") for item in args.seeds)}
    config = {"width": args.width, "lr": args.lr, "epochs": args.epochs, "limit": args.limit}
    if not args.report_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for task in [t for t in args.tasks.split(",") if t]:
            for choice in choices:
                for seed in seeds.get(task, [int(s) for s in args.default_seeds.split(",")]):
                    if key({"task": task, "choice": choice, "seed": seed, "config": config}) in done:
                        continue
                    if choice in SAME_VALUES:
                        same = [r for r in rows if key(r) == key({"task": task, "choice": SAME_VALUES[choice],
                                                                  "seed": seed, "config": config})]
                        if not same:
                            continue  # its twin has not run yet
                        row = {**same[0], "choice": choice, "options": CHOICES[choice], "values_of": SAME_VALUES[choice],
                               "bytes_per_token": bytes_per_token(ensure_cache(args, task, choice)), "seconds": 0}
                    else:
                        row = train_once(args, ensure_cache(args, task, choice), task, choice, seed)
                    rows.append(row)
                    with args.results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{task} {choice} seed {seed}: validation {row['validation']:.2f} test {row['test']:.2f} "
                          f"({sum(row['bytes_per_token'].values()):,.0f} B/token, {row['seconds']:.0f} s)", flush=True)
    print(report([r for r in rows if r["config"] == config], choices))  # this configuration's runs only


if __name__ == "__main__":
    main()
