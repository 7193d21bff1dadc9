"""A user's own labelled files (`cache-activations --data`): cached, trained and served end to end without
the GLUE registry, split by the seeded protocol when only train is given, and every bad input refused in
one line with nothing written."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_store import CacheReader
from pipeline.cli import main as cache_main
from pipeline.glue_data import load_source_splits
from pipeline.tasks import get_task
from side_train.cli import main as train_main
from side_train.cli import predict as predict_main

SMALL = ["--batch-size", "8", "--quiet"]
WORDS = {0: "different", 1: "same"}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def pair_files(glue_dir, tmp_path_factory) -> dict[str, Path]:
    """MRPC's rows as a user's CSV files: two text columns of their own names, string labels."""
    folder = tmp_path_factory.mktemp("user-csv")
    source = load_source_splits(get_task("mrpc"), glue_dir)
    files = {}
    for split, count in (("train", 48), ("validation", 16)):
        rows = [{"first": r["sentence1"], "second": r["sentence2"], "verdict": WORDS[r["label"]]}
                for r in source[split][:count]]
        files[split] = _write_csv(folder / f"{split}.csv", rows)
    return files


def _cache(model: Path, out: Path, *args: str):
    return CliRunner().invoke(cache_main, ["--model", str(model), "--out", str(out), *args, *SMALL])


def test_a_csv_of_pairs_with_string_labels_caches_trains_and_predicts(tiny_bert, pair_files, tmp_path):
    result = _cache(tiny_bert, tmp_path / "caches", "--task", "paraphrase", "--data", f"train={pair_files['train']}",
                    "--data", f"validation={pair_files['validation']}", "--text-fields", "first,second",
                    "--label-field", "verdict")
    assert result.exit_code == 0, result.output
    cache = CacheReader(tmp_path / "caches" / tiny_bert.name / "paraphrase")
    task = cache.manifest["task"]
    assert task["fields"] == ["first", "second"] and task["label_words"] == ["different", "same"]
    assert cache.manifest["split_protocol"]["name"] == "halve-validation"
    assert {n: cache.split(n).n_examples for n in ("train", "validation", "test")} == \
        {"train": 48, "validation": 8, "test": 8}
    labels = [r["verdict"] for r in csv.DictReader(pair_files["train"].open())]
    assert cache.split("train").labels.tolist() == [int(v == "same") for v in
                                                     [labels[i] for i in cache.split("train").example_index]]
    trained = CliRunner().invoke(train_main, ["--from-cache", str(cache.path), "--out", str(tmp_path / "runs"),
                                              "--hidden", "8", "--epochs", "2", "--quiet"])
    assert trained.exit_code == 0, trained.output
    (run,) = [p for p in (tmp_path / "runs" / f"{tiny_bert.name}-paraphrase").iterdir() if p.is_dir()]
    recorded = {r["example_index"]: r for r in map(json.loads, (run / "test_predictions.jsonl").open())}
    # The test rows are validation.csv's, as predict-side is given them: the user's own column names.
    rows = list(csv.DictReader(pair_files["validation"].open()))
    test = cache.split("test")
    inputs = "".join(json.dumps({"first": rows[i]["first"], "second": rows[i]["second"]}) + "\n"
                     for i in test.example_index)
    served = CliRunner().invoke(predict_main, ["--model", str(tiny_bert), "--checkpoint", str(run), "--quiet"],
                                input=inputs)
    assert served.exit_code == 0, served.output
    out = [json.loads(line) for line in served.stdout.splitlines() if line.startswith("{")]
    assert len(out) == test.n_examples
    for record, index in zip(out, test.example_index.tolist()):
        mine = record["predictions"]["paraphrase"]
        assert mine["prediction"] == recorded[index]["prediction"] and mine["label"] in WORDS.values()
        assert mine["probabilities"] == recorded[index]["probabilities"]


def test_a_jsonl_regression_task_alone_is_split_by_the_seeded_protocol(tiny_t5, glue_dir, tmp_path):
    rows = [{"text": r["sentence1"], "score": r["label"]} for r in load_source_splits(get_task("stsb"), glue_dir)["train"][:50]]
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--task", "similarity", "--data", str(data), "--label-field", "score", "--metric", "pearson_spearman"]
    result = _cache(tiny_t5, tmp_path / "caches", *args)
    assert result.exit_code == 0, result.output
    cache = CacheReader(tmp_path / "caches" / tiny_t5.name / "similarity")
    assert cache.manifest["split_protocol"]["name"] == "train-holdout-validation-test"
    assert cache.manifest["task"]["label_words"] == [] and cache.manifest["task"]["template"] == "similarity text: {text}"
    splits = {n: cache.split(n) for n in ("train", "validation", "test")}
    assert [s.n_examples for s in splits.values()] == [40, 5, 5]
    held = [set(s.example_index.tolist()) for s in splits.values()]
    assert set.union(*held) == set(range(50)) and sum(map(len, held)) == 50  # every row once
    for s in splits.values():
        assert s.labels.tolist() == pytest.approx([rows[i]["score"] for i in s.example_index])
    again = _cache(tiny_t5, tmp_path / "again", *args)
    assert again.exit_code == 0 and [CacheReader(tmp_path / "again" / tiny_t5.name / "similarity").split(n)
                                     .example_index.tolist() for n in splits] == \
        [s.example_index.tolist() for s in splits.values()]  # seeded
    trained = CliRunner().invoke(train_main, ["--from-cache", str(cache.path), "--out", str(tmp_path / "runs"),
                                              "--hidden", "8", "--epochs", "1", "--quiet"])
    assert trained.exit_code == 0, trained.output


@pytest.mark.parametrize("case, message", [
    ("missing column", "has no verdict"),
    ("unseen label", "has label(s) maybe that train never had"),
    ("empty file", "has no rows"),
    ("no such file", "no such file"),
    ("unknown suffix", "unknown file type"),
    ("one label", "classification needs two or more"),
    ("bad split", "give one file, or split=FILE"),
    ("without --data", "describe --data; give --data too"),
    ("hub id offline", "--data nobody/no-such-dataset: no such file"),
])
def test_bad_user_data_is_one_line_and_writes_nothing(case, message, tiny_bert, pair_files, tmp_path):
    train, validation = pair_files["train"], pair_files["validation"]
    rows = list(csv.DictReader(validation.open()))
    data = [f"train={train}", f"validation={validation}"]
    if case == "missing column":
        data = [str(_write_csv(tmp_path / "x.csv", [{"first": r["first"], "second": r["second"]} for r in rows]))]
    elif case == "unseen label":
        data[1] = f"validation={_write_csv(tmp_path / 'v.csv', [*rows, {**rows[0], 'verdict': 'maybe'}])}"
    elif case == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        data = [str(tmp_path / "empty.jsonl")]
    elif case == "no such file":
        data = [f"train={tmp_path / 'absent.csv'}", data[1]]
    elif case == "unknown suffix":
        (tmp_path / "rows.xlsx").write_text("x")
        data = [str(tmp_path / "rows.xlsx")]
    elif case == "one label":
        data = [str(_write_csv(tmp_path / "one.csv", [{**r, "verdict": "same"} for r in rows]))]
    elif case == "hub id offline":  # not a file: a hub dataset, which offline (or without `hub`) is refused
        data = ["nobody/no-such-dataset"]
    elif case == "bad split":
        data = [f"dev={validation}", f"train={train}"]
    args = ["--task", "paraphrase", "--text-fields", "first,second", "--label-field", "verdict"]
    for value in ([] if case == "without --data" else data):
        args += ["--data", value]
    if case == "without --data":
        args[1] = "rte"
    result = _cache(tiny_bert, tmp_path / "caches", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "caches").exists()


def test_a_task_file_describes_the_task_and_the_command_line_overrides_it(tiny_bert, pair_files, tmp_path):
    folder = pair_files["train"].parent
    (tmp_path / "paraphrase.toml").write_text(
        'name = "paraphrase"\ntext_fields = ["first", "second"]\nlabel_field = "verdict"\n'
        f'labels = ["same", "different"]\n[data]\ntrain = "{folder / "train.csv"}"\nvalidation = "{folder / "validation.csv"}"\n')
    result = _cache(tiny_bert, tmp_path / "caches", "--task-file", str(tmp_path / "paraphrase.toml"))
    assert result.exit_code == 0, result.output
    task = CacheReader(tmp_path / "caches" / tiny_bert.name / "paraphrase").manifest["task"]
    assert task["fields"] == ["first", "second"] and task["label_words"] == ["same", "different"]
    # JSON, data beside the file, and the command line's --task and --labels win over the file's
    (folder / "task.json").write_text(json.dumps({"name": "ignored", "data": {"train": "train.csv", "validation": "validation.csv"},
                                                  "text_fields": ["first", "second"], "label_field": "verdict"}))
    result = _cache(tiny_bert, tmp_path / "caches", "--task-file", str(folder / "task.json"), "--task", "mine",
                    "--labels", "different,same", "--splits", "validation")
    assert result.exit_code == 0, result.output
    task = CacheReader(tmp_path / "caches" / tiny_bert.name / "mine").manifest["task"]
    assert task["name"] == "mine" and task["label_words"] == ["different", "same"]


@pytest.mark.parametrize("text, message", [
    ('name = "x"\ncolour = "red"', "unknown key(s) colour"),
    ('name = "x"\ndata = 3', "data is a file, a hub id, or a table"),
    ('name = "x"\n[data', "not TOML"),
    ('name = "x"', "has no data"),
    ('data = "rows.csv"', "give --task"),
])
def test_a_bad_task_file_is_one_line_and_writes_nothing(text, message, tiny_bert, tmp_path):
    (tmp_path / "task.toml").write_text(text)
    result = _cache(tiny_bert, tmp_path / "caches", "--task-file", str(tmp_path / "task.toml"))
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "caches").exists()
