"""GLUE rows from the Hugging Face hub (`nyu-mll/glue`) or from GLUE's original tsv layout.

Both loaders return the same thing: for each source split, a list of rows, each a dict holding the task's
fields plus `label` (an int class index, or a float for STS-B).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .errors import InputError
from .tasks import TaskSpec

Rows = list[dict]
HUB_DATASET = "nyu-mll/glue"

csv.field_size_limit(sys.maxsize)  # some GLUE sentences exceed csv's 128 kB default


def load_source_splits(task: TaskSpec, data_dir: Path | None) -> dict[str, Rows]:
    rows = _load_tsv(task, Path(data_dir)) if data_dir is not None else _load_hub(task)
    for split, split_rows in rows.items():
        if not split_rows:
            raise InputError(f"{task.name}: the {split} split is empty; check the data files")
    return rows


def _load_hub(task: TaskSpec) -> dict[str, Rows]:
    try:
        import datasets
    except ImportError:
        raise InputError("loading GLUE from the Hugging Face hub needs the `hub` extra (pip install -e \".[hub]\"); "
                         f"or pass --data-dir DIR holding GLUE's tsv files ({task.glue_dir}/train.tsv, ...)") from None
    try:
        loaded = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as exc:  # offline, missing, or a hub error: all need the same fix
        raise InputError(
            f"could not load {HUB_DATASET}/{task.name} from the Hugging Face hub ({type(exc).__name__}); "
            f"offline, pass --data-dir DIR holding GLUE's tsv files ({task.glue_dir}/train.tsv, ...)"
        ) from None
    out = {}
    for split in task.source_splits:
        table = loaded[split]
        labels = table["label"]
        columns = {name: table[name] for name in task.fields}
        out[split] = [
            {**{name: columns[name][i] for name in task.fields},
             "label": float(labels[i]) if task.is_regression else int(labels[i])}
            for i in range(len(table))
        ]
    return out


def _load_tsv(task: TaskSpec, data_dir: Path) -> dict[str, Rows]:
    folder = data_dir / task.glue_dir
    if not data_dir.is_dir():
        raise InputError(f"--data-dir {data_dir} is not a directory; point it at GLUE's data folder")
    files = (("train", "train.tsv"),) + task.tsv.dev_files
    return {split: _read_tsv(task, folder / name) for split, name in files}


def _read_tsv(task: TaskSpec, path: Path) -> Rows:
    if not path.is_file():
        raise InputError(f"missing data file {path}; GLUE's tsv layout puts {task.name} in {path.parent}/")
    layout = task.tsv
    with open(path, encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: MRPC starts with a BOM
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.has_header:
            header = next(reader, None) or []
            missing = [c for c in layout.columns if c not in header]
            if missing:
                raise InputError(f"{path}: header lacks column(s) {missing}; expected GLUE's {task.name} tsv")
            index = [header.index(c) for c in layout.columns]
        else:
            index = list(layout.columns)
        rows = []
        first_line = 2 if layout.has_header else 1
        for line, record in enumerate(reader, start=first_line):
            if not record:
                continue
            if len(record) <= max(index):
                raise InputError(f"{path}:{line}: {len(record)} columns, expected at least {max(index) + 1}")
            values = [record[i] for i in index]
            row = dict(zip(task.fields, values[:-1]))
            row["label"] = _parse_label(task, values[-1], f"{path}:{line}")
            rows.append(row)
    return rows


def _parse_label(task: TaskSpec, text: str, where: str) -> int | float:
    text = text.strip()
    try:
        if task.is_regression:
            return float(text)
        if task.tsv.label_values:
            return task.tsv.label_values.index(text)
        value = int(text)
        if not 0 <= value < task.num_labels:
            raise ValueError
        return value
    except ValueError:
        allowed = task.tsv.label_values or tuple(str(i) for i in range(task.num_labels))
        expected = "a number" if task.is_regression else f"one of {', '.join(allowed)}"
        raise InputError(f"{where}: label {text!r} is not {expected}") from None
