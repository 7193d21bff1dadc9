#!/usr/bin/env bash
# The all-MiniLM-L6-v2 method study (docs/method-study.md), in the order that gives the most for the time
# spent. Every finished configuration is appended to scripts/study/results/minilm.jsonl and skipped when this
# is run again, so it can be stopped and continued. Caches: cache-activations --task T --model
# models/all-MiniLM-L6-v2 --data-dir ../shared/data/glue --limit 4000 --attention heads --quantize none
# (version 1's lossless storage), for T in sst2 mrpc cola stsb rte.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/all-MiniLM-L6-v2}
CACHES=${CACHES:-caches/all-MiniLM-L6-v2}
TASKS=${TASKS:-"sst2 cola stsb mrpc rte"}  # shortest sequences first: the cheapest tasks finish first
compare() { python scripts/compare/methods.py --model "$MODEL" --data-dir ../shared/data/glue \
    --results scripts/study/results/minilm.jsonl --out scripts/study/results/minilm --read-lrs 3e-4,1e-3 --read-epochs 6 \
    --read-memory-gb 0.05 --epochs 3 "$@"; }
for t in $TASKS; do compare --cache "$CACHES/$t" --methods probe; done
# First what the issue's four targets need (READ over 3 seeds, full fine-tuning, LoRA) on every task, then the
# rest of the table: READ online, the no-recurrence ablation, BitFit and prompt tuning.
for t in $TASKS; do
  compare --cache "$CACHES/$t" --methods read --seeds 0
  compare --cache "$CACHES/$t" --methods full,lora --seeds 0
  compare --cache "$CACHES/$t" --methods read --seeds 0,1,2
done
for t in $TASKS; do
  compare --cache "$CACHES/$t" --methods read-online,read-norec --seeds 0 --read-lrs 3e-4
  compare --cache "$CACHES/$t" --methods bitfit,prompt --seeds 0
done
