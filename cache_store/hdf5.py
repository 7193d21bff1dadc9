"""A cache as one HDF5 file (`cache-export`, `cache-import`), for moving it as one file or opening it in
HDF5 tools. Every zarr node becomes the HDF5 node of the same path:

    FILE.h5                       attrs: the root's zarr attributes (read_cache: the manifest, as JSON)
      <group>/                    attrs: its zarr attributes (scalars as they are, the rest as JSON)
      <array>                     dataset: same shape and stored dtype (bfloat16 as its uint16 bits),
                                  chunked like the zarr inner chunks, gzip or lzf with shuffle, and
                                  HDF5's fletcher32 checksum on every chunk
      every node                  attrs["zarr.json"]: its zarr metadata document, verbatim

so `cache-import` writes back the same metadata and the same shards (ShardEncoder writes zarr's own
bytes), and the shard digests recorded at caching time check the HDF5 copy (`cache-inspect FILE.h5
--verify`) as they check the zarr cache.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import zarr

from .errors import CacheError
from .format import MANIFEST_KEY, combined_digest, shard_regions
from .location import Location
from .shards import ShardEncoder
from .store import STORE_KEY
from .verify import check_shard

ZARR_JSON = "zarr.json"
COMPRESSIONS = ("gzip", "lzf")


def _h5_attr(value):
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value)


def export_hdf5(cache, target: str | Path, compression: str = "gzip", progress=None) -> None:
    """Write the whole cache (a folder or s3://) into one HDF5 file; the file appears only once complete."""
    cache, target = Location(cache), Path(target)
    if not cache.exists(ZARR_JSON):
        raise CacheError(f"no cache at {cache}")
    root = zarr.open_group(cache.zarr_store(read_only=True), mode="r")
    if STORE_KEY in root.attrs:
        raise CacheError(f"{cache} is a store of tasks {', '.join(root.attrs[STORE_KEY]['tasks'])}; export one "
                         f"task's cache at a time ({cache}/TASK)")
    if MANIFEST_KEY not in root.attrs or not root.attrs[MANIFEST_KEY].get("complete"):
        raise CacheError(f"{cache} is not a complete READ cache; finish it with cache-activations --resume")
    if compression not in COMPRESSIONS:
        raise CacheError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    partial = target.with_name(f".{target.name}.partial")
    try:
        with h5py.File(partial, "w") as out:
            _copy_attrs(out, root, cache.read(ZARR_JSON))
            for path, node in sorted(root.members(max_depth=None), key=lambda item: item[0].count("/")):
                document = cache.read(f"{path}/{ZARR_JSON}")  # parents first: HDF5 groups before their members
                if isinstance(node, zarr.Group):
                    _copy_attrs(out.require_group(path), node, document)
                    continue
                dataset = out.create_dataset(path, shape=node.shape, dtype=node.dtype, **_layout(node, compression))
                _copy_attrs(dataset, node, document)
                for region in _shard_regions(node):
                    dataset[region] = node[region]
                    if progress:
                        progress(1)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _layout(node: zarr.Array, compression: str = "gzip") -> dict:
    """HDF5 chunks like zarr's inner chunks, compressed, with a checksum each (empty arrays: contiguous)."""
    if not node.size:
        return {}
    return {"chunks": tuple(max(1, c) for c in node.chunks), "compression": compression, "shuffle": True,
            "fletcher32": True}


def _shard_regions(node) -> list[tuple]:
    """A data array's shards along its ragged axis, in order (a zarr array, or its HDF5 copy, whose shard
    shape is in the zarr metadata it carries); any other array whole."""
    if "grows_along" not in node.attrs or not node.size:
        return [(...)]
    axis = int(node.attrs["axis"])
    shards = node.shards if isinstance(node, zarr.Array) else json.loads(node.attrs[ZARR_JSON])[
        "chunk_grid"]["configuration"]["chunk_shape"]
    return shard_regions(node.shape, axis, shards[axis])


def _copy_attrs(h5_node, zarr_node, document: bytes) -> None:
    for key, value in zarr_node.attrs.items():
        h5_node.attrs[key] = _h5_attr(value)
    h5_node.attrs[ZARR_JSON] = document.decode()


def import_hdf5(source: str | Path, target: str | Path, progress=None) -> None:
    """Write a cache folder back from an exported file: the same metadata documents and the same shard
    bytes as the cache it came from. Refuses a target that exists; leaves nothing on failure."""
    source, target = Path(source), Path(target)
    if target.exists() and any(target.iterdir()):
        raise CacheError(f"{target} exists and is not empty; choose another --to")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with h5py.File(_open_check(source), "r") as h5:
            _write_document(partial, h5.attrs[ZARR_JSON])
            paths: list[str] = []
            h5.visit(paths.append)
            for path in paths:  # every metadata document first, then the data through one opened group
                _write_document(partial / path, h5[path].attrs[ZARR_JSON])
            root = zarr.open_group(str(partial), mode="r+")
            for path in paths:
                if isinstance(h5[path], h5py.Dataset):
                    _write_array(partial, root[path], h5[path], progress)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _open_check(path: Path) -> Path:
    if not h5py.is_hdf5(path):
        raise CacheError(f"{path} is not an HDF5 file")
    return path


def _write_document(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ZARR_JSON).write_text(text)


def _write_array(root: Path, array: zarr.Array, dataset: h5py.Dataset, progress) -> None:
    if array.size == 0:
        return
    if array.shards is None or "grows_along" not in array.attrs:
        array[...] = dataset[...]
        return
    encoder = ShardEncoder(array, root, int(array.attrs["axis"]))  # the writer's own bytes, shard by shard
    for index, region in enumerate(_shard_regions(array)):
        encoder.write(index, dataset[region])
        if progress:
            progress(1)


def verify_hdf5(path: str | Path, progress=None) -> list[str]:
    """Problems found in an exported file, one line each: every shard-sized block read back (HDF5 checks
    each chunk's fletcher32) and compared with the digest recorded when the cache was written."""
    problems = []
    with h5py.File(_open_check(Path(path)), "r") as h5:
        manifest = json.loads(h5.attrs[MANIFEST_KEY])
        for split in manifest["splits"]:
            if split not in h5:
                problems.append(f"{split}: split is missing")
                continue
            recorded = json.loads(h5[split].attrs["checksums"])
            for array_path, digests in recorded.items():
                dataset = h5[f"{split}/{array_path}"]
                regions = _shard_regions(dataset)
                if len(regions) != len(digests):
                    problems.append(f"{split}/{array_path}: {len(digests)} checksums for {len(regions)} shards")
                for i, region in enumerate(regions):
                    if progress:
                        progress(1)
                    problem = check_shard(f"{split}/{array_path}: shard {i}", lambda: dataset[region],
                                          digests[i] if i < len(digests) else None)
                    if problem:
                        problems.append(problem)
            if manifest["checksums"].get(split) != combined_digest(recorded):
                problems.append(f"{split}: shard checksums differ from the manifest's")
    return problems
