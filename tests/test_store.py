"""One store for many tasks: `cache-activations --task sst2,cola` against single-task caches, a SIGKILL in
the second task then --resume, --add, multi-task training from a store against two caches, cache-inspect
and predict-side on a store's checkpoint."""
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

from cache_store.cli import main as inspect_main
from cache_store.faults import CRASH_AFTER_COMMITS_ENV, CRASH_TASK_ENV
from cache_store.store import GLUE_TASKS, STORE_KEY, task_caches
from conftest import arrays_of
from pipeline.cli import main as cache_main
from side_train.cli import main as train_main
from side_train.cli import predict as predict_main

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("created_at", "package_version")


def cache_args(model, glue_dir, out, tasks, *extra) -> list[str]:
    """24 rows of each split, batches of 5, small shards (many commits), the default storage."""
    return ["--task", tasks, "--model", str(model), "--data-dir", str(glue_dir), "--out", str(out), "--limit", "24",
            "--batch-size", "5", "--shard-mb", "0.02", "--quiet", *extra]


def invoke(command, args) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def manifest(path) -> dict:
    found = dict(zarr.open_group(str(path), mode="r").attrs["read_cache"])
    return {k: v for k, v in found.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def store(tiny_t5, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    invoke(cache_main, cache_args(tiny_t5, glue_dir, out, "sst2,cola"))
    return out / tiny_t5.name / "sst2+cola"


@pytest.fixture(scope="module")
def singles(tiny_t5, glue_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("singles")
    for task in ("sst2", "cola"):
        invoke(cache_main, cache_args(tiny_t5, glue_dir, out, task))
    return {task: out / tiny_t5.name / task for task in ("sst2", "cola")}


def test_a_store_equals_the_single_task_caches_array_by_array(store, singles):
    top = dict(zarr.open_group(str(store), mode="r").attrs[STORE_KEY])
    assert top["tasks"] == ["sst2", "cola"]
    assert [t for t, _ in task_caches(store)] == ["sst2", "cola"]
    for task, single in singles.items():
        ours, theirs = arrays_of(store / task), arrays_of(single)
        assert ours.keys() == theirs.keys() and len(ours) > 20
        for key in theirs:
            assert np.array_equal(ours[key], theirs[key]), (task, key)
        assert manifest(store / task) == manifest(single)
        for field in ("backbone", "tokenizer", "storage_dtype", "attention", "storage", "layers"):
            assert top[field] == manifest(single)[field], field  # recorded once at the top, as every task has it


@pytest.mark.integration
def test_sigkill_in_the_second_task_then_resume_gives_the_same_store(store, tiny_t5, glue_dir, tmp_path):
    command = [sys.executable, "-m", "pipeline.cli", *cache_args(tiny_t5, glue_dir, tmp_path, "sst2,cola")]
    env = {**os.environ, "PYTHONPATH": str(REPO), CRASH_AFTER_COMMITS_ENV: "3", CRASH_TASK_ENV: "cola"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    path = tmp_path / tiny_t5.name / "sst2+cola"
    assert manifest(path / "sst2")["complete"] and not manifest(path / "cola")["complete"]
    refused = CliRunner().invoke(train_main, ["--multi-task", "--from-cache", str(path), "--out", str(tmp_path / "r")])
    assert refused.exit_code == 2 and "incomplete" in refused.output and "--resume" in refused.output
    resumed = subprocess.run([*command, "--resume"], env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "sst2/train" in resumed.stdout and "already complete" in resumed.stdout  # only cola was computed
    expected, got = arrays_of(store), arrays_of(path)
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key
    for task in ("sst2", "cola"):
        assert manifest(path / task) == manifest(store / task)
    assert not (tmp_path / tiny_t5.name / "sst2+cola.lock").exists()


def test_add_caches_only_the_new_task_and_refuses_other_settings(store, tiny_t5, tiny_bert, glue_dir, tmp_path):
    import shutil

    path = tmp_path / tiny_t5.name / "sst2+cola"
    shutil.copytree(store, path)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    out = invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, "rte", "--store", "sst2+cola", "--add"))
    assert "rte/train" in out and "sst2/" not in out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "zarr.json" != p.name or p.parent != path)
    assert [t for t, _ in task_caches(path)] == ["sst2", "cola", "rte"]
    again = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, "rte", "--store", "sst2+cola"))
    assert again.exit_code == 2 and "already holds a store" in again.output
    other = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, "mrpc", "--store", "sst2+cola",
                                                      "--add", "--max-length", "64"))
    assert other.exit_code == 2 and "max_length" in other.output and not (path / "mrpc").exists()
    bert = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path, "mrpc", "--store", "sst2+cola",
                                                     "--add", "--name", tiny_t5.name))
    assert bert.exit_code == 2 and "backbone" in bert.output and not (path / "mrpc").exists()


