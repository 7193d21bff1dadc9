"""One split written by several processes (torchrun): every rank writes whole shards of its own
contiguous range, so no shard is ever written by two processes, and the bytes are the single-process
run's.

Ranks split the split's tokens evenly: rank r takes examples [E_r, E_r+1), and of each array the shards
that start inside that range. A shard that straddles a boundary needs the previous rank's last examples
too, so a rank runs the backbone over every batch (the single-process batches, which fix the values'
last bits) that touches one of its shards; at most a batch or two per boundary is computed twice.

Progress, per rank, beside the split's arrays (written only by that rank, so ranks never race):

    <split>/ranks/<r>     attrs["shards"]: {array path: {shard index: digest}}, updated after each shard

A resumed run (any number of ranks, or one process) skips every shard a record, or the single-process
`checksums`, lists; after a barrier rank 0 checks that every shard is listed, writes the split's
`checksums`, `committed` and `complete` exactly as a single-process run does, and deletes `ranks/`.
"""
from __future__ import annotations

import numpy as np
import zarr

from . import faults
from .errors import CacheError
from .format import block_digest
from .location import Location
from .shards import ShardEncoder
from .world import World
from .writer import SplitWriter

RANKS = "ranks"


def has_rank_records(path) -> bool:
    """Whether a cache holds a split that ranks were writing (a resume must continue it shard by shard)."""
    location = Location(path)
    if not location.exists("zarr.json"):
        return False
    root = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    return any(isinstance(node, zarr.Group) and RANKS in node for _, node in root.members())


def token_bounds(offsets: np.ndarray, size: int) -> np.ndarray:
    """int64 [size + 1]: the first example of each rank, splitting the split's tokens evenly."""
    return np.searchsorted(offsets, np.arange(size + 1) * offsets[-1] / size, side="left").astype(np.int64)


def open_records(split: SplitWriter) -> None:
    """Rank 0, before the others start: the group every rank's record goes in."""
    if not split.complete and RANKS not in split.group:
        split.group.create_group(RANKS)


def recorded_shards(split: SplitWriter) -> dict[str, dict[int, str]]:
    """Every shard some run recorded as written, with its digest: the single-process prefix, then every
    rank's record."""
    done = {p: dict(enumerate(split.group.attrs["checksums"].get(p, []))) for p in split.specs}
    if RANKS in split.group:
        for _, record in split.group[RANKS].groups():
            for path, shards in record.attrs.get("shards", {}).items():
                done[path].update({int(i): digest for i, digest in shards.items()})
    return done


class RankedSplit:
    """This rank's part of one split, fed batch by batch (in the order of `batch_starts`) like a SplitWriter."""

    def __init__(self, split: SplitWriter, world: World, batch_size: int):
        self.split, self.world, self.name, self.plan = split, world, split.name, split.plan
        plan, group = split.plan, split.group
        self.extents = {p: plan.extent(s.grows_along, s.k) for p, s in split.specs.items()}
        self.axis = {p: s.axis for p, s in split.specs.items()}
        self.shard_len = {p: group[p].shards[s.axis] for p, s in split.specs.items()}
        bounds = token_bounds(plan.offsets, world.size)
        done = recorded_shards(split)
        self.mine: dict[str, dict[str, str]] = {p: {} for p in split.specs}
        self.pending: dict[str, set[int]] = {}
        for path, ext in self.extents.items():
            step = self.shard_len[path]
            first, stop = (-(-int(ext[bounds[r]]) // step) for r in (world.rank, world.rank + 1))
            owned = range(first, stop)
            self.mine[path] = {str(i): done[path][i] for i in owned if i in done[path]}
            self.pending[path] = {i for i in owned if i not in done[path]}
        self.batch_starts = self._batches(batch_size)
        self.open: dict[tuple[str, int], list] = {}  # (path, shard) -> [rows, filled]
        self._next = 0
        self._commits = 0

    def _batches(self, batch_size: int) -> list[int]:
        """Starts of the single-process batches that hold an element of a pending shard."""
        starts: set[int] = set()
        for path, shards in self.pending.items():
            ext, step = self.extents[path], self.shard_len[path]
            for i in shards:
                lo, hi = i * step, min((i + 1) * step, int(ext[-1]))
                first = int(np.searchsorted(ext, lo, side="right")) - 1
                last = int(np.searchsorted(ext, hi, side="left"))  # exclusive
                starts.update(range(first // batch_size * batch_size, last, batch_size))
        return sorted(starts)

    def start(self) -> None:
        """Take up this rank's record (after every rank has read the old ones): the shards it owns that
        earlier runs wrote carry over."""
        self.record = self.split.group[RANKS].create_group(str(self.world.rank), overwrite=True,
                                                           attributes={"shards": self.mine})
        self.encoders = {p: ShardEncoder(self.split.group[p], self.split.cache.location, self.axis[p])
                         for p, shards in self.pending.items() if shards}

    def append(self, arrays) -> None:
        """The values of the next batch of `batch_starts`, concatenated along each array's ragged axis."""
        start = self.batch_starts[self._next]
        self._next += 1
        for path, shards in self.pending.items():
            if not shards:
                continue
            ext, step, axis = self.extents[path], self.shard_len[path], self.axis[path]
            rows = np.moveaxis(arrays[path], axis, 0)
            lo = int(ext[start])
            hi = lo + len(rows)
            for i in range(lo // step, -(-hi // step)):
                if i not in shards:
                    continue
                s0, s1 = i * step, min((i + 1) * step, int(ext[-1]))
                slot = self.open.setdefault((path, i), [np.empty((s1 - s0, *rows.shape[1:]), rows.dtype), 0])
                a, b = max(s0, lo), min(s1, hi)
                slot[0][a - s0: b - s0] = rows[a - lo: b - lo]
                slot[1] += b - a
                if slot[1] == s1 - s0:
                    self._write(path, i, np.moveaxis(slot[0], 0, axis))
                    del self.open[(path, i)]

    def _write(self, path: str, index: int, block: np.ndarray) -> None:
        self.encoders[path].write(index, block)
        self.pending[path].discard(index)
        self.mine[path][str(index)] = block_digest(block)
        self.record.attrs.update({"shards": self.mine})
        self._commits += 1
        faults.after_commit(self._commits, self.split.cache.manifest["task"]["name"])

    def close(self) -> None:
        left = sorted(f"{p}[{i}]" for p, shards in self.pending.items() for i in shards)
        if left:
            raise CacheError(f"split {self.name}: rank {self.world.rank} stopped before writing shards {left[:3]}")


def finalize(split: SplitWriter) -> None:
    """Rank 0, after every rank is done: the split's checksums, committed and complete, as one process
    writes them; refuses while a shard is missing from every record."""
    if split.complete:
        return
    done = recorded_shards(split)
    digests, missing = {}, []
    for path, spec in split.specs.items():
        array = split.group[path]
        count = -(-array.shape[spec.axis] // array.shards[spec.axis])
        missing += [f"{path}[{i}]" for i in range(count) if i not in done[path]]
        digests[path] = [done[path].get(i) for i in range(count)]
    if missing:
        raise CacheError(f"split {split.name} of {split.cache.path}: {len(missing)} shard(s) were not written "
                         f"(first: {missing[0]}); run the same command with --resume")
    split.group.attrs.update({"checksums": digests, "committed": split.plan.n_examples, "complete": True})
    if RANKS in split.group:
        del split.group[RANKS]
    split.complete = True
    split.cache.split_done(split.name, digests)
