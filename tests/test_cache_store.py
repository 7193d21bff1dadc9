"""The cache format on its own: ragged round trips across shard boundaries and resumes, refusals, verify."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

from cache_store import (
    ArraySpec, BackgroundWriter, CacheError, CacheReader, CacheWriter, SplitPlan, verify_cache,
)
from cache_store.format import EXAMPLES, PAIRS, TOKENS, to_storage

SPECS = [ArraySpec("encoder/hidden/0", TOKENS, (3,), 0), ArraySpec("encoder/attention/1", PAIRS, (2,), 1),
         ArraySpec("decoder/hidden/0", EXAMPLES, (3,), 0), ArraySpec("decoder/cross_attention/1", TOKENS, (), 0)]


def make_plan(lengths, seed=0) -> SplitPlan:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    return SplitPlan("train", lengths, rng.integers(0, 1000, int(lengths.sum())).astype(np.int32),
                     rng.integers(0, 2, len(lengths)), np.arange(len(lengths)))


def make_values(plan: SplitPlan, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {s.path: s.shape(int(plan.extent(s.grows_along)[-1])) for s in SPECS}
    return {path: torch.randn(shape, generator=g) for path, shape in sizes.items()}


def manifest(dtype="bfloat16"):
    return {"storage_dtype": dtype, "splits": {"train": {}}, "created_at": "now", "task": {"name": "toy"}}


def write(path, plan, values, dtype, batches, mode="new", stop_after=None, shard_bytes=64, chunk_bytes=16):
    """Write `values` in batches of examples; `stop_after` batches simulates a crash (no close)."""
    writer = CacheWriter(path, manifest(dtype), mode, shard_bytes=shard_bytes, chunk_bytes=chunk_bytes)
    split = writer.split("train", plan, SPECS)
    start = split.start_example()
    first = max(b for b in batches if b <= start) if start < plan.n_examples else None
    if first is None:
        return writer
    split.begin(first)
    bounds = [b for b in batches if b >= first] + [plan.n_examples]
    stored = {p: to_storage(v, dtype) for p, v in values.items()}
    background = BackgroundWriter(split)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if stop_after is not None and i == stop_after:
            background.stop()  # the crash: whatever reached disk stays, nothing is closed
            return writer
        arrays = {}
        for spec in SPECS:
            e = plan.extent(spec.grows_along)
            region = (slice(None),) * spec.axis + (slice(int(e[a]), int(e[b])),)
            arrays[spec.path] = stored[spec.path][region]
        background.put(arrays)
    background.close()
    writer.finish()
    return writer


def read_all(path):
    split = CacheReader(path).split("train")
    return {p: split.load(p) for p in split.array_paths()}


lengths_st = st.lists(st.integers(1, 9), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=lengths_st, dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
       batch=st.integers(1, 6), shard=st.sampled_from([16, 48, 200, 4096]), data=st.data())
def test_ragged_round_trip_across_shards_and_resumes(tmp_path_factory, lengths, dtype, batch, shard, data):
    plan = make_plan(lengths)
    values = make_values(plan)
    batches = list(range(0, plan.n_examples, batch))
    fresh = tmp_path_factory.mktemp("fresh") / "c"
    write(fresh, plan, values, dtype, batches, shard_bytes=shard, chunk_bytes=8)
    got = read_all(fresh)
    for path, value in values.items():
        assert torch.equal(got[path], value.to(got[path].dtype)), path
    assert verify_cache(fresh) == []
    # Crash after some batches, then resume: the same bytes as the uninterrupted run.
    resumed = tmp_path_factory.mktemp("resumed") / "c"
    crash_at = data.draw(st.integers(0, len(batches)))
    write(resumed, plan, values, dtype, batches, stop_after=crash_at, shard_bytes=shard, chunk_bytes=8)
    write(resumed, plan, values, dtype, batches, mode="resume", shard_bytes=shard, chunk_bytes=8)
    again = read_all(resumed)
    assert all(torch.equal(again[p], got[p]) for p in got)
    a, b = zarr.open_group(str(fresh), mode="r"), zarr.open_group(str(resumed), mode="r")
    assert a["train"].attrs["checksums"] == b["train"].attrs["checksums"]


def test_reader_serves_examples_and_length_bucketed_batches(tmp_path):
    plan = make_plan([5, 4, 4, 2, 1])
    values = make_values(plan)
    write(tmp_path / "c", plan, values, "float32", [0, 2, 4])
    split = CacheReader(tmp_path / "c").split("train")
    ex = split.example(1, ["encoder/hidden/0", "encoder/attention/1", "decoder/hidden/0"])
    assert ex["encoder/hidden/0"].shape == (4, 3) and ex["encoder/attention/1"].shape == (2, 4, 4)
    torch.testing.assert_close(ex["encoder/attention/1"].reshape(2, 16), values["encoder/attention/1"][:, 25:41])
    assert ex["decoder/hidden/0"].shape == (3,)
    batches = list(split.iter_batches(2, ["encoder/hidden/0"], shuffle=True, seed=1))
    assert sorted(b.start for b in batches) == [0, 2, 4]
    assert sum(len(b.lengths) for b in batches) == 5
    b = next(b for b in batches if b.start == 2)
    assert b.arrays["encoder/hidden/0"].shape == (6, 3)


def test_existing_cache_is_refused_and_left_untouched(tmp_path):
    plan = make_plan([3, 2])
    write(tmp_path / "c", plan, make_values(plan), "float32", [0])
    before = (tmp_path / "c" / "zarr.json").read_bytes()
    with pytest.raises(CacheError, match="--resume .* --overwrite"):
        CacheWriter(tmp_path / "c", manifest("float32"))
    assert (tmp_path / "c" / "zarr.json").read_bytes() == before
    with pytest.raises(CacheError, match="other settings.*storage_dtype"):
        CacheWriter(tmp_path / "c", manifest("float16"), mode="resume")


def test_reader_refuses_incomplete_mismatched_and_unknown_versions(tmp_path):
    plan = make_plan([3, 2, 2])
    write(tmp_path / "c", plan, make_values(plan), "float32", [0, 1, 2], stop_after=1)
    with pytest.raises(CacheError, match="incomplete .* --resume"):
        CacheReader(tmp_path / "c").split("train")
    with pytest.raises(CacheError, match="task.name: cache has 'toy', asked for 'rte'"):
        CacheReader(tmp_path / "c", expect={"task.name": "rte"})
    meta = tmp_path / "c" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["read_cache"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="format version 99"):
        CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="no cache at"):
        CacheReader(tmp_path / "nothing")


def test_verify_and_reader_catch_flipped_and_deleted_shards(tmp_path):
    plan = make_plan([6, 5, 5, 4, 3, 3, 2, 1])
    write(tmp_path / "c", plan, make_values(plan), "bfloat16", [0, 3, 6], shard_bytes=64, chunk_bytes=16)
    shard_dir = tmp_path / "c" / "train" / "encoder" / "hidden" / "0" / "c"
    shards = sorted(shard_dir.iterdir(), key=lambda p: int(p.name))
    assert len(shards) > 2
    raw = bytearray((shards[1] / "0").read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    (shards[1] / "0").write_bytes(bytes(raw))
    problems = verify_cache(tmp_path / "c")
    assert any("train/encoder/hidden/0: shard 1" in p for p in problems), problems
    with pytest.raises(CacheError, match="corrupted"):
        CacheReader(tmp_path / "c").split("train").load("encoder/hidden/0")
    (shards[2] / "0").unlink()
    problems = verify_cache(tmp_path / "c")
    assert any("shard 2" in p and "missing" in p for p in problems), problems
    with pytest.raises(CacheError, match="missing"):
        CacheReader(tmp_path / "c").split("train")


@pytest.mark.parametrize("shape, axis, chunk, shard, dtype", [
    ((70, 5), 0, 8, 24, "uint16"),   # [T, d]: a partial last shard and a partial last chunk
    ((3, 100), 1, 10, 40, "uint16"),  # [A, S]
    ((33,), 0, 4, 16, "float32"),     # [S]
    ((16, 4), 0, 4, 16, "float16"),   # one shard exactly
])
def test_shard_encoder_writes_exactly_zarrs_bytes(tmp_path, shape, axis, chunk, shard, dtype):
    from cache_store.format import compressors
    from cache_store.shards import ShardEncoder

    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    data = data.view(np.uint32).astype(np.uint16) if dtype == "uint16" else data.astype(dtype)
    chunks = tuple(chunk if a == axis else n for a, n in enumerate(shape))
    shards = tuple(shard if a == axis else n for a, n in enumerate(shape))
    root = zarr.open_group(str(tmp_path), mode="w")
    made = {name: root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                    compressors=compressors(), fill_value=0, config={"write_empty_chunks": True})
            for name in ("ours", "zarrs")}
    encoder = ShardEncoder(made["ours"], tmp_path, axis)
    for i, start in enumerate(range(0, shape[axis], shard)):
        region = (slice(None),) * axis + (slice(start, start + shard),)
        encoder.write(i, data[region])
        made["zarrs"][region] = data[region]
    ours = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(tmp_path / "zarrs") for p in (tmp_path / "zarrs").rglob("*") if p.is_file())
    assert ours == theirs
    for name in ours:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "zarrs" / name).read_bytes(), name
    assert np.array_equal(zarr.open_group(str(tmp_path), mode="r")["ours"][...], data)
