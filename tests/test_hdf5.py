"""cache-export / cache-import: one HDF5 file holding the whole cache, and back to the same bytes."""
from __future__ import annotations

import json

import h5py
import numpy as np
from click.testing import CliRunner

from conftest import arrays_of
from cache_store.cli import export, import_
from cache_store.cli import main as inspect_main


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_import_round_trip_is_byte_identical(tiny_t5, make_cache, tmp_path):
    cache = make_cache(tiny_t5, task="rte", limit=24, batch_size=5, shard_mb=0.01, attention="topk:8",
                       quantize=("attention", "hidden"))
    h5 = tmp_path / "rte.h5"
    assert CliRunner().invoke(export, [str(cache), "--to", str(h5)]).exit_code == 0
    with h5py.File(h5, "r") as f:  # readable by plain HDF5 tools: the manifest and every array by name
        manifest = json.loads(f.attrs["read_cache"])
        assert manifest["task"]["name"] == "rte" and manifest["complete"]
        stored = arrays_of(cache)
        for path, values in stored.items():
            assert f[path].dtype == values.dtype
            np.testing.assert_array_equal(f[path][...], values, err_msg=path)
    inspected = CliRunner().invoke(inspect_main, [str(h5), "--verify"])
    assert inspected.exit_code == 0 and "every shard matches" in inspected.output, inspected.output
    back = tmp_path / "back"
    assert CliRunner().invoke(import_, [str(h5), "--to", str(back)]).exit_code == 0
    assert files_of(back) == files_of(cache)  # every metadata document and every shard, byte for byte
    again = CliRunner().invoke(import_, [str(h5), "--to", str(back)])
    assert again.exit_code == 2 and "not empty" in again.output
    refused = CliRunner().invoke(export, [str(cache), "--to", str(h5)])
    assert refused.exit_code == 2 and "exists" in refused.output


def test_a_damaged_export_fails_verify(tiny_bert, make_cache, tmp_path):
    cache = make_cache(tiny_bert, task="rte", limit=24, batch_size=5, splits=("validation",))
    h5 = tmp_path / "rte.h5"
    assert CliRunner().invoke(export, [str(cache), "--to", str(h5)]).exit_code == 0
    with h5py.File(h5, "r+") as f:  # a value changed through HDF5 itself: its chunk checksum is rewritten,
        data = f["validation/encoder/hidden/1"]  # so only the digest recorded at caching time can notice
        data[0, 0] = data[0, 0] + 1
    inspected = CliRunner().invoke(inspect_main, [str(h5), "--verify"])
    assert inspected.exit_code == 1 and "validation/encoder/hidden/1: shard 0 differs" in inspected.output
