#!/usr/bin/env bash
# Every CUDA path of the pipeline, once, on one GPU, with the measurements docs/benchmarks.md reports from it.
# Needs the package installed (pip install -e ".[compare]", nvidia-ml-py) and, in $DATA:
#   all-MiniLM-L6-v2/, glue/{SST-2,RTE}/{train,dev}.tsv, t5/t5-small/ (config and tokenizer)
#
#     DATA=path/to/data WORK=/tmp/gpu bash scripts/gpu/checks.sh 2>&1 | tee gpu.log
#
# Steps run in order of importance, each under its own time limit; after a failure the script goes on
# and the log says which step failed. DATA=... DEVICE=cpu SST_LIMIT=200 tries the script on a CPU.
# The steps' limits add up to more than 10 minutes: to run them in parts, name the steps, e.g.
# ONLY="cache-sst2 train-sst2 predict compare" first, with the same WORK.
set -u
DATA=${DATA:?folder with all-MiniLM-L6-v2/, glue/ and t5/}
WORK=${WORK:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
SST_LIMIT=${SST_LIMIT:-4000}
PY=${PYTHON:-python3}  # GPU images may have python3 and no python
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
C="$WORK/caches"; R="$WORK/runs"; MINI="$DATA/all-MiniLM-L6-v2"; GLUE="$DATA/glue"
SST="$C/all-MiniLM-L6-v2/sst2"; RTE="$C/all-MiniLM-L6-v2/rte"
mkdir -p "$WORK"

energy() { if [[ $DEVICE == cuda* ]]; then $PY scripts/gpu/energy.py -- "$@"; else "$@"; fi; }
step() {  # step NAME SECONDS COMMAND...; ONLY="name name ..." runs those steps alone
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return 0
    echo; echo "=== $name ($(date +%T), limit ${limit} s)"
    timeout "$limit" bash -c '"$@"' _ "$@"; rc=$?  # bash -c: the helpers below are shell functions
    echo "=== $name: exit $rc after $((SECONDS - began)) s"
}
cache() { cache-activations --data-dir "$GLUE" --out "$C" --device "$DEVICE" --quiet "$@"; }
train() { train-side --out "$R" --device "$DEVICE" --quiet "$@"; }
predict() { predict-side --model "$MINI" --device "$DEVICE" --quiet "$@"; }
export -f energy cache train predict
export DEVICE C R MINI GLUE PY

[[ $DEVICE == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# Stage one: the study's SST-2 cache (4,000 training rows), a small RTE cache, a random t5-small one
step cache-sst2 150 energy cache --task sst2 --model "$MINI" --limit "$SST_LIMIT"
step cache-rte 60 cache --task rte --model "$MINI" --limit 300
step cache-t5 90 cache --task rte --model "$DATA/t5/t5-small" --init random --limit 200
step verify 60 cache-inspect "$SST" --verify

# Stage two: one run (time and energy) and predict-side on its checkpoint
step train-sst2 120 energy train --from-cache "$SST" --epochs 3 --lr 1e-3
$PY - "$GLUE/SST-2/dev.tsv" "$WORK/inputs.jsonl" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))[:200]
open(sys.argv[2], "w").write("".join(json.dumps({"sentence": r["sentence"]}) + "\n" for r in rows))
PY
single=$(ls -d "$R"/all-MiniLM-L6-v2-sst2/*/ | head -1)
step predict 60 predict --checkpoint "$single" --input "$WORK/inputs.jsonl" --output "$WORK/pred.jsonl"

# Multi-task (two caches, one network) and its predict-side; an encoder-decoder (random t5-small)
step train-multi 90 train --multi-task --from-cache "$SST" --from-cache "$RTE" --epochs 1
multi=$(ls -d "$R"/all-MiniLM-L6-v2-sst2+rte/*/ | head -1)
step predict-multi 60 predict --checkpoint "$multi" --input "$WORK/inputs.jsonl" --output "$WORK/pred-multi.jsonl"
head -c 300 "$WORK/pred-multi.jsonl"; echo
step train-t5 60 train --from-cache "$C/t5-small-random/rte" --epochs 1

# The methods on the same rows, each in its own process: peak GPU memory, energy, epoch time
step compare 300 $PY scripts/compare/methods.py --cache "$SST" --model "$MINI" --data-dir "$GLUE" \
    --methods read,read-online,full,bitfit,lora --seeds 0 --read-lrs 1e-3 --full-lrs 5e-5 --bitfit-lrs 3e-3 \
    --lora-lrs 1e-3 --read-epochs 3 --epochs 3 --device "$DEVICE" --results "$WORK/compare.jsonl" --out "$WORK/compare"

# Throughput: one member and a sweep's stack of eight, against torch.mm of the same products
step throughput 120 $PY scripts/bench/throughput.py "$SST" --device "$DEVICE" --batches 60 --profile
step throughput-8 60 $PY scripts/bench/throughput.py "$SST" --device "$DEVICE" --batches 60 --members 8

# A torchrun sweep of two ranks (both on this one GPU); a sweep trained together against one by one
step torchrun 120 torchrun --nproc-per-node 2 "$(which train-side)" --from-cache "$RTE" --lr 3e-4,1e-3 \
    --seeds 0,1 --epochs 1 --out "$R/torchrun" --device "$DEVICE" --quiet
step sweep 150 $PY scripts/bench/sweep.py --cache "$SST" --epochs 1 --rnn gru --hidden 64 --lr 1e-4,3e-4,1e-3,3e-3
du -sh "$C"/*/*
