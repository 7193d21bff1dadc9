"""READ from the cache: a fresh network is the frozen backbone; batches pad without leaking; all variants run."""
from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration

from cache_store import CacheReader
from pipeline.config import CacheConfig
from pipeline.job import run as cache_run
from side_train.data import InMemorySplit, read_spec
from side_train.read_model import build_read
from side_train.tasks import TaskInfo


def _cache(model, glue_dir, factory, **options):
    config = CacheConfig(model=str(model), data_dir=glue_dir, out=factory.mktemp("c"),
                         splits=("train", "validation", "test"), **options)
    cache_run(config, progress=False)
    return config.cache_dir


@pytest.fixture(scope="module")
def t5_cache(tiny_t5, glue_dir, tmp_path_factory):
    return _cache(tiny_t5, glue_dir, tmp_path_factory, task="rte", limit=10, dtype="float32")


@pytest.fixture(scope="module")
def t5_mean_cache(tiny_t5, glue_dir, tmp_path_factory):
    return _cache(tiny_t5, glue_dir, tmp_path_factory, task="stsb", limit=8, attention="mean")


def test_fresh_read_reproduces_the_t5_label_word_logits(t5_cache, tiny_t5):
    cache = CacheReader(t5_cache)
    task = TaskInfo.from_cache(cache)
    model = build_read(read_spec(cache, 16, "gru"), {task.name: (task.num_labels, task.label_head)}).eval()
    split = InMemorySplit(cache.split("validation"), model.spec)
    reference = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    token_ids = cache.manifest["task"]["label_token_ids"]
    with torch.no_grad():
        logits = model(split.batch(torch.arange(split.n_examples)).inputs)["rte"]
        for j in range(split.n_examples):
            ids = torch.from_numpy(cache.split("validation").input_ids[split.offsets[j]:split.offsets[j] + split.lengths[j]])
            out = reference(input_ids=ids.long()[None], decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
            torch.testing.assert_close(logits[j], out.logits[0, 0, token_ids], rtol=1e-5, atol=1e-5)
            assert logits[j].argmax() == out.logits[0, 0, token_ids].argmax()


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_fresh_read_on_bert_reads_the_pooled_final_tokens(tiny_bert, glue_dir, tmp_path, pooling):
    """Padding never enters the mean: the batch holds examples of different lengths."""
    config = CacheConfig(task="rte", model=str(tiny_bert), data_dir=glue_dir, out=tmp_path, limit=4,
                         dtype="float32", splits=("test",))
    cache_run(config, progress=False)
    cache = CacheReader(config.cache_dir)
    model = build_read(read_spec(cache, 16, "lstm", pooling=pooling), {"rte": (2, None)}).eval()
    split = InMemorySplit(cache.split("test"), model.spec)
    with torch.no_grad():
        features = model.features(split.batch(torch.arange(4)).inputs)
    last = cache.split("test").load("encoder/hidden/2")
    offsets = cache.split("test").offsets
    assert len(set(offsets[1:] - offsets[:-1])) > 1
    expected = torch.stack([last[a] if pooling == "first" else last[a:b].mean(0)
                            for a, b in zip(offsets[:-1], offsets[1:])])
    torch.testing.assert_close(features, expected)


def test_batches_match_the_reader_and_padding_does_not_leak(t5_cache):
    cache = CacheReader(t5_cache)
    spec = read_spec(cache, 16, "lstm")
    split = InMemorySplit(cache.split("train"), spec)
    index = torch.tensor([7, 0, 4])  # mixed lengths, any order
    inputs = split.batch(index).inputs
    reader = cache.split("train")
    for row, j in enumerate(index.tolist()):
        m = int(split.lengths[j])
        example = reader.example(j, ["encoder/hidden/1", "encoder/attention/2", "decoder/cross_attention/1"])
        assert torch.equal(inputs.encoder_hidden[0][row, :m], example["encoder/hidden/1"])
        assert torch.equal(inputs.encoder_attention[1][row, :, :m, :m], example["encoder/attention/2"])
        assert torch.equal(inputs.cross_attention[0][row, :, 0, :m], example["decoder/cross_attention/1"])
        assert not inputs.encoder_hidden[0][row, m:].any() and not inputs.encoder_attention[1][row, :, m:].any()
    torch.manual_seed(0)
    model = build_read(spec, {"rte": (2, cache.label_head())}).eval()
    torch.nn.init.normal_(model.decoder.up.weight, std=0.1)  # a trained network: Up no longer zero
    with torch.no_grad():
        together = model(inputs)["rte"]
        alone = torch.cat([model(split.batch(index[i:i + 1]).inputs)["rte"] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("recurrence", [True, False])
def test_every_variant_trains_on_head_mean_attention(t5_mean_cache, cell, recurrence):
    cache = CacheReader(t5_mean_cache)
    spec = read_spec(cache, 8, cell, recurrence)
    task = TaskInfo.from_cache(cache)
    assert task.regression and spec.heads == 1
    model = build_read(spec, {"stsb": (1, None)})
    shared = sum(p.numel() for p in model.encoder.layers.parameters())
    assert len(model.encoder.layers) == (1 if recurrence else spec.n_layers)
    split = InMemorySplit(cache.split("train"), spec)
    batch = split.batch(torch.arange(split.n_examples))
    loss = torch.nn.functional.mse_loss(model(batch.inputs)["stsb"].squeeze(-1), batch.labels)
    loss.backward()
    assert model.encoder.up is None  # T5: the encoder side reaches the head through the decoder side
    assert model.decoder.up.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.layers.parameters())
    assert shared == (1 if recurrence else spec.n_layers) * sum(p.numel() for p in model.encoder.layers[0].parameters())


def test_streaming_serves_every_example_once_with_the_same_values(t5_cache):
    from side_train.data import StreamingSplit, open_splits
    from side_train.train import evaluate

    cache = CacheReader(t5_cache)
    spec = read_spec(cache, 8, "gru")
    held = InMemorySplit(cache.split("train"), spec)
    streamed = StreamingSplit(cache.split("train"), spec, window=3)
    seen = []
    for batch in streamed.batches(2, shuffle=True, seed=4):
        seen += batch.index.tolist()
        reference = held.batch(batch.index)
        assert all(torch.equal(a, b) for a, b in zip(batch.inputs.encoder_attention, reference.inputs.encoder_attention))
        assert torch.equal(batch.labels, reference.labels)
    assert sorted(seen) == list(range(held.n_examples)) and seen != sorted(seen)
    assert streamed.n_batches(2) == len(list(streamed.batches(2, shuffle=False)))
    task = TaskInfo.from_cache(cache)
    model = build_read(spec, {"rte": (2, cache.label_head())})
    torch.nn.init.normal_(model.decoder.up.weight, std=0.1)
    a, b = (evaluate(model, task, s, 4, torch.device("cpu"))[2] for s in (held, streamed))
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)
    splits, how = open_splits(cache, spec, memory_bytes=1)
    assert isinstance(splits["train"], StreamingSplit) and "streaming" in how
    splits, how = open_splits(cache, spec, memory_bytes=2**30)
    assert isinstance(splits["train"], InMemorySplit) and "holding" in how
