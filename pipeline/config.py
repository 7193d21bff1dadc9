"""The one configuration of a `cache-activations` run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_store import ATTENTION_MODES, SPLITS, STORAGE_DTYPES
from cache_store.commands import documented
from cache_store.location import is_remote
from cache_store import CacheError
from cache_store.format import DEFAULT_SHARD_BYTES, HIDDEN_CHOICES, QUANTIZED, parse_attention, parse_codec

from .backbones import INITS, backbone_name
from .errors import InputError
from .tasks import TASKS

MODES = ("new", "resume", "overwrite", "add")
# Version 1's storage: every activation as the backbone computed it, rounded only to --dtype.
LOSSLESS = {"attention": "heads", "quantize": (), "project": 0, "layers": "all"}
LAYER_CHOICES = ("all", "read")  # --layers: every hidden state 0..N, or those READ reads (1..N; 0 is the embeddings)


@dataclass(frozen=True)
class CacheConfig:
    task: str  # a name from the task registry, or the name of a user's task (`data`)
    model: str = documented("t5-base", "Hub id or local folder (save_pretrained layout).")
    name: str | None = documented(None, "What the cache folder and manifest call the backbone (default: the "
                                        "folder's name, or for a folder called model/ and the like its model "
                                        "card's title; else the hub id).")
    init: str = documented("pretrained", "random: seeded random weights built from the model's config "
                                         "(no weights needed).")
    seed: int = documented(0, "Seeds the split protocol and --init random.")
    data_dir: Path | None = documented(None, "GLUE's tsv layout (e.g. glue/RTE/train.tsv); default: the "
                                             "Hugging Face hub.")
    data: tuple[str, ...] = documented((), "Your own labelled rows instead of a GLUE task: a .csv, .tsv, .jsonl, "
                                           ".json or .parquet file (the seeded protocol holds out validation and "
                                           "test rows), or split=FILE for train, validation and test; or a Hugging "
                                           "Face dataset id. Repeat the option for several files.")
    text_fields: tuple[str, ...] = documented((), "--data: the text column, or two for a pair, comma-separated "
                                                  "(default: text, sentence, or sentence1,sentence2).")
    label_field: str = documented("label", "--data: the label column.")
    metric: str | None = documented(None, "--data: accuracy (default), f1_accuracy, matthews, or "
                                          "pearson_spearman for a regression task.")
    labels: tuple[str, ...] = documented((), "--data: the class labels in index order, comma-separated (default: "
                                             "train's, sorted); T5 reads them as its label words.")
    out: Path | str = documented(Path("caches"), "The cache goes to OUT/<model>/<task>; OUT may be "
                                                 "s3://bucket/prefix (credentials and endpoint: AWS_* variables).")
    splits: tuple[str, ...] = documented(SPLITS, "Splits to cache, comma-separated.")
    batch_size: int = documented(32, "Examples per backbone batch.")
    max_length: int = documented(128, "Truncate inputs to this many tokens.")
    dtype: str = documented("bfloat16", "Storage dtype of every float array.")
    # The storage defaults (topk:4, 6-bit hidden states, uint8 attention, zstd:1, layers 1..N) are the
    # smallest choice that kept READ's five-task mean test metric within 0.3 points of full bfloat16 storage
    # on all-MiniLM-L6-v2: 0.23 of version 1's bytes on disk. 5-bit and 4-bit hidden states, or --project,
    # are smaller and cost READ points (docs/storage.md). LOSSLESS undoes them.
    attention: str = documented("topk:4", "Store attention maps per head (heads), as the head mean, or not at "
                                          "all; topk:K keeps each query row's K largest entries per head, "
                                          "renormalised to sum to 1, with their key positions.")
    quantize: tuple[str, ...] = documented(("attention", "hidden6"), "Array kinds to store quantized, comma-separated "
                                           "(none: no kind): hidden (int8, one absmax scale per token), "
                                           "hidden6 and hidden5 (int8 bytes holding 6- or 5-bit integers, which "
                                           "the codec compresses), hidden4 (int4, two a byte, one absmax scale per "
                                           "64 channels of a token) and attention (uint8 units of 1/255, each row's "
                                           "sum kept).")
    outliers: int = documented(0, "With quantized hidden states: keep each stored layer's K channels of "
                                  "largest magnitude (chosen on up to 1024 train examples) in the storage dtype "
                                  "beside the quantized rest; 0: none.")
    project: int = documented(0, "Store each encoder layer's hidden states as K coordinates in a PCA basis "
                                  "fitted on up to 1024 train examples (kept in the cache), and the final layer's "
                                  "pooled states at full width; 0: full width.")
    project_from: Path | None = documented(None, "Reuse the --project basis of this cache (same backbone and K) "
                                                 "instead of fitting one: caches that share a basis can train "
                                                 "one multi-task READ network.")
    # READ's recurrence starts from h_0 = 0 and reads phi_1..phi_N: the embeddings' output (layer 0) is never
    # read, and storing it would add a seventh to a 6-layer encoder's hidden bytes.
    layers: tuple[int, ...] | str = documented("read", "Stored hidden-state layers of each stack: read (1..N, "
                                                       "what READ reads), all (0..N, 0 = the embeddings) or "
                                                       "comma-separated indices.")
    limit: int | None = documented(None, "Keep at most N examples of each split.")
    device: str = documented("auto", "auto | cpu | cuda[:i]")
    mode: str = "new"  # new (refuse an existing cache) | resume | overwrite | add (a store's): the flags
    store: str | None = None  # a store's name: the cache goes to OUT/<model>/<store>/<task> (cache_store.store)
    codec: str = documented("zstd:1", "How every chunk is compressed (blosc, bit shuffle): zstd (level 1 stored "
                                      "quantized caches smaller than level 3 or lz4) or lz4, "
                                      "optionally with a level (1-9), e.g. zstd:5.")
    shard_mb: float = documented(DEFAULT_SHARD_BYTES / 2**20, "Shard size in MiB; one shard per array is buffered "
                                                             "in memory while writing.")

    def __post_init__(self):
        checks = [
            (self.task in TASKS or bool(self.data),
             f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}, or describe your own with --data"),
            (bool(self.task) and "/" not in self.task and not self.task.startswith(".") and "," not in self.task,
             f"--task must be a folder name, got {self.task!r}"),
            (bool(self.data) or not (self.text_fields or self.metric or self.labels or self.label_field != "label"),
             "--text-fields, --label-field, --metric and --labels describe --data; give --data too"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.max_length > 0, f"--max-length must be positive, got {self.max_length}"),
            (self.dtype in STORAGE_DTYPES, f"--dtype must be one of {', '.join(STORAGE_DTYPES)}"),
            (self.attention in ATTENTION_MODES or self.attention.startswith("topk:"),
             f"--attention must be one of {', '.join(ATTENTION_MODES)} or topk:K"),
            (set(self.quantize) <= set(QUANTIZED),
             f"--quantize takes {', '.join(QUANTIZED)}, got {','.join(self.quantize)}"),
            (len(set(HIDDEN_CHOICES) & set(self.quantize)) <= 1,
             f"--quantize takes one of {', '.join(HIDDEN_CHOICES)} (they quantize hidden states each its own way)"),
            ("hidden4" not in self.quantize or self.project % 2 == 0,
             f"--quantize hidden4 packs two values a byte: --project needs an even K, got {self.project}"),
            ("attention" not in self.quantize or self.attention != "none",
             "--quantize attention needs attention maps (--attention heads or mean)"),
            (self.outliers >= 0, f"--outliers must be a number of channels (0: none), got {self.outliers}"),
            (not self.outliers or bool(set(HIDDEN_CHOICES) & set(self.quantize)),
             "--outliers keeps channels beside quantized hidden states: add --quantize hidden (or hidden6, 5, 4)"),
            (not (self.outliers and self.project), "--outliers and --project exclude each other (a projection's "
                                                   "coordinates are not the backbone's channels)"),
            (self.project >= 0, f"--project must be a positive number of dimensions (0: none), got {self.project}"),
            (self.project_from is None or self.project > 0, "--project-from needs --project K"),
            (bool(self.splits) and set(self.splits) <= set(SPLITS), f"--splits must be drawn from {', '.join(SPLITS)}"),
            (self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}"),
            (self.layers in LAYER_CHOICES or (isinstance(self.layers, tuple) and bool(self.layers)
                                              and min(self.layers) >= 0),
             "--layers must be 'read', 'all' or non-negative layer indices"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.mode != "add" or self.store is not None, "--add caches tasks into a store: name it with --store"),
            (self.store is None or (bool(self.store) and "/" not in self.store and not self.store.startswith(".")),
             f"--store must be a folder name, got {self.store!r}"),
            (self.shard_mb > 0, "--shard-mb must be positive"),
            (_codec_ok(self.codec), f"--codec must be lz4 or zstd, optionally :LEVEL (1-9), got {self.codec!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        try:
            parse_attention(self.attention)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    @property
    def attention_mode(self) -> str:
        """heads | mean | none: what the backbone's maps are reduced to (topk:K keeps heads)."""
        return parse_attention(self.attention)[0]

    @property
    def topk(self) -> int:
        return parse_attention(self.attention)[1]

    def _under_backbone(self, *names: str) -> Path | str:
        """OUT/<model>/<names...>: a Path, or an s3:// URL."""
        leaf = f"{backbone_name(self.model, self.name)}{'-random' if self.init == 'random' else ''}"
        if is_remote(self.out):
            return "/".join([str(self.out).rstrip("/"), leaf, *names])
        return Path(self.out).joinpath(leaf, *names)

    @property
    def cache_dir(self) -> Path | str:
        """OUT/<model>/<task>, or in a store OUT/<model>/<store>/<task>."""
        return self._under_backbone(*([self.store] if self.store else []), self.task)

    @property
    def store_dir(self) -> Path | str | None:
        """OUT/<model>/<store> (None for a single-task cache)."""
        return self._under_backbone(self.store) if self.store else None

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 2**20)

    @property
    def compressor(self) -> dict:
        """The manifest's compressor record for --codec."""
        return parse_codec(self.codec)


def _codec_ok(codec: str) -> bool:
    try:
        parse_codec(codec)
    except CacheError:
        return False
    return True
