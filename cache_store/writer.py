"""The one writer of the cache format: creates, fills and resumes a cache, one whole shard at a time.

Every array's shape is known before the backbone runs (the split is tokenized first), so arrays are
created at full size and filled in order. Each array keeps the shard it is filling in memory and writes
it once it is full: zarr never has to read-modify-write a shard. After each write the split's
`committed` count moves to the number of examples that every array holds on disk; a resumed run seeds
each shard buffer with what is on disk up to the point it restarts from and writes the same bytes.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

from . import faults
from .errors import CacheError
from .format import (
    ARRAY_DTYPES, DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, COMPRESSOR, FORMAT_VERSION, MANIFEST_KEY,
    ArraySpec, extent, block_digest, check_format_version, chunk_grid, combined_digest,
    compressors, differences, manifest_identity, shard_elements,
)
from .location import Location
from .shards import ShardEncoder

@dataclass(frozen=True)
class SplitPlan:
    """What is known about a split before the backbone runs, in cache order."""

    source: str  # GLUE split the rows come from
    lengths: np.ndarray  # int64 [n]: tokens per example
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int64 or float32 [n]
    example_index: np.ndarray  # int64 [n]: row in the source split

    @property
    def n_examples(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    @property
    def attention_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths**2)]).astype(np.int64)

    def extent(self, grows_along: str, k: int = 0) -> np.ndarray:
        """int64 [n + 1]: where each example starts along an array's ragged axis."""
        return extent(grows_along, self.lengths, k)


def storage_record(shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   compressor: Mapping[str, Any] = COMPRESSOR) -> dict:
    """The manifest's `storage`: how the arrays are compressed and sharded."""
    return {"compressor": dict(compressor), "shard_bytes": shard_bytes, "chunk_bytes": chunk_bytes}


class CacheWriter:
    """Opens a cache for writing: `mode` is new (refuse an existing one), resume or overwrite."""

    def __init__(self, path: str | Path, manifest: Mapping[str, Any], mode: str = "new",
                 shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 compressor: Mapping[str, Any] = COMPRESSOR):
        self.location = Location(path)
        self.path = self.location.path  # a Path, or an s3:// URL
        self.shard_bytes, self.chunk_bytes, self.compressor = shard_bytes, chunk_bytes, dict(compressor)
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "storage": storage_record(shard_bytes, chunk_bytes, compressor),
            "checksums": {},
            "complete": False,
        }
        self.dtype = manifest["storage_dtype"]
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"unknown mode {mode!r}")
        existing = self._existing_manifest()
        if existing is not None and mode == "new":
            raise CacheError(f"{self.path} already holds a cache; pass --resume to continue it "
                             "or --overwrite to replace it")
        if existing is None and mode == "new" and not self.location.is_empty():
            raise CacheError(f"{self.path} exists and is not empty; choose another --out or pass --overwrite")
        if mode == "overwrite":
            self.location.remove()
            existing = None
        if existing is not None:  # resume
            check_format_version(existing, str(self.path), (FORMAT_VERSION,))
            diffs = differences(manifest_identity(existing), manifest_identity(manifest))
            if diffs:
                raise CacheError(f"cannot resume {self.path}: it was made with other settings ("
                                 + "; ".join(diffs[:4]) + "); pass --overwrite to replace it")
            manifest = {**manifest, "created_at": existing["created_at"], "checksums": existing["checksums"]}
        self.root = zarr.open_group(self.location.zarr_store(), mode="a")
        self.manifest = manifest
        self._save_manifest()
        self._commits = 0

    @classmethod
    def join(cls, path: str | Path) -> "CacheWriter":
        """Another rank's handle on a cache that rank 0 opened (torchrun): it writes shards and its own
        progress record (ranked.py), never the manifest."""
        self = cls.__new__(cls)
        self.location = Location(path)
        self.path = self.location.path
        self.root = zarr.open_group(self.location.zarr_store(), mode="r+")
        self.manifest = dict(self.root.attrs[MANIFEST_KEY])
        self.dtype = self.manifest["storage_dtype"]
        self.shard_bytes = self.manifest["storage"]["shard_bytes"]
        self.chunk_bytes = self.manifest["storage"]["chunk_bytes"]
        self._commits = 0
        return self

    def _existing_manifest(self) -> dict | None:
        if not self.location.exists("zarr.json"):
            return None
        try:
            return dict(zarr.open_group(self.location.zarr_store(read_only=True), mode="r").attrs[MANIFEST_KEY])
        except KeyError:
            raise CacheError(f"{self.path} is a zarr group but not a READ cache; choose another --out") from None

    def _save_manifest(self) -> None:
        self.root.attrs[MANIFEST_KEY] = self.manifest

    def write_label_head(self, matrix: np.ndarray) -> None:
        """[C, d] float32: the frozen LM-head rows of the task's label words."""
        self.root.create_array("label_head", data=np.asarray(matrix, dtype=np.float32), overwrite=True)

    def write_projection(self, arrays: Mapping[str, np.ndarray]) -> None:
        """--project K: each encoder layer's mean and basis, float32, at format.projection_paths."""
        for path, value in arrays.items():
            self.root.create_array(path, data=np.asarray(value, dtype=np.float32), overwrite=True)

    def split(self, name: str, plan: SplitPlan, specs: list[ArraySpec]) -> "SplitWriter":
        return SplitWriter(self, name, plan, specs)

    def split_done(self, name: str, digests: Mapping[str, list[str]]) -> None:
        self.manifest["checksums"][name] = combined_digest(digests)
        self._save_manifest()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._save_manifest()

    def _counted_commit(self) -> None:
        self._commits += 1
        faults.after_commit(self._commits, self.manifest["task"]["name"])


