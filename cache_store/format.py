"""Constants and helpers of the cache format (v2; v1 is read too): names, storage dtypes, quantization,
chunk grids, checksums, manifests."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import xxhash
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import CacheError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: every float array in storage_dtype; v2 adds the manifest's `quantize`
MANIFEST_KEY = "read_cache"
SPLITS = ("train", "validation", "test")
ATTENTION_MODES = ("heads", "mean", "none")
# What a manifest's task.metric may name: stage one records it, stage two computes it (side_train/metrics.py).
METRIC_NAMES = ("accuracy", "matthews", "f1_accuracy", "pearson_spearman")

# logical dtype -> (numpy storage dtype, torch logical dtype). bfloat16 has no numpy dtype: its bits
# are stored as uint16 and reinterpreted on read.
STORAGE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float16": (np.dtype(np.float16), torch.float16),
    "float32": (np.dtype(np.float32), torch.float32),
}

# Quantized arrays (format v2, `cache-activations --quantize`): the choices, and the dtype each stores its
# array kind in. hidden: int8, one scale per row (quantize_rows); hidden6 and hidden5: the same int8 bytes
# holding integers of 6 or 5 bits (|q| <= 31 or 15), whose top bits the codec's bit shuffle turns into
# runs it compresses away; hidden4: int4, two per byte, one scale per group of HIDDEN4_GROUP channels of a
# row (quantize_groups); attention: uint8 units (quantize_probabilities).
QUANTIZED = {"hidden": "int8", "hidden6": "int6", "hidden5": "int5", "hidden4": "int4x2", "attention": "uint8"}
HIDDEN_CHOICES = ("hidden", "hidden6", "hidden5", "hidden4")  # how hidden states are quantized: one at most
ROW_LEVELS = {"int8": 127, "int6": 31, "int5": 15}  # a row's largest magnitude becomes this integer
HIDDEN4_GROUP = 64  # channels per scale: 4 scale bytes per 32 value bytes
ARRAY_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    **STORAGE_DTYPES, "int8": (np.dtype(np.int8), torch.int8), "uint8": (np.dtype(np.uint8), torch.uint8),
    "int6": (np.dtype(np.int8), torch.int8), "int5": (np.dtype(np.int8), torch.int8),  # int8 bytes, fewer levels
    "int16": (np.dtype(np.int16), torch.int16),  # int16: top-k key positions past 255
    "int4x2": (np.dtype(np.uint8), torch.uint8)}  # two int4 values per byte (quantize_groups)


def hidden_quantization(quantize) -> str | None:
    """The dtype a cache's hidden states are stored in when quantized (QUANTIZED), else None."""
    return next((QUANTIZED[k] for k in HIDDEN_CHOICES if k in quantize), None)
PROBABILITY_UNITS = 255  # a uint8 attention entry q stands for q / 255

