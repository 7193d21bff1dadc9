"""cache-activations throughput against a bare backbone forward, measured side by side in one run.

Both loops use the same backbone object, the same length-bucketed batches, the same batch size and the
same attention outputs; the caching loop also drops padding, converts to the storage dtype and writes
the compressed, sharded cache on its background thread. Rounds alternate to spread machine noise.

    python scripts/bench/cache_throughput.py --model ../shared/data/t5/t5-small --init random \
        --data-dir ../shared/data/glue --task rte --split validation --limit 128

Compact storage choices take cache-activations' options (--quantize, --attention topk:K, --project K);
the basis of --project is fitted before the rounds, untimed, as cache-activations fits it before writing.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from cache_store import CacheWriter, SplitPlan
from pipeline.backbones import load_backbone
from pipeline.config import CacheConfig
from pipeline.glue_data import load_source_splits
from cache_store.runtime import keep_freed_memory
from pipeline.job import _cache_split, array_specs, build_manifest, pad_batch, plan_split, stored_layers
from pipeline.projection import fit
from pipeline.splits import Split, make_splits
from pipeline.tasks import get_task


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
@click.option("--rounds", type=int, default=5)
@click.option("--shard-mb", type=float, default=64.0)
@click.option("--device", default="auto")
@click.option("--default-malloc", is_flag=True, help="Leave glibc's allocator as it is (see pipeline.runtime).")
def main(model, init, data_dir, task, split, limit, batch_size, attention, dtype, quantize, project, rounds, shard_mb,
         device, default_malloc):
    if not default_malloc:
        keep_freed_memory()
    out = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    config = CacheConfig(task=task, model=model, init=init, data_dir=data_dir, out=out, splits=(split,),
                         batch_size=batch_size, dtype=dtype, attention=attention, limit=limit, device=device,
                         shard_mb=shard_mb, quantize=tuple(sorted(k for k in quantize.split(",") if k)), project=project)
    spec = get_task(task)
    protocol, splits = make_splits(task, load_source_splits(spec, data_dir), 0)
    chosen = splits[split]
    chosen = Split(chosen.name, chosen.source, chosen.rows[:limit], chosen.example_index[:limit])
    attentions = config.attention_mode != "none"
    backbone = load_backbone(model, init, 0, device, attentions=attentions)
    plan = plan_split(backbone, spec, chosen, config.max_length)
    layers = stored_layers(backbone, None)
    specs = array_specs(backbone, config.attention_mode, layers, config.quantize, config.topk, config.max_length, project)
    projection = fit(backbone, plan, layers["encoder"], project, batch_size, 0, False) if project else None
    on_device = projection.on(backbone.device) if projection else None
    print(f"{backbone.name}: {backbone.n_layers}+{backbone.n_decoder_layers} layers, d={backbone.d_model}, "
          f"{sum(p.numel() for p in backbone.model.parameters()) / 1e6:.1f}M params, device {backbone.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{plan.n_examples} {task}/{split} examples, {int(plan.lengths.sum())} tokens, batch {batch_size}, "
          f"attention {attention}, dtype {dtype}, quantize {quantize or 'none'}, project {project or 'none'}")
    bare_forward(backbone, plan, batch_size, attentions)  # warm-up
    bare, cached, disk = [], [], 0
    for r in range(rounds):
        bare.append(bare_forward(backbone, plan, batch_size, attentions))
        round_config = CacheConfig(**{**config.__dict__, "out": out / f"round{r}"})
        manifest = build_manifest(round_config, backbone, spec, protocol, {split: plan}, layers, None, projection)
        writer = CacheWriter(round_config.cache_dir, manifest, "new", shard_bytes=config.shard_bytes)
        began = time.perf_counter()
        report = _cache_split(writer, backbone, split, plan, specs, round_config, progress=False, projection=on_device)
        cached.append(time.perf_counter() - began)
        disk = report.disk_bytes
        logical = report.logical_bytes
        shutil.rmtree(round_config.out)
    # The same examples in source order (no length bucketing), for the bucketing gain.
    tokens_in_order = backbone.tokenize(spec, chosen.rows, config.max_length)
    unsorted_plan = SplitPlan(chosen.source, np.array([len(t) for t in tokens_in_order]),
                              np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens_in_order]),
                              plan.labels, chosen.example_index)
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
