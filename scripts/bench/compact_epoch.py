"""What a compact cache (format v2) buys at training time, against another storage of the same task (the
version 1 layout, or another default), measured side by side in one run. For each cache:

- memory: bytes per token READ's arrays take in memory and on disk, and how many tokens of them fit in
  --budget-gb;
- cold read: the train split's READ arrays read from disk with the page cache dropped for the cache's
  files first (posix_fadvise DONTNEED: no root needed), in tokens per second; with --model, beside the
  backbone's own forward over the same examples (what reading the cache has to beat);
- streaming epoch: one READ epoch with a memory budget below every cache's size, so that the train split
  streams in windows from a cold page cache;
- budget epoch: one epoch under a budget that holds the last cache named (1.2x its size), so that it (and
  any smaller cache) trains from memory while a larger one (v1) streams from disk;
- in-memory epoch: one epoch under a budget that holds every cache, read from a warm page cache: what
  the storage costs READ's own step (dequantizing, assembling batches).

Epoch times are train-side's `sweep_epoch_seconds` (training batches, their reading and assembly, and
the validation pass). Caches and rounds alternate to spread machine noise; ratios are against the first.

    python scripts/bench/compact_epoch.py --cache v1=caches/compact/bf16/all-MiniLM-L6-v2/rte \\
        --cache p32=caches/compact/p32+top8+int8+uint8/all-MiniLM-L6-v2/rte --model models/all-MiniLM-L6-v2
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache_store import CacheReader, SplitPlan
from cache_store.runtime import keep_freed_memory
from side_train.config import RunConfig
from side_train.data import array_paths, read_spec, split_bytes
from side_train.train import train


def drop_page_cache(path: Path) -> None:
    """Evict a cache's files from the page cache, so that the next read comes from the disk."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def memory_bytes(cache: CacheReader, width: int) -> tuple[int, int]:
    """(bytes READ's arrays take in memory over every split, tokens)."""
    spec = read_spec(cache, width, "gru")
    splits = [cache.split(n) for n in cache.split_names]
    return sum(split_bytes(s, spec) for s in splits), sum(int(s.lengths.sum()) for s in splits)


def disk_bytes(cache: CacheReader) -> int:
    return sum(f.stat().st_size for f in cache.path.rglob("*") if f.is_file())


def cold_read(cache: CacheReader, width: int) -> tuple[float, int]:
    """Seconds to read the train split's READ arrays from a cold page cache, and its tokens."""
    drop_page_cache(cache.path)
    split = cache.split("train")
    paths = array_paths(read_spec(cache, width, "gru"), cache.manifest)
    began = time.perf_counter()
    split.load_many(paths, 0, split.n_examples)
    return time.perf_counter() - began, int(split.lengths.sum())


def backbone_forward(model: str, cache: CacheReader) -> float:
    """Seconds for the backbone's forward over the cache's train examples, in the cache's batches."""
    from pipeline.backbones import load_backbone
    from pipeline.padding import pad_batch

    split = cache.split("train")
    manifest = cache.manifest
    backbone = load_backbone(model, manifest["backbone"]["init"], manifest["backbone"]["init_seed"] or 0, "auto",
                             manifest["attention"] != "none", progress=False)
    plan = SplitPlan("train", split.lengths, split.group["input_ids"][:], split.labels, split.example_index)
    batch, pad_id = manifest["batch_size"], backbone.tokenizer.pad_token_id or 0
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, split.n_examples, batch):
            ids, mask = pad_batch(plan, start, min(start + batch, split.n_examples), pad_id)
            backbone.forward(ids, mask, manifest["attention"] != "none")
    return time.perf_counter() - began


