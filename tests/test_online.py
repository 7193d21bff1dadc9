"""From-cache training against the backbone run live (`train-side --online`): the same losses and metrics."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cache_store import ActivationSource, CacheReader
from pipeline.config import LOSSLESS, CacheConfig
from pipeline.job import run as cache_run
from pipeline.live import open_online
from side_train.cli import main as train_main
from side_train.config import RunConfig
from side_train.train import train


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_float32_cache_and_online_training_agree(tiny_t5, glue_dir, tmp_path, cell):
    config = CacheConfig(task="rte", model=str(tiny_t5), data_dir=glue_dir, out=tmp_path, limit=24, dtype="float32",
                         **LOSSLESS)
    cache_run(config, progress=False)
    cache = CacheReader(config.cache_dir)
    run = RunConfig(cell=cell, width=8, lr=3e-3, epochs=3, patience=3, batch_size=8)
    quiet = dict(progress=False, log=lambda line: None)
    (cached,) = train(config.cache_dir, [run], tmp_path / "cached", **quiet)
    source = open_online(str(tiny_t5), "rte", data_dir=glue_dir, limit=24)
    for kind in (cache, source):  # one interface, stage two's only view of either
        assert isinstance(kind, ActivationSource) and kind.live == (kind is source)
    (online,) = train(source, [run], tmp_path / "online", **quiet)
    for a, b in zip(cached["train_loss"], online["train_loss"]):
        assert abs(a - b) <= 1e-4 * abs(b), (cached["train_loss"], online["train_loss"])
    assert cached["validation"] == online["validation"] and cached["test"] == online["test"]
    rows = [[json.loads(line) for line in (tmp_path / kind / run.name / "test_predictions.jsonl").open()]
            for kind in ("cached", "online")]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_online_command_line(tiny_t5, glue_dir, tmp_path):
    result = CliRunner().invoke(train_main, ["--online", "--model", str(tiny_t5), "--task", "rte", "--data-dir",
                                             str(glue_dir), "--limit", "12", "--hidden", "8", "--epochs", "1",
                                             "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"online-{tiny_t5.name}-rte" / "summary.csv").is_file()
    both = CliRunner().invoke(train_main, ["--online", "--from-cache", str(tmp_path), "--out", str(tmp_path)])
    assert both.exit_code == 2 and "either --from-cache" in both.output
