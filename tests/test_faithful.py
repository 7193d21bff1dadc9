"""Every cached tensor equals what transformers gives for that example alone, unpadded."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration

from cache_store import CacheReader
from pipeline.config import LOSSLESS, CacheConfig
from pipeline.glue_data import load_source_splits
from pipeline.job import run
from pipeline.tasks import get_task

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2**-8, atol=1e-6)}


def _reference_t5(model_dir):
    return T5ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()


def _close(cached, reference, dtype):
    """bfloat16: the cached value is the reference rounded to bfloat16 (allow one ulp for float32 noise)."""
    reference = reference.float()
    if dtype == "bfloat16":
        torch.testing.assert_close(cached.float(), reference, rtol=2**-7, atol=1e-6)
    else:
        torch.testing.assert_close(cached.float(), reference, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_t5_cache_equals_unpadded_forward(tiny_t5, glue_dir, tmp_path, dtype):
    config = CacheConfig(task="rte", model=str(tiny_t5), data_dir=glue_dir, out=tmp_path, limit=12,
                         batch_size=5, dtype=dtype, splits=("validation",), **LOSSLESS)
    run(config, progress=False)
    cache = CacheReader(config.cache_dir, expect={"storage_dtype": dtype, "task.name": "rte"})
    split = cache.split("validation")
    model = _reference_t5(tiny_t5)
    paths = split.array_paths()
    assert len(paths) == 3 + 2 + 3 + 2  # hidden 0..2, attention 1..2, decoder hidden 0..2, cross 1..2
    assert len(set(split.lengths)) > 1, "the batch must mix lengths for padding to matter"
    head = cache.label_head()
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    rows = load_source_splits(get_task("rte"), glue_dir)[split.group.attrs["source"]]
    for j in range(split.n_examples):
        ids = torch.from_numpy(split.input_ids[split.offsets[j]:split.offsets[j + 1]]).long()[None]
        text = get_task("rte").format(rows[split.example_index[j]])  # provenance: the cached tokens are this row's
        assert tokenizer(text, truncation=True, max_length=128)["input_ids"] == ids[0].tolist()
        with torch.no_grad():
            ref = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
                        output_hidden_states=True, output_attentions=True)
        got = split.example(j, paths)
        for k in range(3):
            _close(got[f"encoder/hidden/{k}"], ref.encoder_hidden_states[k][0], dtype)
            _close(got[f"decoder/hidden/{k}"], ref.decoder_hidden_states[k][0, 0], dtype)
        for k in (1, 2):
            _close(got[f"encoder/attention/{k}"], ref.encoder_attentions[k - 1][0], dtype)
            _close(got[f"decoder/cross_attention/{k}"], ref.cross_attentions[k - 1][0, :, 0], dtype)
        # The label head maps the final decoder state to the backbone's own label-word logits.
        token_ids = cache.manifest["task"]["label_token_ids"]
        logits = got["decoder/hidden/2"].float() @ head.T
        torch.testing.assert_close(logits, ref.logits[0, 0, token_ids], **TOL[dtype])


def test_t5_mean_attention_and_layer_subset(tiny_t5, glue_dir, tmp_path):
    config = CacheConfig(task="rte", model=str(tiny_t5), data_dir=glue_dir, out=tmp_path, limit=4,
                         dtype="float32", splits=("test",), **{**LOSSLESS, "attention": "mean", "layers": (0, 2)})
    run(config, progress=False)
    split = CacheReader(config.cache_dir).split("test")
    assert split.array_paths() == ["decoder/cross_attention/2", "decoder/hidden/0", "decoder/hidden/2",
                                   "encoder/attention/2", "encoder/hidden/0", "encoder/hidden/2"]
    model = _reference_t5(tiny_t5)
    ids = torch.from_numpy(split.input_ids[: split.offsets[1]]).long()[None]
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
                    output_hidden_states=True, output_attentions=True)
    got = split.example(0, split.array_paths())
    _close(got["encoder/attention/2"], ref.encoder_attentions[1][0].mean(0), "float32")
    _close(got["decoder/cross_attention/2"], ref.cross_attentions[1][0, :, 0].mean(0), "float32")


def test_bert_cache_equals_unpadded_forward(tiny_bert, glue_dir, tmp_path):
    config = CacheConfig(task="mrpc", model=str(tiny_bert), data_dir=glue_dir, out=tmp_path, limit=6,
                         batch_size=4, dtype="float32", splits=("test",), **LOSSLESS)
    run(config, progress=False)
    cache = CacheReader(config.cache_dir, expect={"backbone.family": "bert"})
    assert cache.label_head() is None
    split = cache.split("test")
    model = AutoModel.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = load_source_splits(get_task("mrpc"), glue_dir)[split.group.attrs["source"]]
    for j in range(split.n_examples):
        row = rows[split.example_index[j]]
        encoded = tokenizer(row["sentence1"], row["sentence2"], return_tensors="pt")
        assert encoded["input_ids"][0].tolist() == split.input_ids[split.offsets[j]:split.offsets[j + 1]].tolist()
        assert encoded["token_type_ids"].any(), "a pair must have a second segment"
        with torch.no_grad():
            ref = model(**encoded, output_hidden_states=True, output_attentions=True)
        got = split.example(j, split.array_paths())
        for k in range(3):
            _close(got[f"encoder/hidden/{k}"], ref.hidden_states[k][0], "float32")
        for k in (1, 2):
            _close(got[f"encoder/attention/{k}"], ref.attentions[k - 1][0], "float32")
