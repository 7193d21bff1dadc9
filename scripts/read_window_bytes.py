"""How much of READ's training memory streaming needs: the bytes of the two largest windows of a cache's
train split (the window in use and the next, read ahead), computed from the stored lengths.

Splits are stored longest first, so the first two windows are the largest. Per example, READ reads
layers 1..N of hidden states ([m, d]) and attention maps ([A, m, m] per head, or [m, m]), in the
storage dtype.

    python scripts/read_window_bytes.py caches/all-MiniLM-L6-v2/{sst2,cola,stsb,mrpc,rte}
"""
from __future__ import annotations

import sys

import numpy as np

from cache_store import STORAGE_DTYPES, CacheReader
from side_train.data import MIN_WINDOW


def window_bytes(cache: CacheReader, lengths: np.ndarray) -> int:
    m = cache.manifest
    item = STORAGE_DTYPES[cache.dtype][0].itemsize
    heads = {"heads": m["backbone"]["n_heads"], "mean": 1, "none": 0}[m["attention"]]
    tokens, pairs = int(lengths.sum()), int((lengths.astype(np.int64) ** 2).sum())
    return m["backbone"]["n_layers"] * (tokens * m["backbone"]["d_model"] + heads * pairs) * item


def main(paths: list[str]) -> None:
    print(f"| cache | train examples | mean tokens | two largest windows of {MIN_WINDOW} (MiB) |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        cache = CacheReader(path)
        lengths = cache.split("train").lengths
        two = window_bytes(cache, lengths[:2 * MIN_WINDOW])
        print(f"| {path} | {len(lengths)} | {lengths.mean():.1f} | {two / 2**20:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
