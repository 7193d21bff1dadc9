"""Disk size of a store of the paper's seven GLUE tasks (`cache-activations --task glue`) per backbone,
under a storage choice: top-K uint8 attention with uint8 key positions (`--topk`), quantized hidden states
(`--hidden`: int8 or int6 bytes with a float32 scale per token, or int4 two a byte with a scale per 64
channels), layers 1..N or 0..N (`--layers`), max_length 128.

Token lengths are measured with each backbone's own tokenizer and input format on the rows at hand:
CoLA, SST-2, MRPC, STS-B and QNLI from `--glue` (their train splits), QQP and MNLI from the 8,999-row train
subsets in `--subsets` (GLUE's full files are not on this machine). Sizes are at GLUE's full row counts
(train and validation, and MNLI's two validation sets), logical bytes: what the arrays hold before the
codec. `--measured STORE` (a store made with the same storage) adds the on-disk bytes of each of its tasks
against the same formula on its own rows: the ratio the codec achieves on that backbone, which the last
column applies to every backbone's logical bytes (an estimate: the ratio depends on the values).

    python scripts/study/store_size.py --minilm models/all-MiniLM-L6-v2 --t5 ../shared/data/t5/t5-small \\
        --glue ../shared/data/glue --subsets ../shared/data/glue_subsets [--hidden int8 --topk 8 --layers all] [--measured STORE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cache_store.store import GLUE_TASKS

ROWS = {"cola": 8_551 + 1_043, "sst2": 67_349 + 872, "mrpc": 3_668 + 408, "qqp": 363_846 + 40_430,
        "stsb": 5_749 + 1_500, "mnli": 392_702 + 9_815 + 9_832, "qnli": 104_743 + 5_463}
# name -> (tokenizer family, d_model, encoder layers, decoder layers, heads)
BACKBONES = {
    "all-MiniLM-L6-v2": ("minilm", 384, 6, 0, 12),
    "t5-small": ("t5", 512, 6, 6, 8),
    "t5-base": ("t5", 768, 12, 12, 12),
    "t5-large": ("t5", 1024, 24, 24, 16),
}
SCALE = 4  # float32 scale per token and layer (int8, int6), per 64 channels (int4)


def hidden_row_bytes(d: int, hidden: str) -> float:
    """One token's hidden state at one layer: int8 bytes (int8, and int6's 6-bit integers) and a scale, or
    int4 (--quantize hidden4)."""
    return d + SCALE if hidden in ("int8", "int6") else d / 2 + SCALE * -(-d // 64)


def example_bytes(m: np.ndarray, d: int, n_enc: int, n_dec: int, heads: int, hidden: str = "int8", topk: int = 8,
                  first_layer: int = 0) -> np.ndarray:
    """Per example of m tokens: quantized hidden states and their scales at layers first_layer..N, per
    layer k >= 1 each head's top-k entries of each query row (uint8 value and key position); T5's decoder
    start position (one row per layer) with dense uint8 cross-attention over the m tokens."""
    keys = np.minimum(topk, m)
    row = hidden_row_bytes(d, hidden)
    encoder = (n_enc + 1 - first_layer) * m * row + n_enc * heads * m * keys * 2
    decoder = ((n_dec + 1 - first_layer) * row + n_dec * heads * m) if n_dec else 0
    return encoder + decoder


def rows_of(task: str, glue: Path, subsets: Path) -> list[dict]:
    from pipeline.glue_data import load_source_splits
    from pipeline.tasks import get_task

    if task in ("qqp", "mnli"):
        fields = {"qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis")}[task]
        data = json.loads((subsets / task.upper() / "train_subset.json").read_text())
        return [{fields[0]: r["text_a"], fields[1]: r["text_b"]} for r in data.values()]
    return load_source_splits(get_task(task), glue)["train"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minilm", required=True, help="all-MiniLM-L6-v2 folder (its tokenizer)")
    p.add_argument("--t5", required=True, help="a T5 folder (its tokenizer: every T5 size shares it)")
    p.add_argument("--glue", type=Path, required=True)
    p.add_argument("--subsets", type=Path, required=True)
    p.add_argument("--measured", type=Path, help="a store made with the same storage")
    # defaults: cache-activations' default storage
    p.add_argument("--hidden", choices=("int8", "int6", "int4"), default="int6",
                   help="--quantize hidden (int8), hidden6 (int8 bytes) or hidden4 (int4)")
    p.add_argument("--topk", type=int, default=4, help="--attention topk:K")
    p.add_argument("--layers", choices=("read", "all"), default="read", help="--layers read (1..N) or all (0..N)")
    args = p.parse_args()
    shape = dict(hidden=args.hidden, topk=args.topk, first_layer=1 if args.layers == "read" else 0)
    from pipeline.backbones import load_backbone
    from pipeline.tasks import get_task

    # Only their tokenizers and input formats are used: random weights from the configs do (t5-small's
    # folder here has no weights).
    tokenizers = {"minilm": load_backbone(args.minilm, "random", 0, "cpu", progress=False),
                  "t5": load_backbone(args.t5, "random", 0, "cpu", progress=False)}
    rows = {task: rows_of(task, args.glue, args.subsets) for task in GLUE_TASKS}
    lengths = {(family, task): np.array([len(t) for t in backbone.tokenize(get_task(task), rows[task], 128)])
               for family, backbone in tokenizers.items() for task in GLUE_TASKS}
    print("mean tokens per example (MiniLM's tokenizer / T5's): " + ", ".join(
        f"{t} {lengths['minilm', t].mean():.1f} / {lengths['t5', t].mean():.1f}" for t in GLUE_TASKS))
    ratio = measured(args.measured, shape) if args.measured else None
    for title, factor in [("logical bytes", 1.0)] + ([(f"on disk: logical x {ratio:.2f}, the measured ratio", ratio)]
                                                     if ratio else []):
        print(f"\n{title}\n\n| backbone | " + " | ".join(GLUE_TASKS) + " | store | bytes per token |")
        print("| --- | " + " | ".join("---" for _ in GLUE_TASKS) + " | --- | --- |")
        for name, (family, d, n_enc, n_dec, heads) in BACKBONES.items():
            sizes = {t: example_bytes(lengths[family, t], d, n_enc, n_dec, heads, **shape).mean() * ROWS[t] * factor
                     for t in GLUE_TASKS}
            tokens = sum(lengths[family, t].mean() * ROWS[t] for t in GLUE_TASKS)
            print(f"| {name} | " + " | ".join(f"{sizes[t] / 1e9:,.1f} GB" for t in GLUE_TASKS)
                  + f" | **{sum(sizes.values()) / 1e9:,.0f} GB** | {sum(sizes.values()) / tokens:,.0f} |")


def measured(store: Path, shape: dict) -> float:
    """Print each task of a store next to the formula on its own rows; return disk / logical over them all."""
    from cache_store import CacheReader
    from cache_store.location import Location
    from cache_store.store import task_caches

    print("\n| measured task | examples | logical bytes (formula) | on disk | disk / logical |")
    print("| --- | --- | --- | --- | --- |")
    total_logical = total_disk = 0
    for task, path in task_caches(store):
        reader = CacheReader(path)
        b = reader.manifest["backbone"]
        logical = disk = examples = 0
        for split in reader.split_names:
            m = reader.split(split).lengths
            logical += example_bytes(m, b["d_model"], b["n_layers"], b["n_decoder_layers"], b["n_heads"],
                                     **shape).sum()
            disk += sum(Location(path).sizes(split).values())
            examples += len(m)
        total_logical, total_disk = total_logical + logical, total_disk + disk
        print(f"| {b['name']} {task} | {examples} | {logical / 2**20:,.1f} MiB | {disk / 2**20:,.1f} MiB | "
              f"{disk / logical:.2f} |")
    return total_disk / total_logical


if __name__ == "__main__":
    main()
