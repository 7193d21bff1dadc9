"""READ's train-time regularisers do what they say, and nothing outside training: token cutoff, Gaussian
noise on the cached states, dropout on the side state, and dropping a layer's update."""
from __future__ import annotations

import pytest
import torch

from cache_store import CacheReader
from side_train.augment import gaussian_noise, token_cutoff
from side_train.config import RunConfig
from side_train.data import InMemorySplit, read_spec
from side_train.read_model import ReadModel, ReadStack
from side_train.tasks import TaskInfo


@pytest.fixture(scope="module")
def caches(tiny_t5, tiny_bert, make_cache):
    return {"t5": CacheReader(make_cache(tiny_t5, task="rte", limit=24, splits=("test",))),
            "bert": CacheReader(make_cache(tiny_bert, task="rte", limit=24, splits=("test",)))}


def batch_of(cache: CacheReader, **spec_options):
    spec = read_spec(cache, 8, "gru", **spec_options)
    split = InMemorySplit(cache.split("test"), spec)
    return spec, split.batch(torch.arange(split.n_examples)).inputs.widened()  # as READ reads them


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_cutoff_drops_about_its_rate_of_tokens_and_renormalises_what_is_left(caches, family):
    spec, inputs = batch_of(caches[family])
    assert token_cutoff(inputs, 0.0) is inputs
    torch.manual_seed(0)
    cut = token_cutoff(inputs, 0.3)
    lengths, new_lengths = inputs.mask.sum(1), cut.mask.sum(1)
    assert (new_lengths >= 1).all() and (new_lengths <= lengths).all()
    dropped = 1 - (new_lengths - 1).sum() / (lengths - 1).sum()  # the first token is always kept
    assert 0.2 < dropped < 0.4
    # Each example's kept tokens, found from its first layer's hidden rows (distinct rows, kept in order).
    old, new = inputs.packing, cut.packing
    for b in range(len(lengths)):
        mine = inputs.encoder_hidden[0][(old.real // old.mask.shape[1] == b).nonzero().squeeze(1)]
        theirs = cut.encoder_hidden[0][(new.real // new.mask.shape[1] == b).nonzero().squeeze(1)]
        kept = [int((mine == row).all(1).nonzero()[0]) for row in theirs]
        assert kept == sorted(kept) and kept[0] == 0 and len(kept) == new_lengths[b]
        for layer in range(spec.n_layers):
            full = inputs.encoder_attention[layer][b].float()  # [A, L, L]
            expected = full[:, kept][:, :, kept]
            expected = expected * full[:, kept].sum(-1, keepdim=True) / expected.sum(-1, keepdim=True)
            m = len(kept)
            got = cut.encoder_attention[layer][b]
            torch.testing.assert_close(got[:, :m, :m], expected)
            assert not got[:, m:].any() and not got[:, :, m:].any()  # padding stays zero
            torch.testing.assert_close(cut.encoder_hidden[layer][(new.real // new.mask.shape[1] == b).nonzero()
                                       .squeeze(1)], inputs.encoder_hidden[layer][(old.real // old.mask.shape[1] == b)
                                       .nonzero().squeeze(1)][kept])
        if cut.cross_attention is not None:
            full = inputs.cross_attention[0][b].float()  # [A, 1, L]: renormalised to its former sum
            cross = full[..., kept] * full.sum(-1, keepdim=True) / full[..., kept].sum(-1, keepdim=True)
            torch.testing.assert_close(cut.cross_attention[0][b][..., :len(kept)], cross)
    task = TaskInfo.from_cache(caches[family])
    model = ReadModel(spec, {task.name: (task.num_labels, task.label_head)})
    assert model(cut, task.name).shape[1] == len(lengths)  # the network reads the shorter examples


def test_noise_is_scaled_to_each_layers_spread(caches):
    _, inputs = batch_of(caches["bert"])
    assert gaussian_noise(inputs, 0.0) is inputs
    torch.manual_seed(0)
    noisy = gaussian_noise(inputs, 0.5)
    for clean, changed in zip(inputs.encoder_hidden, noisy.encoder_hidden):
        assert (changed - clean).std() / clean.std() == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_side_dropout_and_layer_drop_act_in_training_only(caches, family):
    task = TaskInfo.from_cache(caches[family])
    outputs = {}
    for options in ({}, {"side_dropout": 0.5, "layer_drop": 0.5}):
        spec, inputs = batch_of(caches[family], **options)
        torch.manual_seed(0)
        model = ReadModel(spec, {task.name: (task.num_labels, None)})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # Up no longer zero: the side network reaches the head
            outputs[bool(options)] = model.eval()(inputs, task.name), model.train()(inputs, task.name)
    plain, regularised = outputs[False], outputs[True]
    torch.testing.assert_close(plain[0], regularised[0])  # evaluation: the same network
    torch.testing.assert_close(plain[0], plain[1])  # training without them: nothing random
    assert not torch.allclose(regularised[0], regularised[1])


def test_a_dropped_layer_keeps_the_previous_side_state(caches):
    spec, inputs = batch_of(caches["bert"], layer_drop=0.5)  # tiny BERT: 2 layers, one shared ReadLayer
    torch.manual_seed(0)
    stack = ReadStack(1, spec.n_layers, spec.d_model, spec.d_model, 8, spec.heads, "gru", True, layer_drop=0.5)
    first = ReadStack(1, 1, spec.d_model, spec.d_model, 8, spec.heads, "gru", True)
    first.load_state_dict(stack.state_dict())
    with torch.no_grad():
        full = stack.eval()(inputs.encoder_hidden, inputs.encoder_attention, inputs.packing)[0]  # [T, r]
        one = first.eval()(inputs.encoder_hidden, inputs.encoder_attention, inputs.packing)[0]
        torch.manual_seed(1)
        dropped = stack.train()(inputs.encoder_hidden, inputs.encoder_attention, inputs.packing)[0]
    example = inputs.packing.real // inputs.mask.shape[1]
    skipped = set()
    for b in range(inputs.mask.shape[0]):
        rows = example == b
        if torch.equal(dropped[rows], one[rows]):
            skipped.add(b)
        else:
            torch.testing.assert_close(dropped[rows], full[rows])
    assert 0 < len(skipped) < inputs.mask.shape[0]  # some examples skipped layer 2, the others ran it


def test_regularisers_are_checked():
    with pytest.raises(Exception, match="--cutoff"):
        RunConfig(cutoff=1.0)
    with pytest.raises(Exception, match="--noise"):
        RunConfig(noise=-1)
