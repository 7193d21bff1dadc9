#!/usr/bin/env bash
# How READ's gap to fine-tuning falls with training rows, on SST-2 with all-MiniLM-L6-v2 (docs/method-study.md).
# GLUE's 872 dev rows are the test set and 1,000 held-out train rows the validation set at every size; the
# 4,000-row point is the generalisation study's. READ runs with train-side's defaults (one network per layer,
# lr 1e-3, 10 epochs, the best validation epoch kept). Each size's results go to its own JSON lines and a
# finished configuration is skipped when this is run again, so it can be stopped and continued.
#   SIZES="20000 all" bash scripts/study/sst2_rows.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/all-MiniLM-L6-v2}
PY=${PY:-python}
for size in ${SIZES:-20000 all}; do
  out=caches/sst2-rows-$size
  limit=(); [ "$size" = all ] || limit=(--limit "$size")
  [ -e "$out/all-MiniLM-L6-v2/sst2/zarr.json" ] || cache-activations --task sst2 --model "$MODEL" \
      --name all-MiniLM-L6-v2 --data-dir ../shared/data/glue "${limit[@]}" --out "$out" --quiet
  compare() { $PY scripts/compare/methods.py --cache "$out/all-MiniLM-L6-v2/sst2" --model "$MODEL" \
      --data-dir ../shared/data/glue --results "scripts/study/results/sst2-rows/$size.jsonl" \
      --out "scripts/study/results/sst2-rows/$size" "$@"; }
  if [ "$size" = all ]; then  # about 2 hours on 2 cores: one seed, full fine-tuning one epoch
    compare --methods probe --seeds 0
    compare --methods read-norec --read-lrs 1e-3 --read-epochs 10 --seeds 0
    compare --methods full --full-lrs 5e-5 --epochs 1 --seeds 0
  else
    compare --methods probe --seeds 0
    compare --methods read-norec --read-lrs 1e-3 --read-epochs 10 --seeds 0,1,2
    compare --methods lora,full --lora-lrs 1e-3 --full-lrs 5e-5 --epochs 2 --seeds 0
  fi
done
