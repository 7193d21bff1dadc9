"""Compression ratio and speed of candidate codecs on real-row T5 activations (how COMPRESSOR was chosen).

Runs the backbone over real GLUE rows, takes every array a cache would store (bfloat16 bits by default)
and times each codec on 1 MiB chunks, single-threaded, as the cache's inner chunks are compressed.

    python scripts/bench/compression.py --model ../shared/data/t5/t5-small --init random \
        --data-dir ../shared/data/glue --task rte --limit 64
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import numcodecs
import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.glue_data import load_source_splits
from pipeline.job import array_specs, extract, pad_batch, plan_split, stored_layers
from pipeline.splits import Split, make_splits
from pipeline.tasks import get_task

numcodecs.blosc.set_nthreads(1)
CODECS = {
    "blosc-zstd1-shuffle": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
    "blosc-zstd1-bitshuffle": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.BITSHUFFLE),
    "blosc-lz4-shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
    "blosc-lz4-bitshuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
    "zstd1": numcodecs.Zstd(1),
    "lz4": numcodecs.LZ4(1),
}


@click.command()
@click.option("--model", required=True)
@click.option("--init", default="random")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True)
@click.option("--task", default="rte")
@click.option("--limit", type=int, default=64)
@click.option("--dtype", default="bfloat16")
def main(model, init, data_dir, task, limit, dtype):
    spec = get_task(task)
    _, splits = make_splits(task, load_source_splits(spec, data_dir), 0)
    s = splits["validation"]
    split = Split(s.name, s.source, s.rows[:limit], s.example_index[:limit])
    backbone = load_backbone(model, init, 0, "cpu")
    plan = plan_split(backbone, spec, split, 128)
    specs = array_specs(backbone, "heads", stored_layers(backbone, None))
    groups: dict[str, list[np.ndarray]] = {"hidden": [], "attention": []}
    with torch.inference_mode():
        for start in range(0, plan.n_examples, 16):
            stop = min(start + 16, plan.n_examples)
            ids, mask = pad_batch(plan, start, stop, 0)
            lengths = plan.lengths[start:stop].tolist()
            for path, value in extract(backbone.forward(ids, mask, True), lengths, specs, dtype).items():
                groups["attention" if "attention" in path else "hidden"].append(value.ravel())
    print(f"{backbone.name} ({backbone.init} weights), {plan.n_examples} {task} rows, dtype {dtype}")
    print(f"{'codec':<24}{'kind':<11}{'ratio':>7}{'MB/s in':>10}{'MB/s out':>10}")
    for kind, parts in groups.items():
        data = np.concatenate(parts)
        step = 2**20 // data.itemsize
        chunks = [np.ascontiguousarray(data[i:i + step]) for i in range(0, len(data), step)]
        for name, codec in CODECS.items():
            began = time.perf_counter()
            encoded = [codec.encode(c) for c in chunks]
            enc = time.perf_counter() - began
            began = time.perf_counter()
            for e in encoded:
                codec.decode(e)
            dec = time.perf_counter() - began
            raw, packed = data.nbytes, sum(len(e) for e in encoded)
            print(f"{name:<24}{kind:<11}{raw / packed:7.2f}{raw / enc / 1e6:10.0f}{raw / dec / 1e6:10.0f}")


if __name__ == "__main__":
    main()
