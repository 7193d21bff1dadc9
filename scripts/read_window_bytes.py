"""How much of READ's training memory streaming needs: the bytes of the two largest windows of a cache's
train split (the window in use and the next, read ahead), computed from the stored lengths, for windows
of one batch (32 examples, what the smallest budget gives) and of 512 (the least before this changed).

Splits are stored longest first, so the first two windows are the largest. The bytes are read off the
stored arrays READ reads (side_train.data.array_paths): each array's extent over those examples along
its ragged axis, times its row size, in its stored dtype.

    python scripts/read_window_bytes.py caches/all-MiniLM-L6-v2/{sst2,cola,stsb,mrpc,rte}
"""
from __future__ import annotations

import sys

import numpy as np

from cache_store import CacheReader, SplitReader
from side_train.data import array_paths, read_spec

WINDOWS = (32, 512)


def window_bytes(reader: SplitReader, examples: int) -> int:
    """Bytes of the arrays READ reads for the split's first `examples` examples."""
    cache = reader.cache
    spec = read_spec(cache, cache.manifest["backbone"]["n_heads"], "gru")  # the width is irrelevant here
    extent = {"tokens": reader.offsets, "pairs": reader.attention_offsets}
    total = 0
    for path in array_paths(spec, cache.manifest):
        array = reader.group[path]
        ends = extent.get(array.attrs["grows_along"])
        rows = int(ends[examples]) if ends is not None else examples  # EXAMPLES: one row per example
        total += rows * int(np.prod(np.delete(array.shape, array.attrs["axis"]))) * array.dtype.itemsize
    return total


def main(paths: list[str]) -> None:
    print("| cache | train examples | mean tokens | "
          + " | ".join(f"two largest windows of {w} (MiB)" for w in WINDOWS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(WINDOWS))
    for path in paths:
        reader = CacheReader(path).split("train")
        two = [window_bytes(reader, min(2 * w, reader.n_examples)) / 2**20 for w in WINDOWS]
        print(f"| {path} | {reader.n_examples} | {reader.lengths.mean():.1f} | "
              + " | ".join(f"{b:,.1f}" for b in two) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
