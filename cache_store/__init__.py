"""The on-disk activation cache (format version 2; version 1 caches read too): `pipeline` writes it,
`side_train` reads it.

One zarr v3 group per (backbone, task), readable with plain `zarr`; several tasks of one backbone go to a
store, one such group per task under one store manifest (drawn in store.py):

    <cache>/                          attrs["read_cache"]: the manifest (below)
      label_head                      float32 [C, d]  T5 and decoder-only LMs: LM-head rows of the label
                                                      words (scaled as T5 scales its decoder output), so
                                                      logits = decoder/hidden/N_dec @ label_head.T (T5) or
                                                      the last real token's encoder/hidden/N @ label_head.T
      projection/mean/{k}             float32 [d]     --project K only: encoder layer k's PCA mean ...
      projection/basis/{k}            float32 [K, d]  ... and basis (orthonormal rows, largest variance first)
      <split>/                        train | validation | test
                                      attrs: complete, n_examples, committed, source, checksums
        offsets                       int64 [n + 1]   example j owns tokens offsets[j]:offsets[j+1]
        attention_offsets             int64 [n + 1]   ... and attention pairs attention_offsets[j]:[j+1]
                                                      (square maps; format.extent gives any layout's)
        input_ids                     int32 [T]       T = real tokens of the split; no padding anywhere
        labels                        int64 [n]       class index (float32 for regression)
        example_index                 int64 [n]       row in the source split (provenance)
        encoder/hidden/{k}            [T, d]          k in the stored layers of 0..N; 0 = embeddings,
                                                      N = final layer-normed output ([T, K] with --project K);
                                                      a decoder-only LM's one (causal) stack is stored here
        encoder/hidden_scale/{k}      float32 [T]     --quantize hidden only: one scale per token
                                      float32 [T, G]  --quantize hidden4: hidden/{k} is uint8 [T, d/2], two
                                                      int4 a byte; one scale per G = d/64 channel groups
        encoder/hidden_outliers/{k}   [T, K]          --outliers K: the K channels the manifest's
                                                      outliers.channels names for hidden/{k}, in the
                                                      storage dtype; the quantized hidden/{k} holds 0 there
        encoder/pooled_{p}/{N}        [n, d]          --project, encoder-only backbones: the final layer's
                                                      mean over real tokens (p = mean) and first token
                                                      (p = first), full width; with --quantize hidden
                                                      int8 beside encoder/pooled_{p}_scale/{N} [n]
        encoder/attention/{k}         [A, S] | [S]    k >= 1; S = sum of m_j^2: example j's [A, m, m]
                                                      block, row-major (heads mode; [S] = head mean)
                                      [A, S]          decoder-only LMs (causal maps): S = sum of
                                                      m_j (m_j + 1) / 2, each block's lower triangle,
                                                      row-major (query i's keys 0..i)
                                      [A, P]          --attention topk:K: P = sum of m_j * min(K, m_j),
                                                      example j's m query rows of min(K, m) entries each
        encoder/attention_keys/{k}    uint8 [A, P]    --attention topk:K only: each entry's key position
                                                      (int16 when max_length > 256)
        decoder/hidden/{k}            [n, d]          T5 only: the single start position, k in 0..N_dec
        decoder/hidden_scale/{k}      float32 [n]     T5, --quantize hidden only
        decoder/hidden_outliers/{k}   [n, K]          T5, --outliers K
        decoder/cross_attention/{k}   [A, T] | [T]    T5 only: start position over the encoder tokens
        ranks/{r}                     only while torchrun ranks write the split (attrs: the shards rank r
                                      wrote, with digests; cache_store/ranked.py); gone once complete

Examples are stored longest first (ties in source order): consecutive examples make length-bucketed
batches; `example_index` maps each back to its source row.

Storage. Float arrays are stored in the manifest's `storage_dtype`: bfloat16 (default; its bits as
uint16, array attr `logical_dtype: bfloat16`), float16 or float32. Version 2 adds the manifest's
`quantize` (a list; empty, or version 1, stores everything in `storage_dtype`), each array's attr
`logical_dtype` saying what it holds. With plain zarr and numpy, the activations are:
  - `hidden` quantized: `logical_dtype: int8`; value = int8 * the `hidden_scale` array's entry for that
    row (its largest magnitude / 127, so every value is within half a scale of the backbone's);
  - `hidden4` quantized: `logical_dtype: int4x2`; byte i of a row holds channel 2i in its low four bits
    and 2i + 1 in its high four, each q + 8 for q in [-7, 7]; value = q * the scale of its group of 64
    channels (the group's largest magnitude / 7: within half a scale) (format.quantize_groups);
  - `attention` quantized (self and cross): `logical_dtype: uint8`; probability = uint8 / 255, each
    entry rounded down or up and each query row's units summing to round(255 * the row's sum), so a row
    still sums to 1 (format.quantize_probabilities).
  - top-k attention (manifest `attention_topk`: {k, residual: renormalised}): each query row's K
    largest entries per head, divided by their sum, in key order; the row's dense map has entry
    attention[a, p] at key attention_keys[a, p] and 0 elsewhere.
  - kept outlier channels (manifest `outliers`: {k, channels: {hidden array path: K channel indices},
    sample}): a quantized hidden array's value at channel channels[i] is hidden_outliers[..., i] instead;
    every other channel is quantized as above, with 0 at the kept ones;
  - projected hidden states (manifest `projection`: {k, method: pca, sample, explained_variance per
    layer, digest of the basis arrays}): hidden state ~ projection/mean/{k} + stored @ projection/basis/{k}
    (after the int8 scale, if quantized); what lies outside the basis's span is not stored.
Each array grows along one ragged axis (attr `grows_along`: tokens | pairs | triangle | topk |
examples, at attr `axis`)
and is sharded along it into inner chunks of about 1 MiB, each compressed (blosc with bit shuffle: zstd at
level 1 by default, another level or lz4 with `--codec`; the manifest's `storage.compressor`) and carrying a crc32c
that zarr checks on every read. Shards of the largest array hold about `storage.shard_bytes`
(format.DEFAULT_SHARD_BYTES, 64 MiB); every array's shards span about as many examples, so `committed`
advances once per shard. The split's
attrs hold an xxh3-128 digest of every shard's content; the manifest one digest per split over those.

Manifest (attrs["read_cache"]): format_version, package_version, created_at, complete, backbone
(name, family, revision, config_hash, init, init_seed, sizes), tokenizer (name, vocab_size, hash),
task (name, version, template, label_words, metric), split_protocol (name, seed, sources), max_length,
storage_dtype, quantize (v2), attention (heads | mean | none), attention_topk (v2), attention_layout (v2:
pairs | triangle | topk; absent: pairs, or topk with attention_topk), projection (v2), outliers (v2),
layers (encoder, decoder), splits
(per-split counts), storage (compressor, shard and chunk sizes), checksums.

Crash safety. Tokens, labels and offsets are written when a split is created; backbone arrays are
written one whole shard at a time, and after each shard the split's `committed` moves to the number of
examples every array holds. A split is read only once `complete`. A resumed writer continues from
the batch holding example `committed` and writes the same bytes as an uninterrupted run.
"""
from .errors import CacheError, UserError
from .format import (
    ATTENTION_MODES, FORMAT_VERSION, SPLITS, STORAGE_DTYPES, ArraySpec, attention_path,
    cross_attention_path, hidden_path,
)
from .reader import Batch, CacheReader, SplitReader
from .source import ActivationSource, SplitSource
from .verify import verify_cache
from .writer import BackgroundWriter, CacheWriter, SplitPlan, SplitWriter

__all__ = [
    "ATTENTION_MODES", "ActivationSource", "SplitSource", "FORMAT_VERSION", "SPLITS", "STORAGE_DTYPES", "ArraySpec", "BackgroundWriter", "Batch",
    "CacheError", "CacheReader", "CacheWriter", "SplitPlan", "SplitReader", "SplitWriter", "UserError",
    "attention_path", "cross_attention_path", "hidden_path", "verify_cache",
]
