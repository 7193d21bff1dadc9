"""Cache sizes for T5-base and T5-large on QNLI and MNLI under each storage choice, extrapolated from
token lengths measured with T5's tokenizer and each task's T5 template (truncated at 128 tokens), and
whether each fits in one 80 GB GPU.

    python scripts/study/extrapolate_sizes.py --tokenizer ../shared/data/t5/t5-small --glue ../shared/data/glue

QNLI's lengths come from its rows here (an 8,999-row train subset); MNLI's rows are not here, so its
lengths come from GLUE's diagnostic set, 1,104 sentence pairs in MNLI's premise/hypothesis form (an
estimate). Sizes are logical bytes (what the arrays hold before lz4; on disk lz4 takes bfloat16 to about
0.7 of this and int8 or uint8 to less, see cache-inspect on a real cache), over train, validation and
test rows at GLUE's full counts, with every layer stored (cache-activations' default, --layers all).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

ROWS = {"qnli": 104_743 + 5_463, "mnli": 392_702 + 9_815 + 9_832}  # GLUE train + validation (+ mismatched)
BACKBONES = {  # d_model, encoder and decoder layers, heads
    "t5-base": (768, 12, 12, 12),
    "t5-large": (1024, 24, 24, 16),
}
# storage choice -> (bytes per hidden value, per attention value, per key position, keys kept per query
# row: None = all m, encoder hidden width: None = d with no projection). Cross-attention (one row per
# example) stays dense; T5's decoder states (one per example) stay full width.
CHOICES = {
    "bf16 (v1)": (2, 2, 0, None, None),
    "int8 hidden + uint8 attention": (1, 1, 0, None, None),
    "int8 hidden + top-16 uint8 attention": (1, 1, 1, 16, None),
    "int8 hidden + top-8 uint8 attention": (1, 1, 1, 8, None),
    "project 64 + int8 hidden + top-8 uint8 attention": (1, 1, 1, 8, 64),
    "project 32 + int8 hidden + top-8 uint8 attention": (1, 1, 1, 8, 32),
    "project 32 + int8 hidden + top-4 uint8 attention": (1, 1, 1, 4, 32),
    "int4 hidden + top-8 uint8 attention": (0.5, 1, 1, 8, None),
    "int4 hidden + top-4 uint8 attention": (0.5, 1, 1, 4, None),
}
SCALE_BYTES = 4  # float32 per token and layer with int8 hidden states; per 64 channels with int4


def lengths(tokenizer_path: str, glue: Path, task: str, max_length: int = 128) -> np.ndarray:
    from transformers import AutoTokenizer

    from pipeline.tasks import get_task

    spec = get_task(task)
    if task == "qnli":
        source, fields = glue / "QNLI" / "train.tsv", {"question": "question", "sentence": "sentence"}
    else:
        source, fields = glue / "diagnostic" / "diagnostic.tsv", {"premise": "sentence1", "hypothesis": "sentence2"}
    with source.open() as f:
        rows = [{k: r[v] for k, v in fields.items()} for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tokenizer([spec.format(r) for r in rows], truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(i) for i in ids], dtype=np.float64)


def bytes_per_example(m: np.ndarray, backbone: str, choice: str) -> float:
    d, n_enc, n_dec, heads = BACKBONES[backbone]
    hidden, value, key, kept, project = CHOICES[choice]
    keys = m if kept is None else np.minimum(kept, m)

    def scale(width):  # int8: one per token; int4: one per 64 channels
        return SCALE_BYTES if hidden == 1 else SCALE_BYTES * -(-width // 64) if hidden < 1 else 0

    width = project or d
    encoder = (n_enc + 1) * m * (width * hidden + scale(width)) + n_enc * heads * m * keys * (value + key)
    decoder = (n_dec + 1) * (d * hidden + scale(d)) + n_dec * heads * m * value  # cross-attention: one row
    return float(np.mean(encoder + decoder))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--glue", type=Path, required=True)
    args = p.parse_args()
    measured = {task: lengths(args.tokenizer, args.glue, task) for task in ROWS}
    for task, m in measured.items():
        print(f"{task}: mean {m.mean():.1f} tokens, mean m^2 {np.mean(m**2):,.0f} ({len(m)} rows measured)")
    print("\n| backbone | task | storage | bytes per token | total (GB) | fits in 80 GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backbone in BACKBONES:
        for task, m in measured.items():
            for choice in CHOICES:
                per_example = bytes_per_example(m, backbone, choice)
                total = per_example * ROWS[task] / 1e9
                print(f"| {backbone} | {task} | {choice} | {per_example / m.mean():,.0f} | {total:,.0f} | "
                      f"{'yes' if total <= 80 else 'no'} |")


if __name__ == "__main__":
    main()
