"""Cached activations as READ inputs: a split held in memory, served as padded, length-bucketed batches."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cache_store import CacheError, CacheReader, SplitReader, attention_path, cross_attention_path, hidden_path
from cache_store.format import (
    PAIRS, STORED_POOLINGS, TOPK, TRIANGLE, attention_keys_path, dequantize_probabilities, extent, outliers_path,
    pooled_path, scale_path, hidden_quantization, stored_layout, stored_outliers, stored_projection, stored_topk,
    triangle_indices,
)

from .read_model import Packing, ReadInputs, ReadSpec


def read_spec(cache: CacheReader, width: int, cell: str, **choices) -> ReadSpec:
    """The ReadSpec of a network reading `cache`; `choices`: ReadSpec's other fields (recurrence, pooling,
    dropout, ...), at their defaults when not given."""
    m = cache.manifest
    backbone, layers = m["backbone"], m["layers"]
    needed = {"encoder": list(range(backbone["n_layers"] + 1)),
              "decoder": list(range(backbone["n_decoder_layers"] + 1)) if backbone["n_decoder_layers"] else []}
    for stack, wanted in needed.items():
        missing = sorted(set(wanted[1:]) - set(layers[stack]))
        if missing:
            raise CacheError(f"{cache.path} lacks {stack} layers {missing}; READ reads every layer: "
                             "re-create the cache with --layers all")
    if choices.get("pooling") == "auto":  # a decoder-only backbone's last token has read the whole input
        choices = {**choices, "pooling": "last" if backbone["family"] == "decoder" else "mean"}
    return ReadSpec(family=backbone["family"], d_model=backbone["d_model"], n_layers=backbone["n_layers"],
                    n_decoder_layers=backbone["n_decoder_layers"],
                    heads=backbone["n_heads"] if m["attention"] == "heads" else 1,
                    width=width, cell=cell, projection=stored_projection(m), **choices)


def array_paths(spec: ReadSpec, manifest: dict) -> list[str]:
    """The stored arrays READ reads: every layer's hidden states (and their scales when quantized, and kept
    channels with --outliers), the pooled final state its heads read when they are projected (encoder-only),
    and its attention maps unless the cache has none."""
    attention = manifest["attention"] != "none"
    hidden = [hidden_path("encoder", k) for k in range(1, spec.n_layers + 1)]
    hidden += [hidden_path("decoder", k) for k in range(1, spec.n_decoder_layers + 1)]
    # both pooled states: a sweep's runs may pool differently, and they are small (one row per example)
    hidden += [pooled_path(p, spec.n_layers) for p in STORED_POOLINGS] if spec.projection and not spec.n_decoder_layers else []
    paths = hidden + ([scale_path(p) for p in hidden] if hidden_quantization(manifest.get("quantize", ())) else [])
    paths += [outliers_path(p) for p in hidden] if stored_outliers(manifest) else []
    paths += [attention_path(k) for k in range(1, spec.n_layers + 1)] if attention else []
    paths += [attention_keys_path(k) for k in range(1, spec.n_layers + 1)] if stored_topk(manifest) else []
    paths += [cross_attention_path(k) for k in range(1, spec.n_decoder_layers + 1)] if attention else []
    return paths


@dataclass
class QuantizedRows:
    """Hidden states as a cache made with --quantize hidden (or hidden4) stores them: int8 values [..., d]
    and one float32 scale per row [...] (int4: uint8 [..., d / 2], two channels a byte, and scales
    [..., G], one per group of channels); with --outliers, the kept channels' values [..., K] in the storage
    dtype and their positions int64 [K]. They stay so until they reach the device (to_device)."""

    values: torch.Tensor
    scale: torch.Tensor
    outliers: torch.Tensor | None = None
    channels: torch.Tensor | None = None


@dataclass
class TrainBatch:
    index: torch.Tensor  # int64 [B]: positions in the split (cache order)
    labels: torch.Tensor  # [B]
    inputs: ReadInputs


def split_bytes(reader: SplitReader, spec: ReadSpec) -> int:
    """Bytes the arrays READ needs from a split take in memory (in their stored dtypes)."""
    return sum(int(np.prod(reader.group[p].shape, dtype=np.int64)) * reader.group[p].dtype.itemsize
               for p in array_paths(spec, reader.cache.manifest))


def assemble(arrays: dict[str, torch.Tensor], lengths: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor,
             spec: ReadSpec, attention: bool, per_head: bool, layout: str = PAIRS, topk: int = 0,
             channels: dict[str, torch.Tensor] | None = None) -> ReadInputs:
    """READ inputs for examples `index` of ragged arrays laid out as in the cache (`lengths` of every
    example, in order; offsets: int64 [n], where each one's tokens start; `layout`: how the maps are
    stored, format.MAP_LAYOUTS). Hidden states are packed, the examples' tokens one after another, as
    stored (bfloat16, float32, or QuantizedRows when int8): what crosses to the device is the stored
    bytes, widened there (devices.inputs_to, ReadInputs.widened); attention maps, the largest inputs by far, are
    padded to the batch's longest example and stay in the stored dtype (bfloat16, or uint8 units),
    widened layer by layer (read_model.mix). Top-k entries go back to their key positions in dense maps,
    the rest of each row 0; a causal map's triangle fills the map's lower part. `channels`: the kept channels
    of each hidden array of a cache made with --outliers (outlier_channels)."""
    map_starts = torch.from_numpy(extent(layout, lengths.numpy(), topk))[:-1][index].tolist()  # where each example's maps start
    lengths = lengths[index]
    packing = Packing.of(lengths)
    mask = packing.mask
    width = mask.shape[1]
    pos = torch.arange(width)
    starts = offsets[index]
    tokens = torch.where(mask, starts[:, None] + pos[None, :], 0)  # [B, L] into T (padding: row 0)
    firsts, sizes = starts.tolist(), lengths.tolist()

    def runs(stored):  # the examples' contiguous runs of rows, one after another (faster than a row gather)
        return torch.cat([stored[start:start + m] for start, m in zip(firsts, sizes)])

    def quantized(path, take):  # QuantizedRows of the rows `take` picks from each of path's arrays
        kept = outliers_path(path) in arrays
        return QuantizedRows(take(arrays[path]), take(arrays[scale_path(path)]),
                             take(arrays[outliers_path(path)]) if kept else None, channels[path] if kept else None)

    def tokens_of(path):  # [T_all, d] -> [T, d], as stored: devices.inputs_to widens them on the device
        return quantized(path, runs) if scale_path(path) in arrays else runs(arrays[path])

    def rows_of(path):  # [n, d] -> [B, d], as stored
        take = lambda stored: stored.index_select(0, index)  # noqa: E731
        return quantized(path, take) if scale_path(path) in arrays else take(arrays[path])

    def topk_of(path, key_path):  # [A, P] values and keys -> [B, A, L, L]
        stored, stored_keys = arrays[path], arrays[key_path]  # each example's m x k entries: one run per head
        slots = min(topk, width)
        values = stored.new_zeros(len(sizes), *stored.shape[:-1], width, slots)
        keys = torch.zeros(values.shape, dtype=torch.int64)
        for row, (start, m) in enumerate(zip(map_starts, sizes)):
            k = min(m, topk)
            values[row, ..., :m, :k] = stored[..., start:start + m * k].unflatten(-1, (m, k))
            keys[row, ..., :m, :k] = stored_keys[..., start:start + m * k].unflatten(-1, (m, k))
        return values.new_zeros(*values.shape[:-1], width).scatter_add_(-1, keys, values)  # empty slots add 0 at key 0

    def attention_of(path):  # [A, S] -> [B, A, L, L], or [S] -> [B, L, L]; kept in the stored dtype (see mix)
        if layout == TOPK:
            return topk_of(path, path.replace("/attention/", "/attention_keys/"))
        stored = arrays[path]  # [A, S] or [S]: each example's block (or triangle) is one contiguous run per head
        dense = stored.new_zeros(len(sizes), *stored.shape[:-1], width, width)
        for row, (start, m) in enumerate(zip(map_starts, sizes)):  # block copies: far faster than an index gather
            if layout == TRIANGLE:
                dense[row][(..., *triangle_indices(m))] = stored[..., start:start + m * (m + 1) // 2]
            else:
                dense[row, ..., :m, :m] = stored[..., start:start + m * m].unflatten(-1, (m, m))
        return dense

    def cross_of(path):  # [A, T_all] -> [B, A, 1, L], or [T_all] -> [B, 1, L]
        flat = arrays[path].index_select(-1, tokens.reshape(-1))
        flat = dequantize_probabilities(flat) if flat.dtype == torch.uint8 else flat.float()
        if per_head:
            return (flat.view(-1, *tokens.shape).transpose(0, 1) * mask[:, None]).unsqueeze(2)
        return (flat.view(tokens.shape) * mask).unsqueeze(1)

    n, n_dec = spec.n_layers, spec.n_decoder_layers
    return ReadInputs(
        packing=packing,
        encoder_hidden=[tokens_of(hidden_path("encoder", k)) for k in range(1, n + 1)],
        encoder_attention=[attention_of(attention_path(k)) for k in range(1, n + 1)] if attention else None,
        decoder_hidden=[rows_of(hidden_path("decoder", k)) for k in range(1, n_dec + 1)],
        cross_attention=([cross_of(cross_attention_path(k)) for k in range(1, n_dec + 1)]
                         if attention and n_dec else None),
        pooled={p: rows_of(pooled_path(p, n)) for p in STORED_POOLINGS if pooled_path(p, n) in arrays} or None,
    )


class BatchOrder:
    """Length-bucketed batch order over `n_examples` stored longest first; shared by every split kind so
    that the cache and the live backbone feed a run the same batches."""

    n_examples: int

    def batch(self, index: torch.Tensor) -> "TrainBatch":
        raise NotImplementedError

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator["TrainBatch"]:
        for index in self.batch_order(batch_size, shuffle, seed):
            yield self.batch(index)

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n_examples // batch_size)

    def batch_order(self, batch_size: int, shuffle: bool, seed: int = 0) -> list[torch.Tensor]:
        """Shuffling permutes examples within windows of 20 batches of similar length, then the order of
        the batches, so every epoch sees new batches while padding stays small."""
        order = np.arange(self.n_examples)
        if shuffle:
            rng = np.random.default_rng(seed)
            window = 20 * batch_size
            order = np.concatenate([rng.permutation(order[i:i + window]) for i in range(0, len(order), window)])
        batches = [torch.from_numpy(order[i:i + batch_size].copy()) for i in range(0, len(order), batch_size)]
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


class InMemorySplit(BatchOrder):
    """Every array READ needs from examples [start, stop) of a split, in memory in the stored dtype."""

    def __init__(self, reader: SplitReader, spec: ReadSpec, start: int = 0, stop: int | None = None):
        stop = reader.n_examples if stop is None else stop
        manifest = reader.cache.manifest
        self.name, self.spec, self.start = reader.name, spec, start
        self.attention = manifest["attention"] != "none"
        self.per_head = manifest["attention"] == "heads"
        self.layout, self.topk, self.channels = stored_layout(manifest), stored_topk(manifest), outlier_channels(manifest)
        self.arrays = reader.load_many(array_paths(spec, manifest), start, stop)
        self.lengths = torch.from_numpy(reader.lengths[start:stop].copy())
        self.offsets = torch.from_numpy(reader.offsets[start:stop] - reader.offsets[start])
        self.labels = torch.from_numpy(reader.labels[start:stop].copy())
        self.example_index = reader.example_index[start:stop].copy()
        self.n_examples = stop - start

    def batch(self, index: torch.Tensor) -> TrainBatch:
        """Padded float32 inputs for examples `index` (any order; padding only up to this batch's longest)."""
        inputs = assemble(self.arrays, self.lengths, self.offsets, index, self.spec, self.attention, self.per_head,
                          self.layout, self.topk, self.channels)
        return TrainBatch(index, self.labels[index], inputs)


class StreamingSplit:
    """A split too large to hold: windows of consecutive (similar-length) examples are read in turn, the
    next one on a background thread while the current one trains. Shuffling permutes the windows and the
    examples inside each window, which acts as a shuffle buffer of one window, and moves the window grid
    by a random number of batches every epoch, so that even one-batch windows give an example new
    batch-mates. With a window that is a multiple of the batch size, every epoch has the same batches
    count (the training schedule counts on it)."""

    def __init__(self, reader: SplitReader, spec: ReadSpec, window: int):
        self.reader, self.spec, self.window = reader, spec, max(1, window)
        self.name, self.n_examples = reader.name, reader.n_examples
        self.labels = torch.from_numpy(reader.labels.copy())
        self.example_index = reader.example_index.copy()

    def _windows(self, phase: int = 0) -> list[tuple[int, int]]:
        edges = sorted({0, *range(phase % self.window, self.n_examples, self.window), self.n_examples})
        return list(zip(edges[:-1], edges[1:]))

    def n_batches(self, batch_size: int) -> int:
        return sum(-(-(stop - start) // batch_size) for start, stop in self._windows())

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[TrainBatch]:
        windows = self._windows()
        if shuffle:
            rng = np.random.default_rng(seed)
            windows = self._windows(batch_size * int(rng.integers(max(1, self.window // batch_size))))
            windows = [windows[i] for i in rng.permutation(len(windows))]
        load = lambda w: InMemorySplit(self.reader, self.spec, *w)  # noqa: E731
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(load, windows[0])
            for i in range(len(windows)):
                part = upcoming.result()
                if i + 1 < len(windows):
                    upcoming = pool.submit(load, windows[i + 1])
                for batch in part.batches(batch_size, shuffle, seed + part.start):
                    yield TrainBatch(batch.index + part.start, batch.labels, batch.inputs)
                del part  # before the next window is read: two windows at most are in memory


def open_splits(cache: CacheReader, spec: ReadSpec, memory_bytes: int, batch_size: int,
                names=("train", "validation", "test")) -> tuple[dict, str]:
    """Hold every split in memory when they fit in `memory_bytes` together; otherwise stream each split
    larger than a quarter of the budget in windows of that size, a whole number of batches and one at
    least (two windows, the one in use and the one being read, are in memory at once). Returns (splits, a line saying which)."""
    readers = {name: cache.split(name) for name in names}
    sizes = {name: split_bytes(r, spec) for name, r in readers.items()}
    if sum(sizes.values()) <= memory_bytes:
        return ({n: InMemorySplit(r, spec) for n, r in readers.items()},
                f"holding {sum(sizes.values()) / 2**20:.0f} MiB of activations in memory "
                f"(budget {memory_bytes / 2**20:.0f} MiB)")
    share = memory_bytes / 4
    splits, streamed = {}, []
    for name, reader in readers.items():
        if sizes[name] <= share:
            splits[name] = InMemorySplit(reader, spec)
            continue
        per_example = sizes[name] / max(reader.n_examples, 1)
        window = max(1, int(share / per_example) // batch_size) * batch_size
        splits[name] = StreamingSplit(reader, spec, window)
        streamed.append(f"{name} ({sizes[name] / 2**20:.0f} MiB) in windows of {window} examples "
                        f"(about {window * per_example / 2**20:.0f} MiB)")
    return splits, f"streaming {', '.join(streamed)}; budget {memory_bytes / 2**20:.0f} MiB"


class OnlineSplit(BatchOrder):
    """A split whose activations a live backbone computes for each batch (`train-side --online`): the
    same batch order and assembly as from the cache, nothing read from disk. `source` (see
    pipeline/live.py) has lengths, labels, example_index, n_examples and compute(index), which returns
    every array for those examples in the cache's ragged layout, in `index` order."""

    def __init__(self, source, spec: ReadSpec, manifest: dict):
        self.source, self.spec, self.name = source, spec, source.name
        self.attention = manifest["attention"] != "none"
        self.per_head = manifest["attention"] == "heads"
        self.layout, self.topk, self.channels = stored_layout(manifest), stored_topk(manifest), outlier_channels(manifest)
        self.lengths = torch.as_tensor(source.lengths)
        self.labels = torch.as_tensor(source.labels)
        self.example_index = source.example_index
        self.n_examples = source.n_examples

    def batch(self, index: torch.Tensor) -> TrainBatch:
        inputs = assemble_computed(self.source.compute(index.numpy()), self.lengths[index], self.spec,
                                   self.attention, self.per_head, layout=self.layout, topk=self.topk,
                                   channels=self.channels)
        return TrainBatch(index, self.labels[index], inputs)


def assemble_computed(arrays: dict[str, torch.Tensor], lengths: torch.Tensor, spec: ReadSpec, attention: bool,
                      per_head: bool, index: torch.Tensor | None = None, layout: str = PAIRS, topk: int = 0,
                      channels: dict[str, torch.Tensor] | None = None) -> ReadInputs:
    """READ inputs from arrays a live backbone computed for examples of `lengths` (int64 [B]), in order:
    all of them, or those at positions `index`."""
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(len(lengths)) if index is None else index
    return assemble(arrays, lengths, offsets, index, spec, attention, per_head, layout, topk, channels)


def outlier_channels(manifest: dict) -> dict[str, torch.Tensor]:
    """Each hidden array's kept channels (--outliers K) as int64 tensors, or {}."""
    return {path: torch.tensor(c, dtype=torch.int64) for path, c in stored_outliers(manifest).items()}
