"""train-side driven as a user would: a small sweep writes every file; bad input is refused in one line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

from side_train.cli import main as train_main
from side_train.metrics import score


@pytest.fixture(scope="module")
def rte_cache(tiny_t5, make_cache):
    return make_cache(tiny_t5, task="rte", limit=24)


def test_sweep_writes_metrics_checkpoints_predictions_and_plots(rte_cache, tmp_path):
    result = CliRunner().invoke(train_main, [
        "--from-cache", str(rte_cache), "--rnn", "gru,lstm", "--hidden", "8", "--lr", "1e-3,3e-3",
        "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "randomly initialised" not in result.output  # the fixture model counts as pretrained weights
    folder = tmp_path / f"{rte_cache.parent.name}-rte"
    with open(folder / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["cell"] for r in rows} == {"gru", "lstm"}
    validations = [float(r["best_validation"]) for r in rows]
    assert validations == sorted(validations, reverse=True)
    assert (folder / "summary.md").read_text().count("\n| ") == 6  # header, rule, 4 runs
    for name in ("learning_curves.png", "sweep.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    run = folder / rows[0]["name"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"validation", "test", "train_loss", "config", "parameters", "seconds", "peak_memory_bytes"} <= set(metrics)
    assert len(metrics["train_loss"]) == len(metrics["validation"]) == metrics["epochs_run"] <= 2
    state = load_file(run / "model.safetensors")
    assert sum(v.numel() for v in state.values()) == metrics["parameters"]
    predictions = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 24 and all(abs(sum(p["probabilities"]) - 1) < 1e-5 for p in predictions)
    accuracy = 100 * np.mean([p["prediction"] == p["label"] for p in predictions])
    assert accuracy == pytest.approx(metrics["test"])


@pytest.mark.parametrize("args, message", [
    (["--rnn", "transformer"], "--rnn must be drawn from"),
    (["--hidden", "0"], "--hidden must be positive"),
    (["--lr", "fast"], "--lr takes comma-separated values"),
])
def test_bad_options_are_one_line_errors(rte_cache, tmp_path, args, message):
    result = CliRunner().invoke(train_main, ["--from-cache", str(rte_cache), "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_missing_cache_is_refused(tmp_path):
    result = CliRunner().invoke(train_main, ["--from-cache", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no cache at" in result.output


def test_metrics_are_scikit_learn_and_scipy_in_points():
    labels, predictions = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    assert score("accuracy", labels, predictions) == pytest.approx(80.0)
    assert score("f1_accuracy", labels, predictions) == pytest.approx(50 * (f1_score(labels, predictions) + 0.8))
    y, p = np.array([0.0, 1.5, 3.0, 4.5]), np.array([0.2, 1.0, 3.5, 4.0])
    assert score("pearson_spearman", y, p) == pytest.approx(50 * (pearsonr(y, p)[0] + spearmanr(y, p)[0]))


def test_a_small_memory_budget_streams_the_train_split(rte_cache, tmp_path):
    result = CliRunner().invoke(train_main, ["--from-cache", str(rte_cache), "--hidden", "8", "--epochs", "1",
                                             "--memory-gb", "0.000001", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "streaming train" in result.output


def test_the_paper_preset_turns_every_option_off_but_those_given(rte_cache, tmp_path, monkeypatch):
    import side_train.config as config

    monkeypatch.setitem(config.PRESETS, "paper", {**config.PRESETS["paper"]})
    seen = []
    monkeypatch.setattr("side_train.train.train", lambda source, configs, *a, **k: seen.extend(configs) or [])
    monkeypatch.setattr("side_train.report.write_summary", lambda results, folder: [])
    args = ["--from-cache", str(rte_cache), "--out", str(tmp_path), "--quiet"]
    assert CliRunner().invoke(train_main, [*args, "--cutoff", "0.2", "--down-norm"]).exit_code == 0
    assert seen[-1].cutoff == 0.2 and seen[-1].down_norm
    assert not seen[-1].recurrence and seen[-1].name == "gru-r144-lr0.001-s0"  # the default: one set per layer
    result = CliRunner().invoke(train_main, [*args, "--preset", "paper", "--noise", "0.1"])
    assert result.exit_code == 0, result.output
    paper = seen[-1]
    assert paper.noise == 0.1  # given on the command line: kept
    assert paper.recurrence and paper.name.endswith("-rec")
    assert all(getattr(paper, k) == v for k, v in config.PRESETS["paper"].items() if k != "noise")
    assert CliRunner().invoke(train_main, [*args, "--preset", "paper", "--no-recurrence"]).exit_code == 0
    assert not seen[-1].recurrence and seen[-1].dropout == 0.0


def test_the_side_network_options_reach_the_checkpoint(rte_cache, tmp_path):
    result = CliRunner().invoke(train_main, [
        "--from-cache", str(rte_cache), "--hidden", "8", "--epochs", "1", "--batch-size", "8", "--down-norm",
        "--output-gate", "--token-mix", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    run = next(p for p in (tmp_path / f"{rte_cache.parent.name}-rte").iterdir() if p.is_dir())
    saved = json.loads((run / "config.json").read_text())
    assert saved["read"]["down_norm"] and saved["read"]["output_gate"] and not saved["read"]["layer_mix"]
    assert saved["read"]["token_mix"]
    assert "gate" in load_file(run / "model.safetensors")
