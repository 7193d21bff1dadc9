"""Every encoder family (pipeline.backbones.EncoderBackbone.model_types) on a tiny random model: its cached
values are transformers' own forward, training from its cache is training with it live, and predict-side
gives the training's test predictions."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import check_online_and_predict_side
from cache_store import CacheReader
from pipeline.backbones import FAMILIES, EncoderBackbone
from pipeline.config import LOSSLESS, CacheConfig
from pipeline.glue_data import load_source_splits
from pipeline.job import run as cache_run
from pipeline.tasks import get_task

ENCODERS = EncoderBackbone.model_types


def test_every_family_is_registered_once_for_its_model_types():
    assert {t for t, cls in FAMILIES.items() if cls is EncoderBackbone} == set(ENCODERS)
    assert {"t5", "mt5", "bart"} <= set(FAMILIES)


@pytest.mark.parametrize("model_type", ENCODERS)
def test_cached_values_are_the_families_own_forward(model_type, tiny_encoder, glue_dir, tmp_path):
    folder = tiny_encoder(model_type)
    config = CacheConfig(task="mrpc", model=str(folder), data_dir=glue_dir, out=tmp_path, limit=5, batch_size=4,
                         dtype="float32", splits=("test",), **LOSSLESS)
    cache_run(config, progress=False)
    split = CacheReader(config.cache_dir, expect={"backbone.family": "bert"}).split("test")
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    segments = model.config.to_dict().get("type_vocab_size", 0) > 1  # the model has segment embeddings
    rows = load_source_splits(get_task("mrpc"), glue_dir)[split.group.attrs["source"]]
    for j in range(split.n_examples):
        row = rows[split.example_index[j]]
        encoded = tokenizer(row["sentence1"], row["sentence2"], return_tensors="pt",
                            return_token_type_ids=segments)
        assert encoded["input_ids"][0].tolist() == split.input_ids[split.offsets[j]:split.offsets[j + 1]].tolist()
        with torch.no_grad():
            ref = model(**encoded, output_hidden_states=True, output_attentions=True)
        got = split.example(j, split.array_paths())
        for k in range(3):
            torch.testing.assert_close(got[f"encoder/hidden/{k}"], ref.hidden_states[k][0], rtol=1e-5, atol=1e-5)
        for k in (1, 2):
            torch.testing.assert_close(got[f"encoder/attention/{k}"], ref.attentions[k - 1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ENCODERS)
def test_from_cache_is_online_and_predict_side_is_training(model_type, tiny_encoder, glue_dir, tmp_path):
    folder, limit = tiny_encoder(model_type), 16
    config = CacheConfig(task="rte", model=str(folder), data_dir=glue_dir, out=tmp_path, limit=limit, dtype="float32",
                         **LOSSLESS)
    cache_run(config, progress=False)
    check_online_and_predict_side(folder, config.cache_dir, glue_dir, tmp_path, limit)


def test_mt5_is_cached_as_t5_and_a_fresh_read_predicts_its_label_words(glue_dir, tmp_path):
    """mT5 unties its LM head from the embeddings (T5 ties and rescales): the label head must follow."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    from conftest import T5_SMALL
    from side_train.data import InMemorySplit, read_spec
    from side_train.read_model import ReadModel
    from side_train.tasks import TaskInfo

    tokenizer = AutoTokenizer.from_pretrained(T5_SMALL)
    config = MT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                       num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                       tie_word_embeddings=False)  # as google/mt5-* are
    torch.manual_seed(0)
    folder = tmp_path / "tiny-mt5"
    MT5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cache_config = CacheConfig(task="rte", model=str(folder), data_dir=glue_dir, out=tmp_path, limit=6,
                               dtype="float32", splits=("validation",), **LOSSLESS)
    cache_run(cache_config, progress=False)
    cache = CacheReader(cache_config.cache_dir, expect={"backbone.family": "t5"})
    task = TaskInfo.from_cache(cache)
    model = ReadModel(read_spec(cache, 8, "gru"), {"rte": (task.num_labels, task.label_head)}).eval()
    split = InMemorySplit(cache.split("validation"), model.spec)
    reference = MT5ForConditionalGeneration.from_pretrained(folder).eval()
    ids = cache.manifest["task"]["label_token_ids"]
    with torch.no_grad():
        logits = model(split.batch(torch.arange(split.n_examples)).inputs, "rte")[0]
        for j in range(split.n_examples):
            tokens = cache.split("validation").input_ids[split.offsets[j]:split.offsets[j] + split.lengths[j]]
            out = reference(input_ids=torch.from_numpy(tokens).long()[None],
                            decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
            torch.testing.assert_close(logits[j], out.logits[0, 0, ids], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A 2+2-layer BART (d=32, 4 heads), seeded random weights, t5-small's SentencePiece tokenizer."""
    from transformers import BartConfig, BartForConditionalGeneration

    from conftest import T5_SMALL

    tokenizer = AutoTokenizer.from_pretrained(T5_SMALL)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=1, bos_token_id=1,
                        decoder_start_token_id=1, forced_bos_token_id=None)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bart")
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bart_is_cached_as_its_own_forward_and_a_fresh_read_predicts_its_label_words(tiny_bart, glue_dir, tmp_path):
    from transformers import BartForConditionalGeneration

    from side_train.data import InMemorySplit, read_spec
    from side_train.read_model import ReadModel
    from side_train.tasks import TaskInfo

    config = CacheConfig(task="rte", model=str(tiny_bart), data_dir=glue_dir, out=tmp_path, limit=5, batch_size=4,
                         dtype="float32", splits=("validation",), **LOSSLESS)
    cache_run(config, progress=False)
    cache = CacheReader(config.cache_dir, expect={"backbone.family": "bart", "backbone.n_decoder_layers": 2})
    split = cache.split("validation")
    task = TaskInfo.from_cache(cache)
    read = ReadModel(read_spec(cache, 8, "gru"), {"rte": (task.num_labels, task.label_head)}).eval()
    with torch.no_grad():
        logits = read(InMemorySplit(split, read.spec).batch(torch.arange(split.n_examples)).inputs, "rte")[0]
    reference = BartForConditionalGeneration.from_pretrained(tiny_bart, attn_implementation="eager").eval()
    ids = cache.manifest["task"]["label_token_ids"]
    for j in range(split.n_examples):
        tokens = torch.from_numpy(split.input_ids[split.offsets[j]:split.offsets[j + 1]]).long()[None]
        with torch.no_grad():
            ref = reference(input_ids=tokens, decoder_input_ids=torch.ones(1, 1, dtype=torch.long),
                            output_hidden_states=True, output_attentions=True)
        got = split.example(j, split.array_paths())
        for k in range(3):
            torch.testing.assert_close(got[f"encoder/hidden/{k}"], ref.encoder_hidden_states[k][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[f"decoder/hidden/{k}"], ref.decoder_hidden_states[k][0, 0], rtol=1e-5, atol=1e-5)
        for k in (1, 2):
            torch.testing.assert_close(got[f"encoder/attention/{k}"], ref.encoder_attentions[k - 1][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[f"decoder/cross_attention/{k}"], ref.cross_attentions[k - 1][0, :, 0],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[j], ref.logits[0, 0, ids], rtol=1e-5, atol=1e-5)  # zero-shot


def test_bart_from_cache_is_online_and_predict_side_is_training(tiny_bart, glue_dir, tmp_path):
    config = CacheConfig(task="rte", model=str(tiny_bart), data_dir=glue_dir, out=tmp_path, limit=16, dtype="float32",
                         **LOSSLESS)
    cache_run(config, progress=False)
    check_online_and_predict_side(tiny_bart, config.cache_dir, glue_dir, tmp_path, 16)