def epoch(cache: CacheReader, config: RunConfig, budget: int, out: Path, cold: bool = True) -> tuple[float, str]:
    """One READ epoch's seconds under a memory budget, the page cache dropped first (`cold`); and how the
    splits were opened."""
    if cold:
        drop_page_cache(cache.path)
    lines = []
    (result,) = train([cache.path], [config], out, progress=False, log=lines.append, memory_bytes=budget)
    shutil.rmtree(out, ignore_errors=True)
    opened = next((line for line in lines if "examples; opened" in line), "")
    how = "in memory" if ": holding" in opened else "streamed" if ": streaming" in opened else "?"
    return result["sweep_epoch_seconds"][0], how


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", action="append", required=True, metavar="NAME=PATH",
                   help="a cache to measure, named for the tables (two or more; the first is the reference)")
    p.add_argument("--model", default=None, help="the backbone's folder: also time its forward pass")
    p.add_argument("--width", type=int, default=144)
    p.add_argument("--budget-gb", type=float, default=1.0, help="memory budget for the tokens-that-fit figure")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    keep_freed_memory()
    named = [item.split("=", 1) for item in args.cache]
    if len(named) < 2 or any(len(n) != 2 for n in named):
        p.error("give two or more --cache NAME=PATH")
    caches = {name: CacheReader(Path(path)) for name, path in named}
    first, last = named[0][0], named[-1][0]
    sizes = {name: memory_bytes(c, args.width) for name, c in caches.items()}
    print("| cache | in memory B/token | on disk B/token | tokens in "
          f"{args.budget_gb:g} GiB (millions) |\n| --- | --- | --- | --- |")
    for name, cache in caches.items():
        held, tokens = sizes[name]
        print(f"| {name} ({cache.path}) | {held / tokens:,.0f} | {disk_bytes(cache) / tokens:,.0f} | "
              f"{args.budget_gb * 2**30 / (held / tokens) / 1e6:.2f} |")
    config = RunConfig(width=args.width, lr=1e-3, epochs=1, patience=1, recurrence=True)
    small = min(size for size, _ in sizes.values()) // 2  # below every cache: the train splits stream
    fits = int(sizes[last][0] * 1.2)  # holds the last cache (and any smaller one)
    every = int(max(size for size, _ in sizes.values()) * 1.2)  # holds them all
    results: dict[str, dict[str, list]] = {name: {"read": [], "stream": [], "budget": [], "memory": []}
                                           for name in caches}
    work = Path(tempfile.mkdtemp(prefix="bench-compact-"))
    for r in range(args.rounds):
        for name in (list(caches) if r % 2 == 0 else list(caches)[::-1]):  # alternate to spread machine noise
            cache = caches[name]
            results[name]["read"].append(cold_read(cache, args.width))
            results[name]["stream"].append(epoch(cache, config, small, work / f"{name}-stream"))
            results[name]["budget"].append(epoch(cache, config, fits, work / f"{name}-budget"))
            results[name]["memory"].append(epoch(cache, config, every, work / f"{name}-memory", cold=False))
    shutil.rmtree(work, ignore_errors=True)
    forward = backbone_forward(args.model, caches[first]) if args.model else None
    print("\n| cache | cold read of train, tok/s | streaming epoch (s) | epoch under "
          f"{fits / 2**20:.0f} MiB (s) | epoch in memory (s) |\n| --- | --- | --- | --- | --- |")
    median = lambda name, key: np.median([s for s, _ in results[name][key]])  # noqa: E731
    reads = {name: np.median([t / s for s, t in results[name]["read"]]) for name in caches}
    for name in caches:
        res = results[name]
        print(f"| {name} | {reads[name]:,.0f} | {median(name, 'stream'):.1f} ({res['stream'][0][1]}) | "
              f"{median(name, 'budget'):.1f} ({res['budget'][0][1]}) | {median(name, 'memory'):.1f} |")
    if forward:
        tokens = int(caches[first].split("train").lengths.sum())
        print(f"\nbackbone forward over the same train examples: {tokens / forward:,.0f} tok/s ({forward:.1f} s)")
    for name in list(caches)[1:]:
        print(f"RATIO {first} / {name} epoch time: streaming {median(first, 'stream') / median(name, 'stream'):.2f}x, "
              f"under the budget {median(first, 'budget') / median(name, 'budget'):.2f}x, in memory "
              f"{median(first, 'memory') / median(name, 'memory'):.2f}x; cold read {name} / {first} "
              f"tok/s {reads[name] / reads[first]:.2f}x")


if __name__ == "__main__":
    main()
