"""A user's own labelled rows as a task: `cache-activations --task NAME --data FILE ...`.

    --data FILE                      one file: the seeded protocol (pipeline.splits) carves validation
                                     and test out of it
    --data train=A --data validation=B [--data test=C]
                                     the files given; without a test file the protocol makes one
    --data HUB_ID                    a Hugging Face dataset (its train, validation and test splits)

Files are CSV, TSV, JSON lines (or a JSON array) or Parquet, by their suffix. The task is described on
the command line: `--text-fields` (one column, or two for a pair), `--label-field`, `--metric` and
`--labels`; or in a task file, `--task-file FILE` (TOML, or JSON with the same keys), whose values
the command line overrides and whose data paths are relative to the file:

    name = "reviews"                       # --task
    text_fields = ["title", "body"]        # --text-fields
    label_field = "stars"                  # --label-field
    metric = "accuracy"                    # --metric
    labels = ["bad", "good"]               # --labels
    data = "reviews.csv"                   # --data FILE, or a table:
    # [data]
    # train = "train.csv"
    # validation = "dev.csv"
 Classification labels may be strings or numbers; they map to indices in the order of
`--labels` (default: train's values, sorted), and those names are also T5's label words. The manifest
records the task (its fields, template, label names and metric), so predict-side and multi-task
training rebuild it from the cache, not from the GLUE registry.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from cache_store.format import METRIC_NAMES

from .errors import InputError
from .glue_data import Rows
from .tasks import TaskSpec

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DATA_SPLITS = ("train", "validation", "test")
REGRESSION_METRICS = ("pearson_spearman",)

csv.field_size_limit(sys.maxsize)


TASK_FILE_KEYS = ("name", "data", "text_fields", "label_field", "metric", "labels")


def read_task_file(path: str | Path) -> dict:
    """A task file's values by TASK_FILE_KEYS: data as --data values, lists as tuples. One line for a file
    that cannot be read, does not parse, or holds another key or a value of the wrong kind."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--task-file {path}: {exc.strerror}") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"--task-file {path}: not {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({exc})") from None
    if not isinstance(values, dict):
        raise InputError(f"--task-file {path}: expected a table of {', '.join(TASK_FILE_KEYS)}")
    unknown = sorted(set(values) - set(TASK_FILE_KEYS))
    if unknown:
        raise InputError(f"--task-file {path}: unknown key(s) {', '.join(unknown)}; it takes {', '.join(TASK_FILE_KEYS)}")

    def local(where: str) -> str:  # a file beside the task file; a hub id stays as it is
        beside = path.parent / where
        return str(beside) if not Path(where).is_absolute() and (beside.exists() or Path(where).suffix) else where

    out = {}
    for key, value in values.items():
        if key == "data":
            if isinstance(value, str):
                value = (local(value),)
            elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
                value = tuple(f"{split}={local(where)}" for split, where in value.items())
            else:
                raise InputError(f"--task-file {path}: data is a file, a hub id, or a table of split = file")
        elif key in ("text_fields", "labels"):
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
                raise InputError(f"--task-file {path}: {key} is a list of names")
            value = tuple(str(v) for v in value)
        elif not isinstance(value, str):
            raise InputError(f"--task-file {path}: {key} is a string, got {value!r}")
        out[key] = value
    return out


def parse_data(values: tuple[str, ...]) -> dict[str, str]:
    """--data values -> {source split: file or hub id}: one bare value is train (or a hub id)."""
    if len(values) == 1 and "=" not in values[0]:
        return {"train": values[0]}
    out = {}
    for value in values:
        split, sep, where = value.partition("=")
        if not sep or split not in DATA_SPLITS:
            raise InputError(f"--data {value}: give one file, or split=FILE for each of {', '.join(DATA_SPLITS)}")
        if split in out:
            raise InputError(f"--data gives the {split} split twice")
        out[split] = where
    if "train" not in out:
        raise InputError("--data needs a train file (train=FILE)")
    return out


def read_rows(where: str) -> Rows:
    """Every row of one file as a dict of its columns, or of a hub dataset's splits (see load_rows)."""
    path = Path(where)
    kind = SUFFIXES.get(path.suffix.lower())
    if not path.is_file():
        raise InputError(f"--data {where}: no such file")
    if kind is None:
        raise InputError(f"--data {where}: unknown file type; use .csv, .tsv, .jsonl, .json or .parquet")
    if kind in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="," if kind == "csv" else "\t"))
    elif kind == "json":
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"--data {where}: not JSON lines ({exc.msg} at line {exc.lineno})") from None
    else:
        try:
            import pyarrow.parquet
        except ImportError:
            raise InputError(f"--data {where}: Parquet needs pyarrow (pip install -e \".[hub]\")") from None
        rows = pyarrow.parquet.read_table(path).to_pylist()
    if not rows:
        raise InputError(f"--data {where}: the file has no rows")
    return rows


