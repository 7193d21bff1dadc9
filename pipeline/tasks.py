"""The GLUE task registry: the only list of registered task names (the CLI's `--task` choices come from
it; a user's own data describes its task on the command line, pipeline/user_data.py).

Each spec says how a row becomes T5 input text, which words name its labels, how the paper scores it,
and where its fields live in Hugging Face `nyu-mll/glue` and in GLUE's original tsv files.
Bump `version` whenever anything that changes cached bytes changes; caches record it, and
`TaskSpec.from_manifest` rebuilds a cache's task from what it recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

from cache_store.format import METRIC_NAMES


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields sit in GLUE's original tsv files."""

    columns: tuple[str | int, ...]  # one per field, then the label: a header name, or an index without a header
    has_header: bool = True
    label_values: tuple[str, ...] = ()  # tsv label strings in label-index order; () = numeric labels
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)  # (source split, file)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    glue_dir: str  # folder name in GLUE's tsv layout, e.g. "RTE"; "" for a user's data
    fields: tuple[str, ...]  # Hugging Face field names, in template order
    template: str  # T5 input; `{field}` placeholders
    label_words: tuple[str, ...]  # T5's own label words in label-index order; () = regression
    metric: str
    tsv: TsvLayout | None = None  # GLUE's tsv files; None for a user's data
    version: int = 1
    source_splits: tuple[str, ...] = ("train", "validation")

    def __post_init__(self):
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}")
        if self.tsv is not None and len(self.tsv.columns) != len(self.fields) + 1:
            raise ValueError(f"task {self.name}: tsv columns must be the fields then the label")
        for name in self.fields:
            if "{" + name + "}" not in self.template:
                raise ValueError(f"task {self.name}: template lacks {{{name}}}")

    @property
    def is_regression(self) -> bool:
        return not self.label_words

    @property
    def num_labels(self) -> int:
        return len(self.label_words) or 1

    def format(self, row: dict) -> str:
        return self.template.format(**{name: row[name] for name in self.fields})

    @classmethod
    def from_manifest(cls, task: dict) -> "TaskSpec":
        """The task a cache recorded (as_manifest): all that tokenizing new rows as the cache did needs."""
        return cls(task["name"], "", tuple(task["fields"]), task["template"], tuple(task["label_words"]),
                   task["metric"], version=task["version"])

    def as_manifest(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "fields": list(self.fields),
            "template": self.template,
            "label_words": list(self.label_words),
            "metric": self.metric,
        }


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name} is registered twice")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


_ENTAIL = ("entailment", "not_entailment")

register_task(TaskSpec(
    "cola", "CoLA", ("sentence",), "cola sentence: {sentence}", ("unacceptable", "acceptable"), "matthews",
    TsvLayout(columns=(3, 1), has_header=False),
))
register_task(TaskSpec(
    "sst2", "SST-2", ("sentence",), "sst2 sentence: {sentence}", ("negative", "positive"), "accuracy",
    TsvLayout(columns=("sentence", "label")),
))
register_task(TaskSpec(
    "mrpc", "MRPC", ("sentence1", "sentence2"), "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    ("not_equivalent", "equivalent"), "f1_accuracy",
    TsvLayout(columns=("#1 String", "#2 String", "Quality")),
))
register_task(TaskSpec(
    "qqp", "QQP", ("question1", "question2"), "qqp question1: {question1} question2: {question2}",
    ("not_duplicate", "duplicate"), "f1_accuracy",
    TsvLayout(columns=("question1", "question2", "is_duplicate")),
))
register_task(TaskSpec(
    "stsb", "STS-B", ("sentence1", "sentence2"), "stsb sentence1: {sentence1} sentence2: {sentence2}",
    (), "pearson_spearman",
    TsvLayout(columns=("sentence1", "sentence2", "score")),
))
register_task(TaskSpec(
    "mnli", "MNLI", ("hypothesis", "premise"), "mnli hypothesis: {hypothesis} premise: {premise}",
    ("entailment", "neutral", "contradiction"), "accuracy",
    TsvLayout(
        columns=("sentence2", "sentence1", "gold_label"),
        label_values=("entailment", "neutral", "contradiction"),
        dev_files=(("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv")),
    ),
    source_splits=("train", "validation_matched", "validation_mismatched"),
))
register_task(TaskSpec(
    "qnli", "QNLI", ("question", "sentence"), "qnli question: {question} sentence: {sentence}", _ENTAIL,
    "accuracy", TsvLayout(columns=("question", "sentence", "label"), label_values=_ENTAIL),
))
register_task(TaskSpec(
    "rte", "RTE", ("sentence1", "sentence2"), "rte sentence1: {sentence1} sentence2: {sentence2}", _ENTAIL,
    "accuracy", TsvLayout(columns=("sentence1", "sentence2", "label"), label_values=_ENTAIL),
))
