"""Faults injected into both stages: disk full, a second writer, stale locks, corrupted and mismatched
caches, crashed and diverging training, and bad input. Each must lose nothing and explain itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import arrays_of, cache_args
from cache_store import CacheReader, faults
from cache_store.faults import CRASH_AFTER_EPOCH_ENV, DISK_FULL_AFTER_ENV
from cache_store.cli import main as inspect_main
from cache_store.lock import WriteLock
from pipeline.cli import main as cache_main
from side_train.cli import main as train_main
from side_train.config import RunConfig
from side_train.state import STATE_FILE
from side_train.train import train

SMALL_SHARDS = ("--shard-mb", "0.02")  # many shards from a few rows
REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def whole(tiny_t5, glue_dir, tmp_path_factory) -> Path:
    """An uninterrupted cache: what every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("whole")
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, out, *SMALL_SHARDS))
    assert result.exit_code == 0, result.output
    return out / tiny_t5.name / "rte"


# --- caching: disk full, one writer ---------------------------------------------------------------------

def test_disk_full_is_explained_keeps_what_was_committed_and_resume_finishes(tiny_t5, glue_dir, tmp_path, whole,
                                                                            monkeypatch):
    monkeypatch.setenv(DISK_FULL_AFTER_ENV, "150")  # of the train split's 245 shard files
    monkeypatch.setattr(faults, "_shards_written", 0)
    full = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, *SMALL_SHARDS))
    assert full.exit_code == 1 and "No space left on device" in full.output and "--resume" in full.output
    assert "Traceback" not in full.output and len(full.output.strip().splitlines()) == 1
    path = tmp_path / tiny_t5.name / "rte"
    assert not list(path.rglob("*.partial"))  # the failed write left no half-written file
    train = zarr.open_group(str(path), mode="r")["train"].attrs
    assert 0 < train["committed"] < train["n_examples"]
    verified = CliRunner().invoke(inspect_main, [str(path), "--verify"])
    assert "CORRUPT" not in verified.output and "committed shards are intact" in verified.output
    assert "UNFINISHED train: incomplete" in verified.output and "--resume" in verified.output
    monkeypatch.delenv(DISK_FULL_AFTER_ENV)
    resumed = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, *SMALL_SHARDS, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    expected, got = arrays_of(whole), arrays_of(path)
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


def test_sizing_a_split_while_another_rank_writes_it_skips_files_in_flight(tmp_path, monkeypatch):
    """Under torchrun rank 0 sizes a split it has finished while other ranks still write theirs: a
    temporary listed, then renamed away before its size is read, must be skipped, not fail the run."""
    from cache_store.location import Location

    location = Location(tmp_path)
    location.write("train/a/c/0/0", [b"12345"])
    (tmp_path / "train/a/c/1").mkdir(parents=True)
    (tmp_path / "train/a/c/1/.0.partial").write_bytes(b"in flight")  # another writer's, mid-write
    listed = list((tmp_path / "train").rglob("*"))
    vanished = tmp_path / "train/a/c/2/0"  # listed by rglob, then renamed away before its stat
    real_rglob, real_is_file = Path.rglob, Path.is_file
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter([*listed, vanished])
                        if self == tmp_path / "train" else real_rglob(self, pattern))
    monkeypatch.setattr(Path, "is_file", lambda self: self == vanished or real_is_file(self))
    assert location.sizes("train") == {"train/a/c/0/0": 5}


def test_a_second_writer_is_refused_naming_the_holder(tiny_t5, glue_dir, tmp_path):
    with WriteLock(tmp_path / tiny_t5.name / "rte"):
        result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, *SMALL_SHARDS))
    assert result.exit_code == 2 and f"process {os.getpid()} on" in result.output
    assert "is being written by" in result.output and "Traceback" not in result.output
    assert not (tmp_path / tiny_t5.name / "rte").exists()  # refused before anything was written


def test_a_stale_lock_from_a_dead_process_is_taken_over(tiny_t5, glue_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / tiny_t5.name / "rte.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "since": "then", "command": "x"}))
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, *SMALL_SHARDS))
    assert result.exit_code == 0, result.output
    assert f"took over the lock of process {int(dead.stdout)}" in result.output
    assert not lock.exists()  # released at the end


# --- corruption and mismatch ------------------------------------------------------------------------------