def load_rows(data: dict[str, str]) -> dict[str, Rows]:
    """{source split: raw rows}: files, or a hub dataset's splits."""
    train = data["train"]
    if len(data) == 1 and not Path(train).exists() and Path(train).suffix.lower() not in SUFFIXES:
        return _hub_rows(train)
    return {split: read_rows(where) for split, where in data.items()}


def _hub_rows(dataset: str) -> dict[str, Rows]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"--data {dataset}: no such file; a Hugging Face dataset needs the `hub` extra "
                         "(pip install -e \".[hub]\")") from None
    try:
        loaded = datasets.load_dataset(dataset)
    except Exception as exc:
        raise InputError(f"--data {dataset}: no such file, and the Hugging Face hub could not load it "
                         f"({type(exc).__name__})") from None
    return {split: loaded[split].to_list() for split in DATA_SPLITS if split in loaded}


def user_task(name: str, raw: dict[str, Rows], text_fields: tuple[str, ...], label_field: str,
              metric: str | None, labels: tuple[str, ...]) -> tuple[TaskSpec, dict[str, Rows]]:
    """The task the rows describe and its rows as the GLUE loaders give them: the text fields plus
    `label`, an index (classification) or a float (regression). Refuses, in one line, a missing column,
    a label of another split that train never had, and a regression label that is not a number."""
    columns = list(raw["train"][0])
    fields = text_fields or _default_fields(columns)
    if not 1 <= len(fields) <= 2:
        raise InputError(f"--text-fields takes one column or two (a pair), got {', '.join(fields)}")
    metric = metric or "accuracy"
    if metric not in METRIC_NAMES:
        raise InputError(f"--metric must be one of {', '.join(METRIC_NAMES)}, got {metric!r}")
    regression = metric in REGRESSION_METRICS
    for split, rows in raw.items():
        for number, row in enumerate(rows, 1):
            missing = [c for c in (*fields, label_field) if c not in row or row[c] is None]
            if missing:
                raise InputError(f"--data {split} row {number} has no {', '.join(missing)} (its columns: "
                                 f"{', '.join(map(str, row))}); name the columns with --text-fields and --label-field")
    if regression:
        if labels:
            raise InputError("--labels names classes; a regression task (--metric pearson_spearman) has none")
        words = ()
    else:
        found = sorted({str(row[label_field]) for row in raw["train"]}, key=_label_order)
        words = labels or tuple(found)
        if len(words) < 2:
            raise InputError(f"--data train has one label ({words[0]}); classification needs two or more")
        for split, rows in raw.items():
            unknown = sorted({str(row[label_field]) for row in rows} - set(words), key=_label_order)
            if unknown:
                where = "train never had" if not labels else "--labels does not name"
                raise InputError(f"--data {split} has label(s) {', '.join(unknown[:5])} that {where}")
    template = f"{name} " + " ".join(f"{f}: {{{f}}}" for f in fields)
    task = TaskSpec(name, "", tuple(fields), template, tuple(words), metric, source_splits=tuple(raw))
    index = {word: i for i, word in enumerate(words)}
    out = {}
    for split, rows in raw.items():
        out[split] = [{**{f: str(row[f]) for f in fields}, "label": _regression_label(row[label_field], split, n)
                       if regression else index[str(row[label_field])]} for n, row in enumerate(rows, 1)]
    return task, out


def _default_fields(columns: list[str]) -> tuple[str, ...]:
    for choice in (("text",), ("sentence",), ("sentence1", "sentence2"), ("text1", "text2")):
        if all(c in columns for c in choice):
            return choice
    raise InputError(f"--data has no text, sentence or sentence1/sentence2 column (its columns: "
                     f"{', '.join(columns)}); name the text column(s) with --text-fields")


def _label_order(value: str):
    """Numbers in numeric order, before any other labels in text order."""
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value


def _regression_label(value, split: str, number: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"--data {split} row {number}: label {value!r} is not a number (a regression "
                         "task, --metric pearson_spearman)") from None
