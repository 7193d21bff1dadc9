"""Whole-shard writes for the zarr v3 `sharding_indexed` codec, without zarr's per-chunk pipeline.

The writer only ever writes complete shards of arrays it created itself, with one fixed codec chain:

    shard file = chunk_0 | chunk_1 | ... | index | crc32c(index)
    chunk_i    = blosc(C-order bytes of inner chunk i, padded with the fill value at the array's end)
                 | crc32c(that blosc frame)                      (4 bytes, little endian)
    index      = uint64 little endian [*chunks_per_shard, 2]: (offset, nbytes) per inner chunk, in
                 chunk order; 2**64-1 for chunks wholly past the array's end

For that case zarr's general async path (copy per chunk, merge, encode, combine) costs about 2.5x what
the same bytes cost here (scripts/bench/cache_throughput.py). The bytes are exactly zarr's own: a test
writes the same data both ways and compares the files, and every read goes through plain zarr.
"""
from __future__ import annotations

from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from . import faults
from .location import Location

_EMPTY = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _crc(data) -> bytes:
    return np.uint32(google_crc32c.value(data)).tobytes()


class ShardEncoder:
    """Encodes and writes whole shards of one array of the cache at `store_root` (a folder or a bucket)."""

    def __init__(self, array: zarr.Array, store_root: "Path | str | Location", axis: int):
        (sharding,) = array.metadata.codecs
        inner = sharding.codecs
        ok = (isinstance(sharding, ShardingCodec) and len(inner) == 3 and isinstance(inner[0], BytesCodec)
              and isinstance(inner[1], BloscCodec) and isinstance(inner[2], Crc32cCodec)
              and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
              and sharding.index_location == ShardingCodecIndexLocation.end
              and (inner[0].endian is None or inner[0].endian.value == "little"))
        if not ok:
            raise ValueError(f"{array.path}: not the codec chain ShardEncoder writes")
        blosc = inner[1]
        self.codec = numcodecs.Blosc.from_config({
            "cname": blosc.cname.value, "clevel": blosc.clevel, "shuffle": _SHUFFLE[blosc.shuffle.value],
            "blocksize": blosc.blocksize, "typesize": array.dtype.itemsize,
        })
        self.array = array
        self.chunk = sharding.chunk_shape
        self.shard = array.shards
        self.axis = axis
        self.fill = array.fill_value
        self.location = Location(store_root)

    def write(self, index: int, block: np.ndarray) -> int:
        """Write shard `index` (along the ragged axis) holding `block`; returns the bytes written."""
        axis, step = self.axis, self.chunk[self.axis]
        slots = self.shard[axis] // step
        table = np.full((slots, 2), _EMPTY, dtype="<u8")
        parts, offset = [], 0
        for i in range(-(-block.shape[axis] // step)):
            chunk = block[(slice(None),) * axis + (slice(i * step, (i + 1) * step),)]
            if chunk.shape[axis] < step:  # the array's last chunk: zarr stores it padded
                pad = [(0, 0)] * block.ndim
                pad[axis] = (0, step - chunk.shape[axis])
                chunk = np.pad(chunk, pad, constant_values=self.fill)
            frame = self.codec.encode(np.ascontiguousarray(chunk))
            parts += [frame, _crc(frame)]
            table[i] = (offset, len(frame) + 4)
            offset += len(frame) + 4
        index_bytes = table.reshape(*[s // c for s, c in zip(self.shard, self.chunk)], 2).tobytes()
        parts += [index_bytes, _crc(index_bytes)]
        coords = tuple(index if a == axis else 0 for a in range(block.ndim))
        key = f"{self.array.path}/{self.array.metadata.encode_chunk_key(coords)}"
        self.location.write(key, parts, before=faults.before_shard_write)  # atomic, as zarr's stores write
        return offset + len(index_bytes) + 4