def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_cache_is_named_by_verify_and_refused_by_train_side(whole, tmp_path, damage):
    path = _copy(whole, tmp_path / "rte")
    shard = path / "train" / "encoder" / "hidden" / "2" / "c" / "1" / "0"
    assert shard.is_file()
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    verified = CliRunner().invoke(inspect_main, [str(path), "--verify"])
    assert verified.exit_code != 0 and "train/encoder/hidden/2" in verified.output and "shard 1" in verified.output
    trained = CliRunner().invoke(train_main, ["--from-cache", str(path), "--hidden", "8", "--epochs", "1",
                                              "--out", str(tmp_path / "runs"), "--quiet"])
    assert trained.exit_code == 2 and "Traceback" not in trained.output
    assert "train/encoder/hidden/2" in trained.output or "missing" in trained.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


def test_mismatched_caches_are_refused_saying_what_differs(whole, tmp_path):
    path = _copy(whole, tmp_path / "rte")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["read_cache"]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    trained = CliRunner().invoke(train_main, ["--from-cache", str(path), "--out", str(tmp_path / "runs")])
    assert trained.exit_code == 2 and "format version 99" in trained.output and "re-create" in trained.output
    with pytest.raises(Exception, match="task.version: cache has 1, asked for 2"):
        CacheReader(whole, expect={"task.version": 2})
    with pytest.raises(Exception, match="backbone.config_hash"):
        CacheReader(whole, expect={"backbone.config_hash": "another"})


# --- training: crash and resume, non-finite losses ---------------------------------------------------------

def _train_command(sources: list[Path], out: Path, lrs: str, *extra) -> list[str]:
    caches = [a for s in sources for a in ("--from-cache", str(s))]
    return [sys.executable, "-m", "side_train.cli", *caches, *(["--multi-task"] if len(sources) > 1 else []),
            "--hidden", "8", "--lr", lrs, "--epochs", "3", "--patience", "3", "--batch-size", "4",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def stsb_cache(tiny_t5, make_cache) -> Path:
    return make_cache(tiny_t5, task="stsb", limit=12)


@pytest.fixture(scope="module")
def rte_cache(tiny_t5, make_cache) -> Path:
    return make_cache(tiny_t5, task="rte", limit=12)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["single", "sweep", "multi-task"])