# The writer's own default, chosen by scripts/bench/compression.py on real-row bfloat16 T5 activations: bit
# shuffle groups the sign and exponent bits, which is what compresses in float activations; lz4 keeps
# within ~6% of zstd's ratio at 3-4x its speed. cache-activations passes its --codec, zstd:1 by default:
# on quantized integer arrays it stores 0.88 of lz4's bytes (docs/storage.md).
COMPRESSOR = {"codec": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
CODECS = {"lz4": 5, "zstd": 3}  # --codec NAME[:LEVEL]: blosc's compressor and its default level (1-9)
DEFAULT_SHARD_BYTES = 64 * 2**20  # whole shards are buffered in memory per array while writing
DEFAULT_CHUNK_BYTES = 2**20

# The ragged axis an array grows along, by what it is indexed with. An example of m tokens owns m entries
# of a TOKENS array, m * m of a PAIRS one (an attention map, row-major), m (m + 1) / 2 of a TRIANGLE one
# (a causal map's lower triangle, row-major: query i's keys 0..i; the rest is 0 by construction) and
# m * min(k, m) of a TOPK one (its query rows' k largest attention entries, `--attention topk:K`).
TOKENS, PAIRS, TRIANGLE, EXAMPLES, TOPK = "tokens", "pairs", "triangle", "examples", "topk"
MAP_LAYOUTS = (PAIRS, TRIANGLE, TOPK)  # how a cache's attention maps are laid out (stored_layout)


def extent(grows_along: str, lengths: np.ndarray, k: int = 0) -> np.ndarray:
    """int64 [n + 1]: where each example starts along an array's ragged axis."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per_example = {TOKENS: lengths, PAIRS: lengths**2, TRIANGLE: lengths * (lengths + 1) // 2,
                   EXAMPLES: np.ones_like(lengths), TOPK: lengths * np.minimum(k, lengths)}[grows_along]
    return np.concatenate([[0], np.cumsum(per_example)]).astype(np.int64)


@functools.lru_cache(maxsize=1024)
def triangle_indices(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) positions of an m x m map's lower triangle, in the order a TRIANGLE array stores them."""
    rows, cols = torch.tril_indices(m, m)
    return rows, cols


def stored_layout(manifest: Mapping[str, Any]) -> str:
    """How a cache's attention maps are laid out (MAP_LAYOUTS); caches that do not say: PAIRS, or TOPK."""
    return manifest.get("attention_layout") or (TOPK if stored_topk(manifest) else PAIRS)


def parse_attention(mode: str) -> tuple[str, int]:
    """--attention heads | mean | none | topk:K -> (heads | mean | none, K or 0). topk:K keeps each query
    row's K largest entries per head, renormalised to sum to 1, with their key positions."""
    if mode.startswith("topk:"):
        k = mode.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise CacheError(f"--attention topk:K needs a positive integer K, got {mode!r}")
        return "heads", int(k)
    if mode not in ATTENTION_MODES:
        raise CacheError(f"--attention must be one of {', '.join(ATTENTION_MODES)} or topk:K, got {mode!r}")
    return mode, 0


def hidden_path(stack: str, layer: int) -> str:
    return f"{stack}/hidden/{layer}"


def attention_path(layer: int) -> str:
    return f"encoder/attention/{layer}"


def stored_topk(manifest: Mapping[str, Any]) -> int:
    """K of a cache made with --attention topk:K, else 0 (dense maps)."""
    return int((manifest.get("attention_topk") or {}).get("k", 0))


def attention_keys_path(layer: int) -> str:
    """--attention topk:K: the key position of each stored entry of encoder/attention/{layer}."""
    return f"encoder/attention_keys/{layer}"


def cross_attention_path(layer: int) -> str:
    return f"decoder/cross_attention/{layer}"


# What READ's heads read of an encoder-only stack's corrected final tokens (its `pooling`): their mean over
# real tokens, the first ([CLS]), or the last real one (decoder-only backbones, whose last token has seen
# the whole input).
POOLINGS = ("mean", "first", "last")
# --project K (format v2): what the heads read stays full width. Encoder-only backbones store the final
# layer's pooled states per example for these poolings.
STORED_POOLINGS = ("mean", "first")


def pool(tokens: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[..., B, L, d] tokens -> [..., B, d]: the caching job's pooled final states and READ's heads share it
    (POOLINGS). Mean pooling averages the real tokens only: it is how
    sentence encoders such as all-MiniLM-L6-v2 were trained, whose [CLS] state carries little on its own."""
    if pooling == "first":
        return tokens[..., 0, :]
    if pooling == "last":  # right-padded: the last real token is at length - 1
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # [B]
        index = last.view(*([1] * (tokens.dim() - 3)), -1, 1, 1).expand(*tokens.shape[:-2], 1, tokens.shape[-1])
        return tokens.gather(-2, index).squeeze(-2)
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    weights = mask.to(tokens.dtype)  # [B, L]
    return (tokens * weights[..., None]).sum(-2) / weights.sum(-1, keepdim=True)


def pooled_path(pooling: str, layer: int) -> str:
    """--project only: encoder/pooled_mean/6 [n, d], the full-width final state the heads read."""
    return f"encoder/pooled_{pooling}/{layer}"


def projection_paths(layer: int) -> tuple[str, str]:
    """--project K: where the cache's root keeps encoder layer `layer`'s mean float32 [d] and basis
    float32 [K, d]; its hidden array then holds z [T, K], h ~ mean + z @ basis."""
    return f"projection/mean/{layer}", f"projection/basis/{layer}"


def stored_projection(manifest: Mapping[str, Any]) -> int:
    """K of a cache made with --project K, else 0 (full-width hidden states)."""
    return int((manifest.get("projection") or {}).get("k", 0))


def scale_path(path: str) -> str:
    """Where a quantized hidden array's scales live (one per row for int8, one per group of channels for
    int4): encoder/hidden/3 -> encoder/hidden_scale/3."""
    stack, kind, layer = path.split("/")
    return f"{stack}/{kind}_scale/{layer}"


def outliers_path(path: str) -> str:
    """--outliers K: where a quantized hidden array's kept channels live: encoder/hidden/3 ->
    encoder/hidden_outliers/3 ([T, K] or [n, K], the storage dtype)."""
    stack, kind, layer = path.split("/")
    return f"{stack}/{kind}_outliers/{layer}"


def stored_outliers(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    """A cache's kept channels per hidden array (--outliers K), or {}."""
    return dict((manifest.get("outliers") or {}).get("channels", {}))


def split_outliers(x: torch.Tensor, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] -> (x with 0 at `channels`, for the quantizer; x's values there [..., K], kept as they are)."""
    return x.index_fill(-1, channels, 0), x.index_select(-1, channels)


def quantize_rows(x: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] floats -> (int8 [..., d], float32 scale [...]) with x ~ values * scale, scale = the row's
    largest magnitude / levels (127 for int8, ROW_LEVELS); rounding to nearest puts every value within
    scale / 2 of x."""
    x = x.float()
    scale = x.abs().amax(-1) / levels
    values = torch.round(x / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-levels, levels)
    return values.to(torch.int8), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale[..., None]


def quantize_groups(x: torch.Tensor, group: int = HIDDEN4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] floats (d even) -> (uint8 [..., d / 2], float32 scale [..., ceil(d / group)]): each group of
    `group` channels scaled by its largest magnitude / 7 and rounded to an integer in [-7, 7], so every
    value is within its group's scale / 2 of x; stored plus 8 (1..15), channel 2i in byte i's low four
    bits and channel 2i + 1 in its high four."""
    x = x.float()
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"int4 hidden states pack two channels per byte: the width must be even, got {d}")
    groups = -(-d // group)
    padded = nn_pad(x, groups * group - d).unflatten(-1, (groups, group))  # [..., G, group]
    scale = padded.abs().amax(-1) / 7
    q = torch.round(padded / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-7, 7)
    q = (q.flatten(-2)[..., :d] + 8).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, group: int = HIDDEN4_GROUP) -> torch.Tensor:
    """quantize_groups' (uint8 [..., d / 2], scale [..., G]) -> float32 [..., d]."""
    low, high = (packed & 15).float() - 8, (packed >> 4).float() - 8
    values = torch.stack([low, high], -1).flatten(-2)  # [..., d]
    d = values.shape[-1]
    return values * scale.repeat_interleave(group, -1)[..., :d]


def dequantize_hidden(values: torch.Tensor, scale: torch.Tensor, outliers: torch.Tensor | None = None,
                      channels: torch.Tensor | None = None) -> torch.Tensor:
    """Stored quantized hidden states -> float32: int8 rows (quantize_rows) or packed int4 (quantize_groups),
    with --outliers' kept channels put back at `channels` (where the quantized values hold 0)."""
    wide = dequantize_rows(values, scale) if values.dtype == torch.int8 else dequantize_groups(values, scale)
    return wide if outliers is None else wide.index_copy_(-1, channels, outliers.to(wide.dtype))


def quantize_hidden(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows for int8, int6 and int5, quantize_groups for int4x2 (QUANTIZED's hidden dtypes)."""
    return quantize_rows(x, ROW_LEVELS[dtype]) if dtype in ROW_LEVELS else quantize_groups(x)


def nn_pad(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x with `extra` zero channels appended."""
    return torch.cat([x, x.new_zeros(*x.shape[:-1], extra)], -1) if extra else x


def quantize_probabilities(p: torch.Tensor) -> torch.Tensor:
    """[..., m] probabilities -> uint8 [..., m] in units of 1/255. Each entry is its value rounded down or
    up (so within 1/255 of it), and each row's units sum to round(255 * the row's sum): the entries with
    the largest remainders round up (ties to the earlier key), so a row summing to 1 still sums to 1."""
    scaled = p.float() * PROBABILITY_UNITS
    units = scaled.floor()
    missing = scaled.sum(-1, keepdim=True).round() - units.sum(-1, keepdim=True)  # [..., 1], 0 <= missing < m
    order = torch.argsort(scaled - units, dim=-1, descending=True, stable=True)
    positions = torch.arange(p.shape[-1], device=p.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank of each entry's remainder
    return (units + (rank < missing)).clamp_(0, PROBABILITY_UNITS).to(torch.uint8)


def dequantize_probabilities(units: torch.Tensor, dtype: torch.dtype = torch.float32,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 units -> probabilities as `dtype`, or written into `out` (of units' shape)."""
    wide = units.to(dtype) if out is None else out.copy_(units)
    return wide.div_(PROBABILITY_UNITS)  # in place: 3x faster than a mixed-dtype product here


def parse_codec(text: str) -> dict:
    """--codec lz4 | zstd | NAME:LEVEL -> the manifest's compressor record (blosc, bit shuffle)."""
    name, _, level = text.partition(":")
    if name not in CODECS or (level and not (level.isdigit() and 1 <= int(level) <= 9)):
        raise CacheError(f"--codec must be one of {', '.join(CODECS)}, optionally :LEVEL (1-9), got {text!r}")
    return {**COMPRESSOR, "cname": name, "clevel": int(level) if level else CODECS[name]}


def compressors(record: Mapping[str, Any] = COMPRESSOR) -> list:
    c = record
    # Crc32c last: every inner chunk carries its own checksum, verified by zarr on every read.
    return [BloscCodec(cname=c["cname"], clevel=c["clevel"], shuffle=c["shuffle"]), Crc32cCodec()]


def to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor (any device) -> numpy array in the storage dtype, floats rounding to nearest even (an
    int8 or uint8 tensor is already quantized: it is copied out as it is)."""
    logical = ARRAY_DTYPES[dtype][1]
    tensor = tensor.detach().to(logical)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.int16)
    return tensor.cpu().numpy().view(ARRAY_DTYPES[dtype][0])


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """numpy storage array -> torch tensor in the logical dtype (no copy for bfloat16 bits)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


@dataclass(frozen=True)
class ArraySpec:
    """One backbone array of a split: `row` is its shape without the ragged axis."""

    path: str
    grows_along: str  # TOKENS | PAIRS | TRIANGLE | EXAMPLES | TOPK
    row: tuple[int, ...]  # e.g. (d,) for [T, d]; (A,) for [A, S]; () for [S]
    axis: int  # where the ragged axis sits: 0, or 1 for [A, S] / [A, T]
    dtype: str | None = None  # a key of ARRAY_DTYPES; None: the cache's storage_dtype
    k: int = 0  # TOPK arrays: entries kept per query row

    def shape(self, length: int) -> tuple[int, ...]:
        return (*self.row[: self.axis], length, *self.row[self.axis:])


def chunk_grid(length: int, row_bytes: int, chunk_bytes: int, shard_elements: int) -> tuple[int, int]:
    """(inner chunk, shard) lengths along the ragged axis; a shard is a whole number of chunks."""
    chunk = max(1, min(length, shard_elements, chunk_bytes // max(row_bytes, 1)))
    shard = min(-(-shard_elements // chunk) * chunk, -(-length // chunk) * chunk)
    return chunk, shard


def shard_elements(lengths: dict[str, int], row_bytes: dict[str, int], n_examples: int,
                   shard_bytes: int) -> dict[str, int]:
    """Shard length of each array of a split, so that every array's shards span about the same number
    of examples: the largest array's shards hold about `shard_bytes`, and `committed` (bounded by the
    array that lags most) advances about once per shard instead of once per split."""
    per_example = {p: row_bytes[p] * lengths[p] / n_examples for p in lengths}
    examples = max(1.0, shard_bytes / max(max(per_example.values()), 1e-9))
    return {p: max(1, int(np.ceil(examples * lengths[p] / n_examples))) for p in lengths}


def block_digest(block: np.ndarray) -> str:
    """Checksum of one shard's logical content (C-order bytes); xxh3 hashes at memory speed."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(block).view(np.uint8).reshape(-1))


def combined_digest(shard_digests: Mapping[str, list[str]]) -> str:
    """One digest for a split, over every array's shard digests."""
    text = json.dumps({k: shard_digests[k] for k in sorted(shard_digests)})
    return xxhash.xxh3_128_hexdigest(text.encode())


# Manifest fields that describe when and how fast, not what: they may differ between a run and its resume.
_VOLATILE = ("created_at", "checksums", "complete")


def manifest_identity(manifest: Mapping[str, Any]) -> dict:
    return {k: v for k, v in manifest.items() if k not in _VOLATILE}


def lookup(manifest: Mapping[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def differences(actual: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where `actual` differs from `expected`, recursing into dicts, as 'path: a != b'."""
    out = []
    for key in sorted(set(actual) | set(expected)):
        path = f"{prefix}{key}"
        a, e = actual.get(key), expected.get(key)
        if isinstance(a, Mapping) and isinstance(e, Mapping):
            out += differences(a, e, path + ".")
        elif a != e:
            out.append(f"{path}: cache has {a!r}, asked for {e!r}")
    return out


def check_format_version(manifest: Mapping[str, Any], where: str, versions=READABLE_VERSIONS) -> None:
    version = manifest.get("format_version")
    if version not in versions:
        raise CacheError(
            f"{where} is cache format version {version}, this reader knows version(s) "
            f"{', '.join(map(str, versions))}; re-create it with this version's cache-activations (--overwrite)"
        )


def shard_regions(shape: tuple, axis: int, shard_length: int) -> list[tuple]:
    """The index of every shard of an array along its ragged axis, in order (the last may be short)."""
    length = shape[axis]
    return [(slice(None),) * axis + (slice(start, min(start + shard_length, length)),)
            for start in range(0, length, shard_length)]


def shard_keys(array: zarr.Array) -> list[str]:
    """The key (file, or object) of every shard of a data array (they grow along one axis), in order,
    relative to the cache's root."""
    axis = array.attrs["axis"]
    n = -(-array.shape[axis] // array.shards[axis])
    coords = [tuple(i if a == axis else 0 for a in range(array.ndim)) for i in range(n)]
    return [f"{array.path}/{array.metadata.encode_chunk_key(c)}" for c in coords]