class SplitWriter:
    """Fills one split. Call `start_example` to learn where to begin, `append` in example order, `close`."""

    def __init__(self, cache: CacheWriter, name: str, plan: SplitPlan, specs: list[ArraySpec]):
        self.cache, self.name, self.plan = cache, name, plan
        self.ends = {s.path: plan.extent(s.grows_along, s.k)[1:] for s in specs}
        self.specs = {s.path: s for s in specs}
        root = cache.root
        if name in root and not self._created(root[name]):
            # Killed while the split's arrays were being created: nothing of it was committed, so it is
            # created again from the start.
            if int(root[name].attrs.get("committed", 0)):
                raise CacheError(f"split {name} of {cache.path} lacks arrays it has committed values of; "
                                 "re-create the cache (--overwrite)")
            del root[name]
        if name in root:
            self.group = root[name]
            stored = self.group["offsets"][:]
            if not np.array_equal(stored, plan.offsets):
                raise CacheError(f"cannot resume split {name} of {cache.path}: its examples differ from "
                                 "this run's (data or tokenizer changed); pass --overwrite to replace it")
        else:
            self.group = self._create(root)
        attrs = self.group.attrs
        self.complete = bool(attrs["complete"])
        self.committed = int(attrs["committed"])
        self.digests: dict[str, list[str]] = {k: list(v) for k, v in attrs["checksums"].items()}
        self.buffers: dict[str, _ShardBuffer] = {}

    def _created(self, group: zarr.Group) -> bool:
        """Whether a split's group holds every array this writer needs (creating them is not atomic)."""
        names = {path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
        return {"offsets", "attention_offsets", "input_ids", "labels", "example_index", *self.specs} <= names

    def _create(self, root) -> zarr.Group:
        plan, cache = self.plan, self.cache
        group = root.create_group(self.name, attributes={
            "complete": False, "n_examples": plan.n_examples, "committed": 0, "source": plan.source,
            "checksums": {p: [] for p in self.specs},
        })
        # Tokens, labels and offsets are known before the backbone runs: written first, trusted only up
        # to `committed`, like everything else.
        for key, values in (("offsets", plan.offsets), ("attention_offsets", plan.attention_offsets),
                            ("input_ids", plan.input_ids.astype(np.int32)), ("labels", plan.labels),
                            ("example_index", plan.example_index.astype(np.int64))):
            group.create_array(key, data=values, compressors=compressors(cache.compressor))
        logical = {p: s.dtype or cache.dtype for p, s in self.specs.items()}
        storage = {p: ARRAY_DTYPES[dtype][0] for p, dtype in logical.items()}
        lengths = {p: int(plan.extent(s.grows_along, s.k)[-1]) for p, s in self.specs.items()}
        row_bytes = {p: int(np.prod(s.row, dtype=np.int64)) * storage[p].itemsize for p, s in self.specs.items()}
        shard_lengths = shard_elements(lengths, row_bytes, plan.n_examples, cache.shard_bytes)
        for path, spec in self.specs.items():
            chunk, shard = chunk_grid(lengths[path], row_bytes[path], cache.chunk_bytes, shard_lengths[path])
            group.create_array(
                path, shape=spec.shape(lengths[path]), dtype=storage[path], chunks=spec.shape(chunk),
                shards=spec.shape(shard),
                compressors=compressors(cache.compressor), fill_value=0, config={"write_empty_chunks": True},
                attributes={"logical_dtype": logical[path], "grows_along": spec.grows_along, "axis": spec.axis,
                            **({"k": spec.k} if spec.k else {})},
            )
        return group

    def start_example(self) -> int:
        """First example not yet on disk (n_examples when the split is complete)."""
        return self.plan.n_examples if self.complete else self.committed

    def begin(self, example: int) -> None:
        """Prepare to append from `example` (≤ start_example(): the start of the batch that holds it)."""
        if example > self.start_example():
            raise ValueError("cannot begin past the committed examples")
        for path, spec in self.specs.items():
            position = int(self.plan.extent(spec.grows_along, spec.k)[example])
            encoder = ShardEncoder(self.group[path], self.cache.location, spec.axis)
            self.buffers[path] = _ShardBuffer(self.group[path], encoder, position, self.digests[path])

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The next examples' values for every array, concatenated along the ragged axis."""
        for path, buffer in self.buffers.items():
            buffer.append(arrays[path])
        self._commit_if_advanced()

    def _commit_if_advanced(self) -> None:
        durable = min(int(np.searchsorted(self.ends[p], b.flushed, side="right")) for p, b in self.buffers.items())
        if durable > self.committed:
            self.committed = durable
            self.group.attrs.update({"committed": durable, "checksums": self.digests})
            self.cache._counted_commit()

    def close(self) -> None:
        if self.complete:
            return
        unfinished = [p for p, b in self.buffers.items() if b.flushed < b.total]
        if unfinished or self.committed != self.plan.n_examples:
            raise CacheError(f"split {self.name}: closed before all examples were written ({unfinished[:3]})")
        self.group.attrs.update({"complete": True})
        self.complete = True
        self.cache.split_done(self.name, self.digests)


class _ShardBuffer:
    """The shard of one array being filled; writes it whole when full (or when it reaches the array's end)."""

    def __init__(self, array: zarr.Array, encoder: ShardEncoder, position: int, digests: list[str]):
        self.array, self.encoder, self.axis = array, encoder, encoder.axis
        self.total = array.shape[self.axis]
        self.shard_len = array.shards[self.axis]
        self.digests = digests
        shard = position // self.shard_len
        del digests[shard:]  # shards from here on are (re)written by this run
        self.start = shard * self.shard_len
        self.flushed = self.start
        self.block = np.empty(array.shards, dtype=array.dtype)
        self.fill = position - self.start
        if self.fill:  # resume mid-shard: the part of the shard already on disk
            self._rows()[: self.fill] = np.moveaxis(self.array[self._region(self.start, position)], self.axis, 0)

    def _size(self) -> int:
        return min(self.shard_len, self.total - self.start)

    def _rows(self) -> np.ndarray:
        return np.moveaxis(self.block, self.axis, 0)[: self._size()]

    def _region(self, start: int, stop: int) -> tuple:
        return (slice(None),) * self.axis + (slice(start, stop),)

    def append(self, data: np.ndarray) -> None:
        data = np.moveaxis(data, self.axis, 0)
        done = 0
        while done < len(data):
            rows = self._rows()
            take = min(len(data) - done, len(rows) - self.fill)
            if take <= 0:
                raise CacheError(f"{self.array.path}: more data than the array holds")
            rows[self.fill: self.fill + take] = data[done: done + take]
            self.fill += take
            done += take
            if self.fill == len(rows):
                self._flush(rows)

    def _flush(self, rows: np.ndarray) -> None:
        stop = self.start + len(rows)
        block = np.moveaxis(rows, 0, self.axis)
        self.encoder.write(self.start // self.shard_len, block)
        self.digests.append(block_digest(block))
        self.flushed = stop
        self.start, self.fill = stop, 0


class BackgroundWriter:
    """Runs a SplitWriter's appends on a thread, so the backbone never waits on compression.

    `put` blocks only when `depth` batches are already queued; an error on the thread is raised by the
    next `put` or by `close`. Leaving the `with` block on an exception stops the thread without closing
    the split, so `committed` stays where the last whole shard left it.
    """

    def __init__(self, split: SplitWriter, depth: int = 4):
        self.split = split
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._work, name=f"cache-writer-{split.name}", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.split.append(item)
                except BaseException as exc:  # surfaced on the main thread
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._raise()
        self.queue.put(arrays)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        self.stop()
        self._raise()
        self.split.close()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()