def test_training_killed_after_an_epoch_resumes_to_the_same_metrics(rte_cache, stsb_cache, tmp_path, mode):
    sources = [rte_cache, stsb_cache] if mode == "multi-task" else [rte_cache]
    lrs = "3e-3" if mode == "single" else "3e-3,1e-3"
    configs = [RunConfig(width=8, lr=float(lr), epochs=3, patience=3, batch_size=4) for lr in lrs.split(",")]
    expected = train(sources, configs, tmp_path / "whole", **QUIET)
    command = _train_command(sources, tmp_path / "killed", lrs)
    env = {**os.environ, "PYTHONPATH": str(REPO), CRASH_AFTER_EPOCH_ENV: "1"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    folder = tmp_path / "killed" / f"{rte_cache.parent.name}-{'+'.join(s.name for s in sources)}"
    assert (folder / STATE_FILE).is_file()
    again = CliRunner().invoke(train_main, command[3:])  # without --resume: refused, nothing overwritten
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(train_main, [*command[3:], "--resume"])
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    resumed = [json.loads((folder / c.name / "metrics.json").read_text()) for c in configs]
    for a, b in zip(expected, resumed):
        for key in ("train_loss", "validation", "best_validation", "best_epoch", "test", "tasks"):
            assert a[key] == b[key], key
    assert not (folder / STATE_FILE).exists()


def test_a_diverging_configuration_stops_alone_and_the_summary_marks_it(rte_cache, tmp_path):
    result = CliRunner().invoke(train_main, ["--from-cache", str(rte_cache), "--hidden", "8", "--lr", "1e-3,1e30",
                                             "--epochs", "2", "--batch-size", "4", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "training loss became" in result.output and "lower --lr" in result.output
    folder = tmp_path / f"{rte_cache.parent.name}-rte"
    bad = json.loads((folder / "gru-r8-lr1e+30-s0" / "metrics.json").read_text())
    good = json.loads((folder / "gru-r8-lr0.001-s0" / "metrics.json").read_text())
    assert bad["status"].startswith("failed: training loss became") and good["status"] == "ok"
    assert good["epochs_run"] == 2 and good["test"] is not None
    summary = (folder / "summary.md").read_text().splitlines()
    assert "failed" in summary[-1] and "gru-r8-lr0.001-s0" in summary[4]  # ranked first; the failure last


# --- bad input --------------------------------------------------------------------------------------------

def _glue_copy(glue_dir: Path, tmp_path: Path, train_tsv: str | None) -> Path:
    """An RTE folder in GLUE's layout: the real dev.tsv and the given train.tsv (None: missing)."""
    folder = tmp_path / "glue" / "RTE"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_bytes((glue_dir / "RTE" / "dev.tsv").read_bytes())
    if train_tsv is not None:
        (folder / "train.tsv").write_text(train_tsv)
    return tmp_path / "glue"


HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize("case, message", [
    ("unknown task", "unknown task nope"),
    ("missing data file", "missing data file"),
    ("wrong columns", "header lacks column"),
    ("label outside the label set", "label 'maybe' is not one of"),
    ("empty split", "split is empty"),
    ("max length 0", "--max-length must be positive"),
    ("batch size 0", "--batch-size must be positive"),
    ("unreadable model directory", "no config.json"),
    ("hub unreachable, no local path", "offline, pass --model DIR"),
])
def test_bad_input_is_one_line_with_nothing_written(tiny_t5, glue_dir, tmp_path, case, message):
    args = {"--task": "rte", "--model": str(tiny_t5), "--data-dir": str(glue_dir), "--out": str(tmp_path / "out")}
    extra = []
    if case == "unknown task":
        args["--task"] = "nope"
    elif case == "missing data file":
        args["--data-dir"] = str(_glue_copy(glue_dir, tmp_path, None))
    elif case == "wrong columns":
        args["--data-dir"] = str(_glue_copy(glue_dir, tmp_path, "index\tsentence1\tlabel\n0\ta\tentailment\n"))
    elif case == "label outside the label set":
        args["--data-dir"] = str(_glue_copy(glue_dir, tmp_path, HEADER + "0\ta\tb\tmaybe\n"))
    elif case == "empty split":
        args["--data-dir"] = str(_glue_copy(glue_dir, tmp_path, HEADER))
    elif case == "max length 0":
        extra = ["--max-length", "0"]
    elif case == "batch size 0":
        extra = ["--batch-size", "0"]
    elif case == "unreadable model directory":
        (tmp_path / "not-a-model").mkdir()
        args["--model"] = str(tmp_path / "not-a-model")
    elif case == "hub unreachable, no local path":
        args["--model"] = "nobody/no-such-model"
    argv = [a for pair in args.items() for a in pair] + extra + ["--limit", "8", "--quiet"]
    result = CliRunner().invoke(cache_main, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- slow: SIGKILL at random moments ---------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_always_equals_uninterrupted(tiny_t5, glue_dir, tmp_path):
    """20 trials: start cache-activations, SIGKILL it at a random moment of its writing (drawn uniformly
    over an uninterrupted run's writing time, from the moment the cache folder appears), resume, and
    compare every array with an uninterrupted run."""
    import random
    import signal
    import time

    base = [sys.executable, "-m", "pipeline.cli", "--task", "rte", "--model", str(tiny_t5), "--data-dir",
            str(glue_dir), "--limit", "96", "--batch-size", "4", "--shard-mb", "0.01", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(out: Path, *extra) -> tuple[subprocess.Popen, float | None]:
        """Start a run; return it and when its cache folder appeared (None if it ended first)."""
        process = subprocess.Popen([*base, "--out", str(out), *extra], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        manifest = out / tiny_t5.name / "rte" / "zarr.json"
        while process.poll() is None and not manifest.exists():
            time.sleep(0.005)
        return process, (time.perf_counter() if manifest.exists() else None)

    process, began = start(tmp_path / "whole")
    assert process.wait() == 0, process.stderr.read()
    writing = time.perf_counter() - began
    expected = arrays_of(tmp_path / "whole" / tiny_t5.name / "rte")
    rng = random.Random(0)
    killed_mid_split = 0
    for trial in range(20):
        out = tmp_path / f"trial{trial}"
        process, began = start(out)
        assert began is not None, process.stderr.read()
        time.sleep(rng.uniform(0, writing))
        process.send_signal(signal.SIGKILL)
        assert process.wait() in (-9, 0)
        path = out / tiny_t5.name / "rte"
        groups = [zarr.open_group(str(path), mode="r").get(s) for s in ("train", "validation", "test")]
        killed_mid_split += any(g is not None and not g.attrs["complete"] for g in groups)
        resumed = subprocess.run([*base, "--out", str(out), "--resume"], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, (trial, resumed.stderr)
        got = arrays_of(path)
        assert got.keys() == expected.keys(), trial
        for key in expected:
            assert np.array_equal(expected[key], got[key]), (trial, key)
        assert not (out / tiny_t5.name / "rte.lock").exists()
    assert killed_mid_split >= 5, killed_mid_split  # the kills landed inside the work, not only around it
    print(f"20 trials over {writing:.1f} s of writing: {killed_mid_split} killed with a split unfinished; "
          "every resumed cache equals the uninterrupted one")
