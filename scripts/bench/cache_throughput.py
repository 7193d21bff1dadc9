"""cache-activations throughput against a bare backbone forward, measured side by side in one run.

Both loops use the same backbone object, the same length-bucketed batches, the same batch size and the
same attention outputs; the caching loop also drops padding, converts to the storage dtype and writes
the compressed, sharded cache on its background thread. Rounds alternate to spread machine noise.

    python scripts/bench/cache_throughput.py --model ../shared/data/t5/t5-small --init random \
        --data-dir ../shared/data/glue --task rte --split validation --limit 128

Storage choices take cache-activations' options (--quantize, --attention topk:K, --project K, --outliers
K, --layers, --codec); a fitted basis or channels are chosen before the rounds, untimed, as
cache-activations chooses them before writing. Each round writes a whole cache of the split (lock,
manifest, shards, checksums).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

from cache_store import SplitPlan
from cache_store.runtime import keep_freed_memory
from pipeline.config import CacheConfig
from pipeline.glue_data import load_source_splits
from pipeline.job import prepare, run
from pipeline.padding import pad_batch
from pipeline.splits import make_splits


def bare_forward(backbone, plan, batch_size, attentions, order=None) -> float:
    starts = list(range(0, plan.n_examples, batch_size))
    began = time.perf_counter()
    with torch.inference_mode():
        for start in starts:
            stop = min(start + batch_size, plan.n_examples)
            ids, mask = pad_batch(plan, start, stop, backbone.tokenizer.pad_token_id or 0)
            backbone.forward(ids.to(backbone.device), mask.to(backbone.device), attentions)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


@click.command()
@click.option("--model", required=True)
@click.option("--init", default="random")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True)
@click.option("--task", default="rte")
@click.option("--split", default="validation")
@click.option("--limit", type=int, default=128)
@click.option("--batch-size", type=int, default=32)
@click.option("--attention", default="heads")
@click.option("--dtype", default="bfloat16")
@click.option("--quantize", default="", help="cache-activations --quantize, e.g. attention,hidden")
@click.option("--project", type=int, default=0, help="cache-activations --project K")
@click.option("--outliers", type=int, default=0, help="cache-activations --outliers K")
@click.option("--layers", default="all", help="cache-activations --layers read|all")
@click.option("--codec", default="lz4", help="cache-activations --codec")
@click.option("--rounds", type=int, default=5)
@click.option("--shard-mb", type=float, default=64.0)
@click.option("--device", default="auto")
@click.option("--default-malloc", is_flag=True, help="Leave glibc's allocator as it is (see pipeline.runtime).")
def main(model, init, data_dir, task, split, limit, batch_size, attention, dtype, quantize, project, outliers, layers,
         codec, rounds, shard_mb, device, default_malloc):
    if not default_malloc:
        keep_freed_memory()
    out = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    config = CacheConfig(task=task, model=model, init=init, data_dir=data_dir, out=out, splits=(split,),
                         batch_size=batch_size, dtype=dtype, attention=attention, limit=limit, device=device,
                         shard_mb=shard_mb, quantize=tuple(sorted(k for k in quantize.split(",") if k)), project=project,
                         outliers=outliers, layers=layers, codec=codec)
    # Rows, tokens, the backbone and any fitted basis or channels, once and untimed, as cache-activations
    # prepares them before writing.
    ready = prepare(config, progress=False)
    backbone, plan, spec = ready.backbone, ready.plans[split], ready.task
    attentions = config.attention_mode != "none"
    print(f"{backbone.name}: {backbone.n_layers}+{backbone.n_decoder_layers} layers, d={backbone.d_model}, "
          f"{sum(p.numel() for p in backbone.model.parameters()) / 1e6:.1f}M params, device {backbone.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{plan.n_examples} {task}/{split} examples, {int(plan.lengths.sum())} tokens, batch {batch_size}, "
          f"attention {attention}, dtype {dtype}, quantize {quantize or 'none'}, project {project or 'none'}, "
          f"outliers {outliers or 'none'}, layers {layers}, codec {codec}")
    bare_forward(backbone, plan, batch_size, attentions)  # warm-up
    bare, cached, disk = [], [], 0
    for r in range(rounds):
        bare.append(bare_forward(backbone, plan, batch_size, attentions))
        began = time.perf_counter()
        (report,) = run(replace(config, out=out / f"round{r}"), progress=False, ready=ready)
        cached.append(time.perf_counter() - began)
        disk, logical = report.disk_bytes, report.logical_bytes
        shutil.rmtree(out / f"round{r}")
    # The same examples in source order (no length bucketing), for the bucketing gain.
    _, splits = make_splits(task, load_source_splits(spec, data_dir), 0)
    rows = splits[split].rows[:limit]
    tokens_in_order = backbone.tokenize(spec, rows, config.max_length)
    unsorted_plan = SplitPlan(split, np.array([len(t) for t in tokens_in_order]),
                              np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens_in_order]),
                              plan.labels, plan.example_index)
    unbucketed_time = bare_forward(backbone, unsorted_plan, batch_size, attentions)
    shutil.rmtree(out, ignore_errors=True)
    b, c = statistics.median(bare), statistics.median(cached)
    n, tokens = plan.n_examples, int(plan.lengths.sum())
    print(f"bare forward (bucketed)  : {b:7.2f} s  {n / b:8.1f} ex/s  {tokens / b:9.0f} tok/s   rounds {['%.2f' % x for x in bare]}")
    print(f"cache-activations loop   : {c:7.2f} s  {n / c:8.1f} ex/s  {tokens / c:9.0f} tok/s   rounds {['%.2f' % x for x in cached]}")
    print(f"bare forward (unbucketed): {unbucketed_time:7.2f} s  {n / unbucketed_time:8.1f} ex/s")
    print(f"written: {disk / 2**20:.1f} MiB on disk, {logical / 2**20:.1f} MiB raw, compression {logical / disk:.2f}x, "
          f"{disk / tokens:.0f} B/token")
    paired = sorted(x / y for x, y in zip(bare, cached))  # each round's bare and caching loops ran back to back
    print(f"RATIO cache throughput / bare forward throughput = {statistics.median(paired):.3f} "
          f"(median of {rounds} paired rounds, range {paired[0]:.3f}-{paired[-1]:.3f}; target >= 0.9)")
    print(f"bucketing speed-up of the bare forward = {unbucketed_time / b:.2f}x")


if __name__ == "__main__":
    main()
