"""Full verification of a cache: every shard present, readable (inner-chunk crc32c) and equal to the
checksum recorded when it was written."""
from __future__ import annotations

import zarr

from .format import MANIFEST_KEY, block_digest, combined_digest, shard_keys, shard_regions
from .location import Location
from .reader import METADATA_ARRAYS


RESUMABLE = "finish it with cache-activations --resume"


def check_shard(where: str, read, digest: str | None) -> str | None:
    """What is wrong with one shard, `read()` returning its values (a checksum or decode failure raises),
    compared with the digest recorded when it was written; None when it is intact."""
    try:
        block = read()
    except Exception as exc:
        return f"{where} is unreadable ({type(exc).__name__}: {exc})"
    if digest is not None and block_digest(block) != digest:
        return f"{where} differs from its recorded checksum"
    return None


def verify_cache(path, progress=None) -> list[str]:
    """Problems found, one line each; [] when the cache is intact. `progress(n)` is called per shard.
    An unfinished split (a crash, a full disk) is reported as such, ending with `RESUMABLE`, and the
    shards it has committed are verified all the same."""
    location = Location(path)
    root = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    manifest = root.attrs[MANIFEST_KEY]
    problems = []
    for split in manifest["splits"]:
        if split not in root:
            problems.append(f"{split}: not written yet; {RESUMABLE}" if not manifest.get("complete")
                            else f"{split}: split is missing")
            continue
        group = root[split]
        complete = bool(group.attrs.get("complete"))
        if not complete:
            problems.append(f"{split}: incomplete ({group.attrs.get('committed')} of "
                            f"{group.attrs.get('n_examples')} examples committed); {RESUMABLE}")
        for key in METADATA_ARRAYS:
            try:
                group[key][:]
            except Exception as exc:
                problems.append(f"{split}/{key}: unreadable ({type(exc).__name__}: {exc})")
        recorded = group.attrs["checksums"]
        present = location.sizes(split)
        for array_path, digests in recorded.items():
            array = group[array_path]
            axis = array.attrs["axis"]
            files = shard_keys(array)
            if complete and len(digests) != len(files):
                problems.append(f"{array.path}: {len(digests)} checksums for {len(files)} shards")
            regions = shard_regions(array.shape, axis, array.shards[axis])
            for i, file in enumerate(files if complete else files[:len(digests)]):  # unfinished: the committed
                if progress:
                    progress(1)
                where = f"{array.path}: shard {i} ({file})"
                if file not in present:
                    problems.append(f"{where} is missing")
                    continue
                problem = check_shard(where, lambda: array[regions[i]], digests[i] if i < len(digests) else None)
                if problem:
                    problems.append(problem)
        if complete and manifest["checksums"].get(split) != combined_digest(recorded):
            problems.append(f"{split}: shard checksums differ from the manifest's")
    return problems
