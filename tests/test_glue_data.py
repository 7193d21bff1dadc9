"""The task registry, the tsv loaders and the paper's split protocol, on real GLUE files."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.glue_data import load_source_splits
from pipeline.splits import make_splits
from pipeline.tasks import TASKS, get_task

LOCAL = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "stsb": 5749, "qnli": 8999, "rte": 2490}


def test_registry_holds_the_eight_glue_tasks():
    assert sorted(TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    assert get_task("stsb").is_regression and get_task("mnli").num_labels == 3
    with pytest.raises(KeyError, match="unknown task"):
        get_task("wnli")


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_tsv_loader_reads_real_files(glue_dir, name):
    task = get_task(name)
    source = load_source_splits(task, glue_dir)
    assert len(source["train"]) == LOCAL[name]
    row = source["validation"][0]
    text = task.format(row)
    assert text.startswith(f"{name} ") and all(row[f] for f in task.fields)
    labels = {r["label"] for r in source["train"]}
    if task.is_regression:
        assert min(labels) >= 0 and max(labels) <= 5
    else:
        assert labels == set(range(task.num_labels))


def test_rte_validation_and_test_are_disjoint_halves_of_glue_validation(glue_dir):
    source = load_source_splits(get_task("rte"), glue_dir)
    protocol, splits = make_splits("rte", source, seed=0)
    assert protocol == "halve-validation"
    val, test = splits["validation"], splits["test"]
    assert val.source == test.source == "validation"
    assert not set(val.example_index) & set(test.example_index)
    assert sorted([*val.example_index, *test.example_index]) == list(range(len(source["validation"])))
    assert abs(len(val.rows) - len(test.rows)) <= 1
    assert len(splits["train"].rows) == len(source["train"])
    _, again = make_splits("rte", source, seed=0)
    _, other = make_splits("rte", source, seed=1)
    assert np.array_equal(again["test"].example_index, test.example_index)
    assert not np.array_equal(other["test"].example_index, test.example_index)


def test_sst2_validation_is_1000_seeded_train_rows(glue_dir):
    source = load_source_splits(get_task("sst2"), glue_dir)
    protocol, splits = make_splits("sst2", source, seed=0)
    assert protocol == "train-holdout-1000"
    val, train = splits["validation"], splits["train"]
    assert val.source == train.source == "train" and len(val.rows) == 1000
    assert not set(val.example_index) & set(train.example_index)
    assert len(val.rows) + len(train.rows) == len(source["train"])
    assert splits["test"].source == "validation" and len(splits["test"].rows) == len(source["validation"])
    assert val.rows[0] is source["train"][val.example_index[0]]


def test_mnli_uses_mismatched_for_validation_and_matched_for_test():
    rows = lambda n: [{"premise": "p", "hypothesis": "h", "label": 0}] * n  # noqa: E731
    _, splits = make_splits("mnli", {"train": rows(20), "validation_matched": rows(5),
                                     "validation_mismatched": rows(7)}, seed=0)
    assert (splits["validation"].source, len(splits["validation"].rows)) == ("validation_mismatched", 7)
    assert (splits["test"].source, len(splits["test"].rows)) == ("validation_matched", 5)


@pytest.mark.parametrize("content, message", [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "label 'maybe' is not one of entailment"),
    ("index\tsentence1\tlabel\n0\ta\tentailment\n", "header lacks column"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\n", "2 columns"),
    ("index\tsentence1\tsentence2\tlabel\n", "split is empty"),
])
def test_malformed_files_are_named(tmp_path, content, message):
    (tmp_path / "RTE").mkdir()
    good = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    (tmp_path / "RTE" / "train.tsv").write_text(content)
    (tmp_path / "RTE" / "dev.tsv").write_text(good)
    with pytest.raises(InputError, match=message):
        load_source_splits(get_task("rte"), tmp_path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="missing data file .*RTE/train.tsv"):
        load_source_splits(get_task("rte"), tmp_path)
