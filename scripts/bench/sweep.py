"""A hyper-parameter sweep trained together against the same configurations trained one by one.

The sweep reads the cache into memory once and assembles each batch once for all runs of a seed; the
separate runs each load the cache and assemble their own batches. Same configurations, same epochs.

    python scripts/bench/sweep.py --cache caches/small-t5/sst2 --epochs 1
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from cache_store.runtime import keep_freed_memory
from side_train.config import grid
from side_train.train import train


@click.command()
@click.option("--cache", type=click.Path(path_type=Path), required=True)
@click.option("--epochs", type=int, default=1)
@click.option("--rnn", default="gru,lstm")
@click.option("--hidden", default="32,64")
@click.option("--lr", default="1e-4,3e-4,1e-3")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True)
def main(cache, epochs, rnn, hidden, lr, device, precision):
    keep_freed_memory()
    configs = grid(rnn.split(","), [int(h) for h in hidden.split(",")], [float(x) for x in lr.split(",")], [0],
                   epochs=epochs, patience=epochs)
    out = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    quiet = dict(progress=False, log=lambda line: None, device=device, precision=precision)
    began = time.perf_counter()
    together = train(cache, configs, out / "sweep", **quiet)
    sweep = time.perf_counter() - began
    began = time.perf_counter()
    alone = [train(cache, [c], out / "alone", **quiet)[0] for c in configs]
    separate = time.perf_counter() - began
    same = all(abs(a["train_loss"][-1] - b["train_loss"][-1]) <= 1e-4 * abs(b["train_loss"][-1])
               for a, b in zip(together, alone))
    print(f"{len(configs)} configurations x {epochs} epoch(s) on {cache}")
    print(f"sweep trained together : {sweep:8.1f} s")
    print(f"separate runs          : {separate:8.1f} s")
    print(f"RATIO separate / sweep = {separate / sweep:.2f}x  (target >= 4)")
    print(f"same training losses in both (rel. 1e-4): {same}")


if __name__ == "__main__":
    main()
