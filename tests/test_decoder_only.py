"""Decoder-only LMs (pipeline.backbones.DecoderOnlyBackbone) on tiny random models: cached values are
transformers' own forward, a fresh READ network gives the frozen model's zero-shot label-word logits at
the last token, training from the cache is training live, and predict-side gives the training's test
predictions. Random weights: nothing here says how well READ adapts such a model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import check_online_and_predict_side
from cache_store import CacheReader
from cache_store.format import pool
from pipeline.backbones import DecoderOnlyBackbone
from pipeline.config import LOSSLESS, CacheConfig
from pipeline.job import run as cache_run
from side_train.data import InMemorySplit, read_spec
from side_train.read_model import ReadModel
from side_train.tasks import TaskInfo

DECODERS = DecoderOnlyBackbone.model_types


def _cache(folder, glue_dir, out, **options) -> CacheReader:
    config = CacheConfig(task="rte", model=str(folder), data_dir=glue_dir, out=out, dtype="float32", batch_size=4,
                         **{**LOSSLESS, **options})
    cache_run(config, progress=False)
    return CacheReader(config.cache_dir, expect={"backbone.family": "decoder"})


@pytest.mark.parametrize("model_type", DECODERS)
def test_cached_values_and_a_fresh_read_are_the_models_own(model_type, tiny_decoder, glue_dir, tmp_path):
    folder = tiny_decoder(model_type)
    cache = _cache(folder, glue_dir, tmp_path, limit=5, splits=("validation",))
    split = cache.split("validation")
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    label_ids = cache.manifest["task"]["label_token_ids"]
    task = TaskInfo.from_cache(cache)
    read = ReadModel(read_spec(cache, 8, "gru", pooling="auto"), {"rte": (task.num_labels, task.label_head)}).eval()
    assert read.spec.pooling == "last"
    batch = InMemorySplit(split, read.spec)
    with torch.no_grad():
        logits = read(batch.batch(torch.arange(split.n_examples)).inputs, "rte")[0]
    for j in range(split.n_examples):
        ids = torch.from_numpy(split.input_ids[split.offsets[j]:split.offsets[j + 1]]).long()[None]
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
        got = split.example(j, split.array_paths())
        for k in range(3):
            torch.testing.assert_close(got[f"encoder/hidden/{k}"], ref.hidden_states[k][0], rtol=1e-5, atol=1e-5)
        for k in (1, 2):
            maps = got[f"encoder/attention/{k}"]
            torch.testing.assert_close(maps, ref.attentions[k - 1][0], rtol=1e-5, atol=1e-5)
            assert torch.equal(maps, maps.tril())  # causal
        torch.testing.assert_close(logits[j], ref.logits[0, -1, label_ids], rtol=1e-5, atol=1e-5)  # zero-shot


def test_last_pooling_reads_each_examples_last_real_token():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(tokens, mask, "last"), torch.stack([tokens[0, 2], tokens[1, 3]]))
    stacked = torch.stack([tokens, tokens + 100])  # members first: [M, B, L, d]
    assert torch.equal(pool(stacked, mask, "last")[1], pool(tokens + 100, mask, "last"))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_from_cache_is_online_and_predict_side_is_training(model_type, tiny_decoder, glue_dir, tmp_path):
    folder, limit = tiny_decoder(model_type), 16
    cache = _cache(folder, glue_dir, tmp_path, limit=limit)
    check_online_and_predict_side(folder, cache.path, glue_dir, tmp_path, limit)


@pytest.mark.parametrize("attention", ["heads", "mean"])
def test_causal_maps_are_stored_as_their_lower_triangles(attention, tiny_decoder, glue_dir, tmp_path):
    cache = _cache(tiny_decoder("llama"), glue_dir, tmp_path, limit=6, splits=("validation",), attention=attention)
    assert cache.manifest["attention_layout"] == "triangle"
    split = cache.split("validation")
    stored = split.group["encoder/attention/1"]
    assert stored.attrs["grows_along"] == "triangle"
    assert stored.shape[-1] == int((split.lengths * (split.lengths + 1) // 2).sum())  # not sum(m^2)
    assert stored.shape[:-1] == ((4,) if attention == "heads" else ())
    spec = read_spec(cache, 8, "gru", pooling="auto")
    dense = InMemorySplit(split, spec).batch(torch.arange(split.n_examples)).inputs.encoder_attention[0]
    for j in range(split.n_examples):  # READ's dense maps are the stored triangles, 0 above and past the end
        m = int(split.lengths[j])
        example = split.example(j, ["encoder/attention/1"])["encoder/attention/1"]
        assert torch.equal(dense[j, ..., :m, :m], example) and not dense[j, ..., m:, :].any()


def test_top_k_maps_are_reduced_layer_by_layer_as_the_model_runs(tiny_decoder):
    """With top-k asked for, each layer's dense maps are gone before the next layer's exist, and what is kept
    is the top-k of transformers' own maps."""
    import weakref

    from pipeline.backbones import load_backbone
    from pipeline.job import map_reduction, reduce_maps

    backbone = load_backbone(str(tiny_decoder("qwen2")), progress=False)
    ids = torch.randint(5, 500, (3, 20))
    mask = torch.ones_like(ids)
    alive = []

    def reduce(maps):
        alive.append(sum(ref() is not None for ref in seen))  # earlier layers' dense maps still alive
        seen.append(weakref.ref(maps))
        return reduce_maps(maps, per_head=True, k=4)

    seen = []
    hooks = lambda: [len(module._forward_hooks) for module in backbone._attention_modules()]  # noqa: E731
    with torch.inference_mode():
        backbone.forward(ids, mask, attentions=False)  # transformers installs its own hooks on a first call
        before = hooks()
        out = backbone.forward(ids, mask, reduce=reduce)
        reference = backbone.forward(ids, mask, attentions=True)
    assert out.reduced and alive == [0, 0]
    assert hooks() == before  # ours are gone
    for (values, keys), maps in zip(out.encoder_attention, reference.encoder_attention):
        want_values, want_keys = reduce_maps(maps, per_head=True, k=4)
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    assert map_reduction([]) is None
