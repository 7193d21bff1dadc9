"""Multi-task READ (one network, one head per task, caches that must agree) and predict-side (one backbone
pass per input for any number of heads; on a cache's test examples, training's recorded predictions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.config import LOSSLESS, CacheConfig
from pipeline.glue_data import load_source_splits
from pipeline.job import run as cache_run
from pipeline.live import Predictor
from pipeline.splits import make_splits
from pipeline.tasks import get_task
from side_train.cli import main as train_main
from side_train.cli import predict as predict_main
from side_train.predict import load_checkpoint, predict
from side_train.tasks import task_weights

LIMIT = 20


@pytest.fixture(scope="module")
def caches(tiny_t5, make_cache) -> dict[str, Path]:
    return {task: make_cache(tiny_t5, task=task, limit=LIMIT, batch_size=8) for task in ("rte", "mrpc", "stsb")}


@pytest.fixture(scope="module")
def multi_run(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(train_main, [
        "--multi-task", "--from-cache", str(caches["rte"]), "--from-cache", str(caches["stsb"]),
        "--hidden", "8", "--lr", "3e-3,1e-3", "--epochs", "2", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out / f"{caches['rte'].parent.name}-rte+stsb"


def test_multi_task_sweep_writes_one_entry_per_task(multi_run):
    assert (multi_run / "summary.csv").is_file()
    metrics = json.loads((multi_run / "gru-r8-lr0.003-s0" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"rte", "stsb"}
    rte, stsb = metrics["tasks"]["rte"], metrics["tasks"]["stsb"]
    assert rte["metric"] == "accuracy" and stsb["metric"] == "pearson_spearman"
    # early stopping follows the mean of the tasks' metrics
    for epoch, value in enumerate(metrics["validation"]):
        assert value == pytest.approx((rte["validation"][epoch] + stsb["validation"][epoch]) / 2)
    assert metrics["test"] == pytest.approx((rte["test"] + stsb["test"]) / 2)
    rows = [json.loads(line) for line in (multi_run / "gru-r8-lr0.003-s0" / "test_predictions.jsonl").open()]
    assert sorted({r["task"] for r in rows}) == ["rte", "stsb"] and len(rows) == 2 * LIMIT


def test_multi_task_trains_at_its_own_default_rate_unless_given(caches, tmp_path):
    result = CliRunner().invoke(train_main, [
        "--multi-task", "--from-cache", str(caches["rte"]), "--from-cache", str(caches["mrpc"]), "--hidden", "8",
        "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["gru-r8-lr0.0003-s0"]


def test_caches_that_disagree_are_refused(caches, small_t5, glue_dir, tmp_path):
    other = CacheConfig(task="mrpc", model=str(small_t5), data_dir=glue_dir, out=tmp_path, limit=8, **LOSSLESS)
    cache_run(other, progress=False)
    result = CliRunner().invoke(train_main, ["--multi-task", "--from-cache", str(caches["rte"]),
                                             "--from-cache", str(other.cache_dir), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cannot share a READ network" in result.output
    assert "backbone.d_model" in result.output and "Traceback" not in result.output
    twice = CliRunner().invoke(train_main, ["--multi-task", "--from-cache", str(caches["rte"]),
                                            "--from-cache", str(caches["rte"]), "--out", str(tmp_path)])
    assert twice.exit_code == 2 and "given twice" in twice.output
    without = CliRunner().invoke(train_main, ["--from-cache", str(caches["rte"]), "--from-cache", str(caches["mrpc"])])
    assert without.exit_code == 2 and "--multi-task" in without.output


def test_task_sampling_weights():
    assert task_weights({"a": 30, "b": 10}, "proportional", 2.0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert task_weights({"a": 36, "b": 4}, "temperature", 2.0) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(ValueError, match="--temperature"):
        task_weights({"a": 1}, "temperature", 0)


def _test_rows(task_name: str, glue_dir: Path, with_index: bool = False):
    """The cache's test split as raw rows, in the split's order (what a user would feed predict-side),
    and optionally each row's index in its GLUE source split."""
    task = get_task(task_name)
    _, splits = make_splits(task.name, load_source_splits(task, glue_dir), 0)
    rows = [{f: row[f] for f in task.fields} for row in splits["test"].rows[:LIMIT]]
    return (rows, splits["test"].example_index[:LIMIT].tolist()) if with_index else rows


