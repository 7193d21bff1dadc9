"""torchrun: caching with two CPU processes (gloo) gives the single-process cache byte for byte, and a
rank killed mid-split resumes, with any number of processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import arrays_of, cache_args
from cache_store import CacheReader, CacheError, verify_cache
from cache_store.faults import CRASH_AFTER_COMMITS_ENV, CRASH_RANK_ENV

REPO = Path(__file__).resolve().parents[1]
# The default (compact) storage, in shards of about 10 KiB: every array has several, so both ranks write some.
pytestmark = pytest.mark.integration
ARGS = ["--shard-mb", "0.01", "--attention", "topk:8", "--quantize", "attention,hidden"]


def torchrun(model, glue_dir, out, *extra, nproc=2, env=None) -> subprocess.CompletedProcess:
    """`torchrun ... cache-activations`; nproc=0: the same command as one plain process. Every process
    computes on one thread (torchrun's default): CPU matmuls' last bits depend on the thread count."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m"] if nproc else [sys.executable, "-m"]
    command = [*launcher, "pipeline.cli", *cache_args(model, glue_dir, out, *ARGS, *extra)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed command said: every rank's one-line errors first (a later rank's traceback can bury
    them), then the end of its output."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return "\n".join([*errors, done.stderr[-3000:]])


@pytest.fixture(scope="module")
def single_process(glue_dir, tmp_path_factory):
    """The cache one process writes, per model, made once."""
    made = {}

    def make(model) -> Path:
        if model not in made:
            out = tmp_path_factory.mktemp("single")
            done = torchrun(model, glue_dir, out, nproc=0)
            assert done.returncode == 0, failure(done)
            made[model] = out / model.name / "rte"
        return made[model]

    return make


def assert_same_cache(ours: Path, reference: Path) -> None:
    """Every array equal, every file but the root's zarr.json (its created_at) byte-identical."""
    mine, theirs = arrays_of(ours), arrays_of(reference)
    assert mine.keys() == theirs.keys()
    for path in theirs:
        np.testing.assert_array_equal(mine[path], theirs[path], err_msg=path)
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    differ = [str(f) for f in files if (ours / f).read_bytes() != (reference / f).read_bytes()]
    assert differ == ["zarr.json"]
    manifests = [zarr.open_group(str(p), mode="r").attrs["read_cache"] for p in (ours, reference)]
    assert manifests[0]["checksums"] == manifests[1]["checksums"] and manifests[0]["complete"]
    assert verify_cache(ours) == []


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_bert"])
def test_two_ranks_write_the_single_process_cache(model, request, single_process, glue_dir, tmp_path):
    model = request.getfixturevalue(model)
    reference = single_process(model)
    assert len(zarr.open_group(str(reference / "train"))["encoder/hidden/0"].metadata.chunk_grid.chunk_shape) == 2
    done = torchrun(model, glue_dir, tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("cache:") == 1  # rank 0 reports for both
    assert_same_cache(tmp_path / model.name / "rte", reference)


@pytest.mark.parametrize("resume_with", [1, 2])
def test_rank_killed_mid_split_resumes(resume_with, tiny_bert, single_process, glue_dir, tmp_path):
    reference = single_process(tiny_bert)
    killed = torchrun(tiny_bert, glue_dir, tmp_path, env={CRASH_AFTER_COMMITS_ENV: "4", CRASH_RANK_ENV: "1"})
    assert killed.returncode != 0
    cache = tmp_path / tiny_bert.name / "rte"
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(cache).split("train")
    records = zarr.open_group(str(cache / "train" / "ranks"), mode="r")
    assert {name for name, _ in records.groups()} == {"0", "1"}
    resumed = torchrun(tiny_bert, glue_dir, tmp_path, "--resume", nproc=0 if resume_with == 1 else resume_with)
    assert resumed.returncode == 0, failure(resumed)
    assert not (cache / "train" / "ranks").exists()
    assert_same_cache(cache, reference)


def train_side(cache: Path, out: Path, nproc: int) -> subprocess.CompletedProcess:
    """A 4-run sweep (2 learning rates x 2 seeds: two stacks) as one process or under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m"] if nproc else [sys.executable, "-m"]
    command = [*launcher, "side_train.cli", "--from-cache", str(cache), "--out", str(out), "--lr", "1e-3,3e-3",
               "--seeds", "0,1", "--epochs", "2", "--hidden", "16", "--quiet"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_ranks_share_a_sweep_with_the_single_process_results(tiny_bert, single_process, tmp_path):
    import csv
    import json

    cache = single_process(tiny_bert)
    for name, nproc in (("one", 0), ("two", 2)):
        done = train_side(cache, tmp_path / name, nproc)
        assert done.returncode == 0, failure(done)
    (one,), (two,) = (list((tmp_path / name).iterdir()) for name in ("one", "two"))
    runs = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert len(runs) == 4 and runs == sorted(p.name for p in two.iterdir() if p.is_dir())
    for run in runs:
        a, b = (json.loads((folder / run / "metrics.json").read_text()) for folder in (one, two))
        assert a["validation"] == b["validation"] and a["test"] == b["test"], run
        assert (one / run / "model.safetensors").read_bytes() == (two / run / "model.safetensors").read_bytes()

    def table(folder):
        with open(folder / "summary.csv") as handle:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]

    assert table(one) == table(two)  # rank 0 summarised every rank's runs
    assert not list(two.glob("training_state*"))


def test_two_ranks_write_the_single_process_store(tiny_bert, glue_dir, tmp_path):
    """A store of two tasks (cache_store/store.py) written by two ranks, task after task, equals the one a
    single process writes, array by array; with --outliers, rank 0 chooses each task's channels and the
    other rank reads them from the cache."""
    made = {}
    for nproc in (0, 2):
        out = tmp_path / f"nproc{nproc}"
        done = torchrun(tiny_bert, glue_dir, out, "--task", "sst2,cola", "--quantize", "attention,hidden4",
                        "--outliers", "3", nproc=nproc)
        assert done.returncode == 0, failure(done)
        made[nproc] = arrays_of(out / tiny_bert.name / "sst2+cola")
    assert made[0].keys() == made[2].keys() and any(k.startswith("cola/") for k in made[0])
    assert any("hidden_outliers" in k for k in made[0])
    for path, value in made[0].items():
        np.testing.assert_array_equal(made[2][path], value, err_msg=path)
