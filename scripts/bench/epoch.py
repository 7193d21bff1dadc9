"""One READ epoch from the cache against one with the backbone run live, same configuration and batches.

Caches the task first (not timed), then trains one epoch each way and compares the epochs' wall time
(training batches, their assembly or backbone forward included, and the validation pass), not opening
the data. Both runs see the same batches, so they also end with the
same losses (the equivalence test checks this on a float32 cache).

    python scripts/bench/epoch.py --model ../shared/data/t5/t5-small --init random \
        --data-dir ../shared/data/glue --task rte --limit 256
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from cache_store.runtime import keep_freed_memory
from pipeline.config import CacheConfig
from pipeline.job import run as cache_run
from pipeline.live import open_online
from side_train.config import RunConfig
from side_train.train import train


@click.command()
@click.option("--model", required=True)
@click.option("--init", default="random")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True)
@click.option("--task", default="rte")
@click.option("--limit", type=int, default=256)
@click.option("--hidden", type=int, default=128)
@click.option("--rnn", default="gru")
def main(model, init, data_dir, task, limit, hidden, rnn):
    keep_freed_memory()
    out = Path(tempfile.mkdtemp(prefix="bench-epoch-"))
    config = CacheConfig(task=task, model=model, init=init, data_dir=data_dir, out=out, limit=limit)
    cache_run(config, progress=False)
    run = RunConfig(cell=rnn, width=hidden, epochs=1, patience=1, recurrence=True)
    quiet = dict(progress=False, log=lambda line: None)
    (cached,) = train(config.cache_dir, [run], out / "cached", **quiet)
    (online,) = train(open_online(model, task, data_dir=data_dir, limit=limit, init=init), [run], out / "online",
                      **quiet)
    print(f"{task}, {limit} examples per split, {run.name}, batch {run.batch_size}")
    a, b = cached["sweep_epoch_seconds"][0], online["sweep_epoch_seconds"][0]
    print(f"from the cache : {a:7.1f} s per epoch (training batches, assembly included, and validation)")
    print(f"online         : {b:7.1f} s per epoch")
    print(f"RATIO online / from-cache = {b / a:.2f}x  (target >= 5)")


if __name__ == "__main__":
    main()
