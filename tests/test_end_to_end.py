"""Slow tier: whole GLUE tasks through the real command line, then verified and read back."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cache_store import CacheReader, verify_cache
from cache_store.cli import main as inspect_main
from pipeline.cli import main as cache_main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task, train, validation, test", [
    ("mrpc", 3668, 204, 204),   # small task: GLUE validation halved into validation and test
    ("stsb", 5749, 750, 750),   # regression
])
def test_whole_task_cached_verified_and_read(tiny_t5, glue_dir, tmp_path, task, train, validation, test):
    result = CliRunner().invoke(cache_main, ["--task", task, "--model", str(tiny_t5), "--data-dir", str(glue_dir),
                                             "--out", str(tmp_path), "--batch-size", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    path = tmp_path / tiny_t5.name / task
    assert verify_cache(path) == []
    reader = CacheReader(path, expect={"task.name": task, "split_protocol.name": "halve-validation"})
    counts = {name: reader.split(name).n_examples for name in reader.split_names}
    assert counts == {"train": train, "validation": validation, "test": test}
    split = reader.split("test")
    assert sorted(split.lengths, reverse=True) == list(split.lengths)
    batches = list(split.iter_batches(64, ["encoder/hidden/2"]))
    assert sum(b.arrays["encoder/hidden/2"].shape[0] for b in batches) == int(split.lengths.sum())
    assert CliRunner().invoke(inspect_main, [str(path), "--verify"]).exit_code == 0


def test_sst2_uses_a_train_holdout(tiny_bert, glue_dir, tmp_path):
    result = CliRunner().invoke(cache_main, ["--task", "sst2", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                                             "--out", str(tmp_path), "--limit", "300", "--quiet"])
    assert result.exit_code == 0, result.output
    reader = CacheReader(tmp_path / tiny_bert.name / "sst2", expect={"split_protocol.name": "train-holdout-1000"})
    train, validation = reader.split("train"), reader.split("validation")
    assert reader.split("test").cache.manifest["split_protocol"]["sources"]["test"] == "validation"
    assert not set(train.example_index) & set(validation.example_index)
    m = reader.manifest  # cache-activations' default storage: the compact choice docs/storage.md measures
    assert (m["attention_topk"]["k"], m["quantize"], m["projection"]) == (4, ["attention", "hidden6"], None)
    assert (m["storage"]["compressor"]["cname"], m["storage"]["compressor"]["clevel"]) == ("zstd", 1)
    assert m["layers"]["encoder"] == list(range(1, m["backbone"]["n_layers"] + 1))


def test_read_learns_sst2_from_a_random_weight_t5(small_t5, glue_dir, tmp_path):
    """Real SST-2 rows, a small random-weight T5: validation accuracy ends clearly above the majority rate."""
    import numpy as np

    from side_train.config import RunConfig
    from side_train.train import train

    result = CliRunner().invoke(cache_main, ["--task", "sst2", "--model", str(small_t5), "--data-dir", str(glue_dir),
                                             "--out", str(tmp_path), "--limit", "8000", "--quiet"])
    assert result.exit_code == 0, result.output
    path = tmp_path / small_t5.name / "sst2"
    labels = CacheReader(path).split("validation").labels
    majority = 100 * max(np.mean(labels), 1 - np.mean(labels))
    (metrics,) = train(path, [RunConfig(cell="gru", width=64, lr=1e-3, epochs=6, patience=6)], tmp_path / "runs",
                       progress=False, log=lambda line: None)
    assert metrics["best_validation"] > majority + 5, (metrics["validation"], majority)
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
