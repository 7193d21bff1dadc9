"""Training epochs of two versions of stage two, side by side in one run: a git revision's `side_train` and
`cache_store` (extracted with `git archive`) against another's (default: the working tree's), on the same
cache, the same configurations and the same batches, each timing in a fresh process, the versions
alternating.

Each measurement is train-side's own epoch loop (`train.train_epoch`: batch assembly, the steps, no
validation) over the first `--batches` batches of the cache's train split, after one untimed epoch.

    python scripts/bench/step_versions.py --before d3d81b5 --after 68256bf --cache caches/all-MiniLM-L6-v2/sst2
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]


def _measure(cache: str, members: int, batches: int, device: str) -> float:
    import torch

    from side_train.config import RunConfig
    from side_train.stacks import make_stacks
    from side_train.train import open_tasks, train_epoch

    torch.manual_seed(0)
    configs = [RunConfig(lr=1e-4 * (m + 1), epochs=2) for m in range(members)]
    tasks = open_tasks([cache], configs[0], 16 * 2**30, log=lambda line: None)
    train = tasks[0].splits["train"]
    train.n_examples = min(train.n_examples, batches * configs[0].batch_size)  # the first batches only
    stacks = make_stacks(configs, tasks[0].cache, [t.info for t in tasks], 10_000, torch.device(device))
    weights = {tasks[0].info.name: 1.0}
    train_epoch(stacks, tasks, weights, 0, configs[0].batch_size, torch.device(device), lambda line: None)  # warm
    began = time.perf_counter()
    train_epoch(stacks, tasks, weights, 1, configs[0].batch_size, torch.device(device), lambda line: None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began


@click.command()
@click.option("--before", required=True, help="The git revision to compare with.")
@click.option("--after", default=None, help="The git revision compared (default: the working tree).")
@click.option("--cache", required=True)
@click.option("--members", default="1,8", help="Configurations per stack, comma-separated.")
@click.option("--batches", type=int, default=60)
@click.option("--repeats", type=int, default=3)
@click.option("--device", default="cpu")
@click.option("--measure", nargs=2, hidden=True, default=None)  # ROOT MEMBERS: one measurement, in this process
def main(before, after, cache, members, batches, repeats, device, measure):
    if measure:
        sys.path.insert(0, measure[0])
        import side_train

        assert side_train.__file__.startswith(measure[0]), side_train.__file__  # the version asked for
        print(json.dumps(_measure(cache, int(measure[1]), batches, device)))
        return
    cache = str(Path(cache).resolve()) if Path(cache).exists() else cache  # the measurements run elsewhere
    with tempfile.TemporaryDirectory() as folder:
        roots = {f"before ({before})": f"{folder}/before"}
        roots[f"after ({after or 'working tree'})"] = f"{folder}/after" if after else str(ROOT)
        for revision, root in ((before, roots[f"before ({before})"]), (after, f"{folder}/after")):
            if revision:
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "side_train", "cache_store"],
                                         check=True, capture_output=True).stdout
                Path(root).mkdir()
                subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
        for count in (int(m) for m in members.split(",")):
            seconds = {name: [] for name in roots}
            for _ in range(repeats):
                for name, root in roots.items():
                    args = [sys.executable, __file__, "--before", before, "--cache", cache, "--batches", str(batches),
                            "--device", device, "--measure", root, str(count)]
                    done = subprocess.run(args, capture_output=True, text=True, cwd=folder)
                    if done.returncode:
                        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                    seconds[name].append(json.loads(done.stdout.splitlines()[-1]))
            (a, b) = (statistics.median(v) for v in seconds.values())
            print(f"{count} member(s), {batches} batches: " + ", ".join(
                f"{name} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" for name, v in seconds.items())
                + f"; after / before {b / a:.3f}")


if __name__ == "__main__":
    main()
