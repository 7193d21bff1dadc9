"""READ with its head initialised from a linear probe (linear probing, then tuning: Kumar et al. 2022,
arXiv 2202.10054), one of the things tried to close READ's gap to full fine-tuning on all-MiniLM-L6-v2
(README, "What was tried"). It did not help, so it is an experiment here rather than a train-side option:

    python scripts/try_probe_head.py caches/all-MiniLM-L6-v2/sst2 --c 0.1 --lr 1e-3,3e-3 --epochs 10

The probe is a logistic regression on the raw mean-pooled final states (what a fresh READ network's head
reads, since Up starts at zero). It is fitted without standardisation on purpose: folding a scaler into
the head divides by per-feature deviations, and all-MiniLM-L6-v2 has a constant pooled feature, which
made the first runs diverge. Binary tasks only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_baselines  # noqa: E402
import side_train.stacks as stacks  # noqa: E402
import side_train.train as training  # noqa: E402
from cache_store import CacheReader  # noqa: E402
from side_train.config import grid  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("--c", type=float, default=0.1, help="the probe's inverse regularisation strength")
    p.add_argument("--lr", default="1e-3,3e-3")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("runs/probe-head"))
    args = p.parse_args()
    cache = CacheReader(args.cache)
    if len(cache.manifest["task"]["label_words"]) != 2 or cache.label_head() is not None:
        p.error("a binary task cached from an encoder-only backbone is needed")
    probe = LogisticRegression(C=args.c, max_iter=3000).fit(
        compare_baselines.pooled_features(cache, "train"), cache.split("train").labels)
    w, b = torch.tensor(probe.coef_[0], dtype=torch.float32), float(probe.intercept_[0])
    weight, bias = torch.stack([-w / 2, w / 2]), torch.tensor([-b / 2, b / 2])  # softmax of these = the probe

    fresh = stacks.init_model

    def init_model(*a, **k):
        model = fresh(*a, **k)
        for head in model.heads.values():
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
        return model

    stacks.init_model = init_model
    configs = grid(["gru"], [144], [float(v) for v in args.lr.split(",")], [0], epochs=args.epochs,
                   patience=args.epochs)
    for result in training.train(args.cache, configs, args.out, progress=False):
        print(f"{result['name']}: best validation {result['best_validation']:.2f} at epoch "
              f"{result['best_epoch'] + 1}, test {result['test']:.2f}")


if __name__ == "__main__":
    main()
