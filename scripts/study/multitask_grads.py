"""Per-task loss and gradient norm of every step of a multi-task READ run (train-side's defaults), printed
as a table per epoch: what each task's batches do to the shared network.

    OMP_NUM_THREADS=1 python scripts/study/multitask_grads.py caches/all-MiniLM-L6-v2/cola+mrpc+rte+sst2+stsb \\
        --seed 1 --epochs 10 --stop-after 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import side_train.train as training  # noqa: E402
from cache_store.store import task_caches  # noqa: E402
from side_train.config import RunConfig  # noqa: E402


class Stop(Exception):
    pass


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="a store of several tasks' caches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=RunConfig.lr)
    p.add_argument("--epochs", type=int, default=RunConfig.epochs, help="the schedule's length")
    p.add_argument("--stop-after", type=int, default=2, help="epochs to run and report")
    args = p.parse_args(argv)

    seen = defaultdict(list)  # (epoch, task) -> [(loss, gradient norm)]
    step, close = training.train_step, training.close_epoch
    epoch = [0]  # the epoch being trained

    def closed(stack, tasks, finished, *rest, **options):
        epoch[0] = finished + 1
        return close(stack, tasks, finished, *rest, **options)

    def measured(stack, task, batch):
        if epoch[0] >= args.stop_after:
            raise Stop
        step(stack, task, batch)  # the gradients stay until the next step zeroes them
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in stack.model.parameters() if p.grad is not None))
        seen[(epoch[0], task.name)].append((float(stack.last_losses[0]), float(norm)))

    training.train_step, training.close_epoch = measured, closed
    caches = [path for _, path in task_caches(args.store)]
    config = RunConfig(lr=args.lr, seed=args.seed, epochs=args.epochs, patience=args.epochs)
    with tempfile.TemporaryDirectory() as out:
        try:
            training.train(caches, [config], Path(out), progress=False, log=lambda line: None)
        except Stop:
            pass
    print("| epoch | task | steps | mean loss | mean gradient norm | largest gradient norm |")
    print("|---|---|---|---|---|---|")
    for (epoch, task), values in sorted(seen.items()):
        losses, norms = zip(*values)
        print(f"| {epoch + 1} | {task} | {len(values)} | {sum(losses) / len(losses):.3f} | "
              f"{sum(norms) / len(norms):.2f} | {max(norms):.2f} |")


if __name__ == "__main__":
    main()
