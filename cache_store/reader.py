"""The one reader of the cache format: checks a cache against what the caller expects, then serves
splits by example, by length-bucketed batch, or whole layers as torch tensors."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from .errors import CacheError
from .location import Location
from .store import STORE_KEY
from .format import (
    EXAMPLES, MANIFEST_KEY, PAIRS, TOKENS, TRIANGLE, check_format_version, extent, from_storage, lookup, shard_keys,
    triangle_indices,
)

METADATA_ARRAYS = ("offsets", "attention_offsets", "input_ids", "labels", "example_index")


class CacheReader:
    """A cache opened for reading. `expect` maps dotted manifest paths to the values the caller needs
    (e.g. {"task.name": "rte", "backbone.name": "t5-small"}); any difference is refused."""

    live = False  # an ActivationSource (source.py) whose arrays are stored

    def __init__(self, path: str | Path, expect: Mapping[str, Any] | None = None):
        self.location = Location(path)
        self.path = self.location.path  # a Path, or an s3:// URL
        if not self.location.exists("zarr.json"):
            raise CacheError(f"no cache at {self.path}; create one with `cache-activations --task TASK`")
        self.root = zarr.open_group(self.location.zarr_store(read_only=True), mode="r")
        if STORE_KEY in self.root.attrs:
            raise CacheError(f"{self.path} is a store of tasks {', '.join(self.root.attrs[STORE_KEY]['tasks'])}: "
                             f"open one task's cache ({self.path}/TASK; train-side takes the store with --tasks)")
        if MANIFEST_KEY not in self.root.attrs:
            raise CacheError(f"{self.path} is a zarr group but not a READ cache (no manifest)")
        self.manifest: dict = dict(self.root.attrs[MANIFEST_KEY])
        check_format_version(self.manifest, str(self.path))
        diffs = [f"{key}: cache has {lookup(self.manifest, key)!r}, asked for {value!r}"
                 for key, value in (expect or {}).items() if lookup(self.manifest, key) != value]
        if diffs:
            raise CacheError(f"{self.path} does not match what was asked for (" + "; ".join(diffs)
                             + "); point at the matching cache or re-create this one")
        self.dtype: str = self.manifest["storage_dtype"]

    @property
    def split_names(self) -> list[str]:
        return [name for name in self.manifest["splits"] if name in self.root]

    def split(self, name: str) -> "SplitReader":
        if name not in self.root:
            raise CacheError(f"{self.path} has no {name} split (it has {', '.join(self.split_names)})")
        return SplitReader(self, name)

    def label_head(self) -> torch.Tensor | None:
        """[C, d] float32, or None for backbones without an LM head (encoder-only)."""
        return torch.from_numpy(self.root["label_head"][:]) if "label_head" in self.root else None


    def projection_arrays(self) -> dict[str, np.ndarray] | None:
        """--project K: every encoder layer's mean [d] and basis [K, d] by path (format.projection_paths),
        or None."""
        if "projection" not in self.root:
            return None
        return {f"projection/{path}": node[:] for path, node in self.root["projection"].members(max_depth=None)
                if isinstance(node, zarr.Array)}

@dataclass
class Batch:
    """Consecutive examples [start, stop) of a split, each array concatenated along its ragged axis."""

    start: int
    stop: int
    lengths: torch.Tensor  # int64 [b]
    labels: torch.Tensor  # [b]
    arrays: dict[str, torch.Tensor]


class SplitReader:
    """One complete split. Examples are stored longest first, so consecutive examples make
    length-bucketed batches; `example_index` maps them back to rows of the source split."""

    def __init__(self, cache: CacheReader, name: str):
        self.cache, self.name = cache, name
        self.group = cache.root[name]
        attrs = self.group.attrs
        if not attrs.get("complete"):
            raise CacheError(
                f"split {name} of {cache.path} is incomplete ({attrs.get('committed', 0)} of "
                f"{attrs.get('n_examples', '?')} examples committed); finish it with "
                "`cache-activations ... --resume`")
        meta = {key: self.group[key][:] for key in METADATA_ARRAYS}
        self.offsets: np.ndarray = meta["offsets"]  # int64 [n + 1]
        self.attention_offsets: np.ndarray = meta["attention_offsets"]  # int64 [n + 1]
        self.input_ids: np.ndarray = meta["input_ids"]  # int32 [T]
        self.labels: np.ndarray = meta["labels"]  # int64 or float32 [n]
        self.example_index: np.ndarray = meta["example_index"]  # int64 [n]
        self.lengths: np.ndarray = np.diff(self.offsets)
        self.n_examples = len(self.lengths)
        self._arrays: dict[str, zarr.Array] = {}
        # A deleted shard would read back as zeros: refuse it here, cheaply (crc32c catches altered bytes).
        present = cache.location.sizes(name)
        missing = [key for p in self.array_paths() for key in shard_keys(self.group[p]) if key not in present]
        if missing:
            raise CacheError(f"split {name} of {cache.path} is damaged: {len(missing)} shard file(s) missing "
                             f"(first: {missing[0]}); run `cache-inspect --verify` and re-create the cache")

    def array_paths(self) -> list[str]:
        """Every backbone array of the split, e.g. encoder/hidden/0 ... decoder/cross_attention/N."""
        return sorted(path for path, node in self.group.members(max_depth=None)
                      if isinstance(node, zarr.Array) and "grows_along" in node.attrs)

    def _extent(self, array: zarr.Array) -> np.ndarray:
        grows = array.attrs["grows_along"]
        if grows == TOKENS:
            return self.offsets
        if grows == PAIRS:
            return self.attention_offsets
        return extent(grows, self.lengths, array.attrs.get("k", 0))

    def _array(self, path: str) -> zarr.Array:
        """The opened array (kept: opening one reads its metadata from the store)."""
        if path not in self._arrays:
            if path not in self.group:
                raise CacheError(f"split {self.name} of {self.cache.path} has no array {path} "
                                 f"(stored: {', '.join(self.array_paths())})")
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def _region(self, array: zarr.Array, start: int, stop: int | None) -> tuple:
        extent = self._extent(array)
        stop = self.n_examples if stop is None else stop
        return (slice(None),) * array.attrs["axis"] + (slice(int(extent[start]), int(extent[stop])),)

    def _corrupted(self, array: zarr.Array, exc: Exception) -> CacheError:
        return CacheError(f"{self.cache.path}/{array.path} is corrupted ({type(exc).__name__}: {exc}); "
                          "run `cache-inspect --verify` and re-create the cache")

    def load(self, path: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Examples [start, stop) of one array, concatenated along its ragged axis, in the logical dtype."""
        return self.load_many([path], start, stop)[path]

    def load_many(self, paths: list[str], start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """load() of several arrays, their reads issued together (zarr decodes their chunks concurrently,
        and a window of a few examples does not pay one round trip per array)."""
        arrays = [self._array(path) for path in paths]

        async def read_all():
            return await asyncio.gather(*(a._async_array.getitem(self._region(a, start, stop)) for a in arrays),
                                        return_exceptions=True)

        out = {}
        for path, array, values in zip(paths, arrays, sync(read_all())):
            if isinstance(values, Exception):  # a checksum or decode failure: never hand garbage to training
                raise self._corrupted(array, values) from None
            out[path] = from_storage(np.asarray(values), array.attrs.get("logical_dtype", self.cache.dtype))
        return out

    def load_layers(self, paths: list[str]) -> dict[str, torch.Tensor]:
        """Whole arrays in memory: what stage two holds when they fit."""
        return {path: self.load(path) for path in paths}

    def example(self, j: int, paths: list[str]) -> dict[str, torch.Tensor]:
        """Example j's values: hidden [m, d], attention [A, m, m] or [m, m] (a causal map's lower triangle
        filled out with zeros), decoder [d], cross [A, m] or [m]; top-k arrays as stored, [A, m * k]."""
        m = int(self.lengths[j])
        out = {}
        for path in paths:
            value = self.load(path, j, j + 1)
            grows = self.group[path].attrs["grows_along"]
            if grows == PAIRS:
                value = value.reshape(*value.shape[:-1], m, m)
            elif grows == TRIANGLE:
                square = value.new_zeros(*value.shape[:-1], m, m)
                square[(..., *triangle_indices(m))] = value
                value = square
            elif grows == EXAMPLES:
                value = value[0]
            out[path] = value
        return out

    def iter_examples(self, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        for j in range(self.n_examples):
            yield self.example(j, paths)

    def iter_batches(self, batch_size: int, paths: list[str], shuffle: bool = False,
                     seed: int = 0) -> Iterator[Batch]:
        """Length-bucketed batches of consecutive examples; `shuffle` permutes the batch order."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        starts = np.arange(0, self.n_examples, batch_size)
        if shuffle:
            starts = np.random.default_rng(seed).permutation(starts)
        for start in starts:
            start, stop = int(start), int(min(start + batch_size, self.n_examples))
            yield Batch(
                start, stop,
                lengths=torch.from_numpy(self.lengths[start:stop].copy()),
                labels=torch.from_numpy(self.labels[start:stop].copy()),
                arrays={path: self.load(path, start, stop) for path in paths},
            )
