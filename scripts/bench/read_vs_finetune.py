"""One READ epoch from the cache against one full fine-tuning epoch of the backbone, on the same rows.

Both train on the cache's training split in the same length-bucketed batches of 32 and validate once;
an epoch's time counts its training batches and its validation pass (READ: train-side's own `train`,
GRU r=144, the cache held in memory; full fine-tuning: scripts/compare's `full` method, AdamW at lr 1e-4).
Opening the cache and loading the backbone are not counted.

    python scripts/bench/read_vs_finetune.py --cache caches/all-MiniLM-L6-v2/sst2 --model models/all-MiniLM-L6-v2
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compare"))  # the comparison's baselines

from cache_store import CacheReader  # noqa: E402
from cache_store.runtime import keep_freed_memory  # noqa: E402
from baselines import train_backprop  # noqa: E402
from side_train.config import RunConfig  # noqa: E402
from side_train.train import train  # noqa: E402


@click.command()
@click.option("--cache", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--model", required=True, help="The backbone the cache was made from (a local folder).")
@click.option("--repeats", type=int, default=2, help="READ epochs timed (the fastest is kept).")
def main(cache, model, repeats):
    keep_freed_memory()
    quiet = dict(progress=False, log=lambda line: None)
    with tempfile.TemporaryDirectory() as out:
        read = min(train(cache, [RunConfig(epochs=1, patience=1, recurrence=True)], Path(out) / str(i), **quiet)[0]
                   ["sweep_epoch_seconds"][0] for i in range(repeats))
    full = train_backprop("full", model, CacheReader(cache), lr=1e-4, seed=0, epochs=1, batch_size=32, device="cpu",
                          options={})["epoch_seconds"][0]
    rows = CacheReader(cache).split("train").n_examples
    print(f"{cache}: {rows} training rows, batch 32, one epoch (training and validation)")
    print(f"READ from the cache (gru r=144) : {read:7.1f} s")
    print(f"full fine-tuning of the backbone: {full:7.1f} s")
    print(f"RATIO READ / full fine-tuning = {read / full:.3f}  (target <= 0.2)")


if __name__ == "__main__":
    main()
