"""Peak memory of READ trained from a cache against full fine-tuning of the same backbone, same batch size.

Each mode runs in its own process for `--steps` training steps on the same task's train split; the
script reports each process's peak resident memory, absolute and above its baseline after imports
(on a GPU, torch.cuda.max_memory_allocated instead). Full fine-tuning trains every backbone weight
with AdamW on the label word (T5's own objective); READ trains from the cache, streaming the split so
that only two windows of `--window` examples' activations are held.

    python scripts/bench/memory.py --cache caches/t5-small-random/rte --model ../shared/data/t5/t5-small \
        --init random --data-dir ../shared/data/glue
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import click


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read(cache: str, batch_size: int, steps: int, window: int) -> dict:
    import torch

    from cache_store import CacheReader
    from side_train.config import RunConfig
    from side_train.data import StreamingSplit, read_spec
    from side_train.tasks import TaskInfo
    from side_train.stacks import make_stacks, train_step

    baseline = _rss()
    reader = CacheReader(cache)
    task = TaskInfo.from_cache(reader)
    config = RunConfig(batch_size=batch_size, recurrence=True)
    spec = read_spec(reader, config.width, config.cell)
    train = StreamingSplit(reader.split("train"), spec, window)
    (stack,) = make_stacks([config], reader, [task], steps, torch.device("cpu"))
    for i, batch in enumerate(train.batches(batch_size, shuffle=True)):
        if i == steps:
            break
        train_step(stack, task, batch, 0, print)
        del batch
    return {"mode": f"READ from cache (windows of {window} examples)", "baseline": baseline, "peak": _rss(),
            "trainable_parameters": stack.runs[0].parameters}


def _finetune(model: str, init: str, data_dir: str, task_name: str, batch_size: int, steps: int) -> dict:
    import torch

    from pipeline.backbones import load_backbone
    from pipeline.glue_data import load_source_splits
    from pipeline.splits import make_splits
    from pipeline.tasks import get_task

    baseline = _rss()
    task = get_task(task_name)
    _, splits = make_splits(task.name, load_source_splits(task, Path(data_dir)), 0)
    backbone = load_backbone(model, init, 0, "cpu", attentions=False)
    net = backbone.model.train().requires_grad_(True)
    label_ids = torch.tensor(backbone.label_head(task)[0])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    rows = splits["train"].rows
    for step in range(steps):
        chunk = rows[step * batch_size:(step + 1) * batch_size]
        encoded = backbone.tokenizer([task.format(r) for r in chunk], truncation=True, max_length=128,
                                     padding=True, return_tensors="pt")
        labels = label_ids[torch.tensor([r["label"] for r in chunk])][:, None]  # [B, 1]: the label word
        loss = net(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"mode": "full fine-tuning", "baseline": baseline, "peak": _rss(),
            "trainable_parameters": sum(p.numel() for p in net.parameters())}


@click.command()
@click.option("--cache", required=True)
@click.option("--model", required=True)
@click.option("--init", default="random")
@click.option("--data-dir", required=True)
@click.option("--batch-size", type=int, default=32)
@click.option("--steps", type=int, default=8)
@click.option("--window", type=int, default=32, help="Examples of activations READ holds at a time (x2); default one batch.")
@click.option("--mode", type=click.Choice(["read", "finetune"]), default=None, hidden=True)
def main(cache, model, init, data_dir, batch_size, steps, window, mode):
    if mode == "read":
        print(json.dumps(_read(cache, batch_size, steps, window)))
        return
    if mode == "finetune":
        task = json.loads((Path(cache) / "zarr.json").read_text())["attributes"]["read_cache"]["task"]["name"]
        print(json.dumps(_finetune(model, init, data_dir, task, batch_size, steps)))
        return
    results = []
    for which in ("read", "finetune"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", which],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['mode']}: peak {r['peak'] / 2**20:.0f} MiB, {(r['peak'] - r['baseline']) / 2**20:.0f} MiB "
              f"above the {r['baseline'] / 2**20:.0f} MiB after imports; {r['trainable_parameters']:,} trainable")
    read, tune = results
    print(f"RATIO READ / full fine-tuning, peak = {read['peak'] / tune['peak']:.2f}; above baseline = "
          f"{(read['peak'] - read['baseline']) / (tune['peak'] - tune['baseline']):.2f}  (target <= 0.20)")


if __name__ == "__main__":
    main()