def test_predictions_equal_training_test_predictions_exactly(multi_run, tiny_t5, glue_dir):
    run = multi_run / "gru-r8-lr0.003-s0"
    checkpoint = load_checkpoint(run)
    predictor = Predictor(str(tiny_t5), checkpoint.manifest)
    recorded = [json.loads(line) for line in (run / "test_predictions.jsonl").open()]
    for task in ("rte", "stsb"):
        rows, source_index = _test_rows(task, glue_dir, with_index=True)
        out = list(predict(checkpoint, predictor, [{**r, "task": task} for r in rows], progress=False))
        expected = {r["example_index"]: r for r in recorded if r["task"] == task}
        assert len(out) == len(expected) == LIMIT
        for record, index in zip(out, source_index):
            mine, theirs = record["predictions"][task], expected[index]
            assert mine["prediction"] == theirs["prediction"]  # bit for bit, the score included
            assert mine.get("probabilities") == theirs.get("probabilities")


def test_one_backbone_pass_per_input_for_every_head(multi_run, tiny_t5, glue_dir, tmp_path):
    run = multi_run / "gru-r8-lr0.003-s0"
    checkpoint = load_checkpoint(run)
    predictor = Predictor(str(tiny_t5), checkpoint.manifest)
    rows = _test_rows("rte", glue_dir)[:11]
    out = list(predict(checkpoint, predictor, rows, batch_size=4, progress=False))
    assert predictor.examples_forwarded == len(rows)  # each input through the backbone exactly once
    assert predictor.forward_passes == 2  # the cache's batches of 8 (8 + 3), whatever READ's batch
    assert all(set(r["predictions"]) == {"rte", "stsb"} for r in out)  # both heads read every pass
    assert all(r["predictions"]["rte"]["label"] in ("entailment", "not_entailment") for r in out)
    assert all(isinstance(r["predictions"]["stsb"]["prediction"], float) for r in out)


def test_predict_side_command_line_reads_jsonl_and_tsv(multi_run, tiny_t5, glue_dir, tmp_path):
    run = multi_run / "gru-r8-lr0.003-s0"
    rows = _test_rows("rte", glue_dir)[:5]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(predict_main, ["--model", str(tiny_t5), "--checkpoint", str(run), "--input",
                                               str(jsonl), "--output", str(tmp_path / "out.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    from_file = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
    assert [r["index"] for r in from_file] == list(range(5)) and all(r["task"] == "rte" for r in from_file)
    tsv = "sentence1\tsentence2\n" + "".join(f"{r['sentence1']}\t{r['sentence2']}\n" for r in rows)
    piped = CliRunner().invoke(predict_main, ["--model", str(tiny_t5), "--checkpoint", str(run), "--quiet"], input=tsv)
    assert piped.exit_code == 0, piped.output
    from_stdin = [json.loads(line) for line in piped.stdout.splitlines() if line.startswith("{")]
    assert from_stdin == from_file


@pytest.mark.parametrize("text, message", [
    ("{not json}\n", "line 1 is not JSON"),
    ('{"sentence1": "a"}\n', "lacks sentence2"),
    ('{"task": "cola", "sentence": "a"}\n', "asks for task 'cola'"),
    ("", "has no inputs"),
])
def test_predict_side_bad_input_is_one_line(multi_run, tiny_t5, text, message):
    run = multi_run / "gru-r8-lr0.003-s0"
    result = CliRunner().invoke(predict_main, ["--model", str(tiny_t5), "--checkpoint", str(run)], input=text)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_predict_side_refuses_another_backbone(multi_run, small_t5, tmp_path):
    result = CliRunner().invoke(predict_main, ["--model", str(small_t5), "--checkpoint",
                                               str(multi_run / "gru-r8-lr0.003-s0")], input='{"sentence1": "a"}\n')
    assert result.exit_code == 2 and "not the backbone this READ model was trained on" in result.output
    missing = CliRunner().invoke(predict_main, ["--model", str(small_t5), "--checkpoint", str(tmp_path)])
    assert missing.exit_code == 2 and "no READ checkpoint" in missing.output