def test_task_lists_and_glue_are_checked_before_anything_is_written(tiny_t5, glue_dir, tmp_path):
    from pipeline.cli import _task_list

    assert _task_list("glue") == list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli"]
    for bad, message in (("sst2,nope", "unknown task nope"), ("sst2,sst2", "names a task twice")):
        result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, bad))
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    # This checkout's GLUE copy has no QQP: every task's rows are read before any task is written.
    result = CliRunner().invoke(cache_main, cache_args(tiny_t5, glue_dir, tmp_path, "glue"))
    assert result.exit_code == 2 and "QQP" in result.output
    assert not (tmp_path / tiny_t5.name).exists()


def test_train_side_takes_a_store_whole_or_by_task(store, tmp_path):
    one = CliRunner().invoke(train_main, ["--from-cache", str(store), "--out", str(tmp_path)])
    assert one.exit_code == 2 and "--multi-task" in one.output and "--tasks" in one.output
    missing = CliRunner().invoke(train_main, ["--from-cache", str(store), "--tasks", "rte", "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "no task rte" in missing.output
    invoke(train_main, ["--from-cache", store, "--tasks", "cola", "--epochs", "1", "--hidden", "8", "--out", tmp_path,
                        "--quiet"])
    metrics = json.loads(next((tmp_path / f"{store.parent.name}-cola").glob("*/metrics.json")).read_text())
    assert metrics["metric"] == "matthews"
    # a task of the store given as its own folder: the runs are still named after the model, not the store
    invoke(train_main, ["--from-cache", store / "sst2", "--epochs", "1", "--hidden", "8", "--out", tmp_path, "--quiet"])
    assert (tmp_path / f"{store.parent.name}-sst2").is_dir() and not (tmp_path / f"{store.name}-sst2").exists()


def test_multi_task_from_a_store_equals_two_single_caches_and_predicts_every_head(store, singles, tiny_t5, tmp_path):
    common = ["--epochs", "2", "--hidden", "8", "--lr", "3e-3", "--seeds", "1", "--quiet"]
    invoke(train_main, ["--multi-task", "--from-cache", store, "--out", tmp_path / "store", *common])
    invoke(train_main, ["--multi-task", "--from-cache", singles["sst2"], "--from-cache", singles["cola"],
                        "--out", tmp_path / "singles", *common])
    folder = f"{tiny_t5.name}-sst2+cola"
    ours, theirs = (json.loads(next((tmp_path / where / folder).glob("*/metrics.json")).read_text())
                    for where in ("store", "singles"))
    for key in ("validation", "train_loss", "test", "best_validation", "tasks"):
        assert ours[key] == theirs[key], key
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"sentence": "a fine film"}) + "\n")
    checkpoint = next((tmp_path / "store" / folder).glob("*/model.safetensors")).parent
    out = invoke(predict_main, ["--model", tiny_t5, "--checkpoint", checkpoint, "--input", rows, "--output",
                                tmp_path / "predictions.jsonl"])
    assert "1 backbone batch(es), 2 head(s) each" in out  # one backbone pass answers both heads
    answer = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
    assert set(answer["predictions"]) == {"sst2", "cola"}


def test_cache_inspect_lists_the_tasks_and_verifies_them_all(store, tmp_path):
    import shutil

    shown = invoke(inspect_main, [store])
    assert "2 task(s), sst2, cola" in shown and "[cola]" in shown and shown.count("complete") >= 6
    path = tmp_path / "damaged"
    shutil.copytree(store, path)
    shard = sorted((path / "cola" / "train" / "encoder" / "hidden" / "1" / "c").rglob("*"))[-1]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    result = CliRunner().invoke(inspect_main, [str(path), "--verify"])
    assert result.exit_code == 1 and "cola/train/encoder/hidden/1" in result.output


def test_a_projected_store_fits_one_basis_on_every_tasks_rows(tiny_bert, glue_dir, tmp_path):
    """--project K over a store: one basis for its tasks, the PCA of both tasks' train tokens together
    (checked against a full-width float32 store of the same rows), and multi-task READ trains on it."""
    import torch

    from cache_store import CacheReader

    lossless = ["--attention", "heads", "--quantize", "none", "--dtype", "float32"]
    invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path / "full", "rte,mrpc", *lossless))
    invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path / "projected", "rte,mrpc", *lossless, "--project", "8"))
    full, projected = tmp_path / "full" / tiny_bert.name / "rte+mrpc", tmp_path / "projected" / tiny_bert.name / "rte+mrpc"
    records = [CacheReader(projected / task).manifest["projection"] for task in ("rte", "mrpc")]
    assert records[0] == records[1] and records[0]["sample"]["task"] == "rte+mrpc"
    assert records[0]["sample"]["examples"] == 48  # 24 train rows of each
    for layer in (1, 2):
        tokens = torch.cat([CacheReader(full / task).split("train").load(f"encoder/hidden/{layer}") for task in ("rte", "mrpc")])
        centred = tokens.double() - tokens.double().mean(0)
        variances = torch.linalg.eigvalsh(centred.T @ centred / len(tokens))
        expected = float(variances[-8:].sum() / variances.clamp_min(0).sum())
        assert records[0]["explained_variance"][str(layer)] == pytest.approx(expected, abs=1e-4)
    invoke(train_main, ["--multi-task", "--from-cache", projected, "--hidden", "8", "--epochs", "1", "--out",
                        tmp_path / "runs", "--quiet"])
