"""train-side driven as a user would: a small sweep writes every file; bad input is refused in one line."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch
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
    (["--precision", "tf32", "--device", "cpu"], "--precision tf32 is a CUDA matmul mode; on cpu choose fp32 or bf16"),
    (["--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'tf32', 'bf16'"),
])
def test_bad_options_are_one_line_errors(rte_cache, tmp_path, args, message):
    result = CliRunner().invoke(train_main, ["--from-cache", str(rte_cache), "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bf16_autocast_trains_and_predict_side_serves_in_the_same_precision(tiny_t5, glue_dir, make_cache, tmp_path):
    """--precision bf16 on the CPU: a run records its precision, and predict-side, reading it from the
    checkpoint, gives the training's test predictions; fp32 (the CPU default) gives others."""
    from pipeline.glue_data import load_source_splits
    from pipeline.live import Predictor
    from pipeline.splits import make_splits
    from pipeline.tasks import get_task
    from side_train.predict import load_checkpoint, predict

    cache = make_cache(tiny_t5, task="rte", limit=16)
    outputs = {}
    for precision in ("bf16", "fp32"):
        result = CliRunner().invoke(train_main, ["--from-cache", str(cache), "--hidden", "8", "--epochs", "1",
                                                 "--precision", precision, "--out", str(tmp_path / precision), "--quiet"])
        assert result.exit_code == 0, result.output
        (run,) = [p for p in (tmp_path / precision / f"{cache.parent.name}-rte").iterdir() if p.is_dir()]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["precision"] == precision and metrics["device"] == "cpu"
        outputs[precision] = [json.loads(line)["probabilities"] for line in (run / "test_predictions.jsonl").open()]
        if precision == "bf16":
            checkpoint = load_checkpoint(run)
            assert checkpoint.precision == "bf16"
            _, splits = make_splits("rte", load_source_splits(get_task("rte"), glue_dir), 0)
            rows = [{f: row[f] for f in ("sentence1", "sentence2")} for row in splits["test"].rows[:16]]
            served = list(predict(checkpoint, Predictor(str(tiny_t5), checkpoint.manifest, progress=False), rows,
                                  progress=False))
            recorded = {r["example_index"]: r for r in map(json.loads, (run / "test_predictions.jsonl").open())}
            for record, index in zip(served, splits["test"].example_index[:16].tolist()):
                assert record["predictions"]["rte"]["probabilities"] == recorded[index]["probabilities"]
    assert outputs["bf16"] != outputs["fp32"]


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


def test_torchrun_ranks_beyond_the_gpus_are_refused(monkeypatch):
    """Two ranks of torchrun on a one-GPU machine: refused with what to do, not quietly stacked on one GPU."""
    from cache_store import UserError
    from cache_store.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"more ranks on this machine than it has GPUs \(1\).*--nproc-per-node 1"):
        resolve_device("auto")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # sharing one GPU on purpose
