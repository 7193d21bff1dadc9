"""READ from the cache: a fresh network is the frozen backbone; batches pad without leaking; every variant
runs; members of one model compute and train as each would alone (torch's cells and AdamW the reference)."""
from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration

from cache_store import CacheReader, UserError
from side_train.data import InMemorySplit, StreamingSplit, open_splits, read_spec
from side_train.read_model import CELLS, Cell, ReadAdamW, ReadModel, head_columns, mix
from side_train.reference import reference_outputs
from side_train.tasks import TaskInfo, loss_of
from side_train.evaluation import evaluate
from side_train.stacks import member_losses

ALL_SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def t5_cache(tiny_t5, make_cache):
    return make_cache(tiny_t5, task="rte", limit=10, dtype="float32", splits=ALL_SPLITS)


@pytest.fixture(scope="module")
def t5_mean_cache(tiny_t5, make_cache):
    return make_cache(tiny_t5, task="stsb", limit=8, attention="mean", splits=ALL_SPLITS)


@pytest.fixture(scope="module")
def caches(tiny_t5, tiny_bert, make_cache):
    return {"t5 heads": CacheReader(make_cache(tiny_t5, task="rte", limit=12, splits=("test",))),
            "t5 mean": CacheReader(make_cache(tiny_t5, task="stsb", limit=12, attention="mean", splits=("test",))),
            "bert": CacheReader(make_cache(tiny_bert, task="rte", limit=12, splits=("test",)))}


def model_of(cache: CacheReader, width: int, cell: str, members: int = 1, label_head: bool = True, **options):
    task = TaskInfo.from_cache(cache)
    spec = read_spec(cache, width, cell, **options)
    return task, ReadModel(spec, {task.name: (task.num_labels, task.label_head if label_head else None)}, members)


def test_fresh_read_reproduces_the_t5_label_word_logits(t5_cache, tiny_t5):
    cache = CacheReader(t5_cache)
    task, model = model_of(cache, 16, "gru")
    split = InMemorySplit(cache.split("validation"), model.spec)
    reference = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    token_ids = cache.manifest["task"]["label_token_ids"]
    with torch.no_grad():
        logits = model.eval()(split.batch(torch.arange(split.n_examples)).inputs, "rte")[0]
        for j in range(split.n_examples):
            ids = torch.from_numpy(cache.split("validation").input_ids[split.offsets[j]:split.offsets[j] + split.lengths[j]])
            out = reference(input_ids=ids.long()[None], decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
            torch.testing.assert_close(logits[j], out.logits[0, 0, token_ids], rtol=1e-5, atol=1e-5)
            assert logits[j].argmax() == out.logits[0, 0, token_ids].argmax()


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_fresh_read_on_bert_reads_the_pooled_final_tokens(tiny_bert, make_cache, pooling):
    """Padding never enters the mean: the batch holds examples of different lengths."""
    cache = CacheReader(make_cache(tiny_bert, task="rte", limit=4, dtype="float32", splits=("test",)))
    _, model = model_of(cache, 16, "lstm", label_head=False, pooling=pooling)
    split = InMemorySplit(cache.split("test"), model.spec)
    with torch.no_grad():
        features = model.eval().features(split.batch(torch.arange(4)).inputs)[0]
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
    start = 0  # hidden states are packed: each example's tokens, one example after another
    for row, j in enumerate(index.tolist()):
        m = int(split.lengths[j])
        example = reader.example(j, ["encoder/hidden/1", "encoder/attention/2", "decoder/cross_attention/1"])
        assert torch.equal(inputs.encoder_hidden[0][start:start + m], example["encoder/hidden/1"])
        assert torch.equal(inputs.encoder_attention[1][row, :, :m, :m], example["encoder/attention/2"])
        assert torch.equal(inputs.cross_attention[0][row, :, 0, :m], example["decoder/cross_attention/1"])
        assert not inputs.encoder_attention[1][row, :, m:].any() and not inputs.encoder_attention[1][row, :, :, m:].any()
        start += m
    assert start == len(inputs.encoder_hidden[0])  # no padding among the tokens
    torch.manual_seed(0)
    _, model = model_of(cache, 16, "lstm")
    torch.nn.init.normal_(model.decoder.up.weight, std=0.1)  # a trained network: Up no longer zero
    with torch.no_grad():
        together = model.eval()(inputs, "rte")
        alone = torch.cat([model(split.batch(index[i:i + 1]).inputs, "rte") for i in range(3)], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("recurrence", [True, False])
def test_every_variant_trains_on_head_mean_attention(t5_mean_cache, cell, recurrence):
    cache = CacheReader(t5_mean_cache)
    task, model = model_of(cache, 8, cell, recurrence=recurrence)
    assert task.regression and model.spec.heads == 1
    shared = sum(p.numel() for p in model.encoder.layers.parameters())
    assert len(model.encoder.layers) == (1 if recurrence else model.spec.n_layers)
    split = InMemorySplit(cache.split("train"), model.spec)
    batch = split.batch(torch.arange(split.n_examples))
    loss_of(task, model(batch.inputs, "stsb")[0], batch.labels).backward()
    assert model.encoder.up is None  # T5: the encoder side reaches the head through the decoder side
    assert model.decoder.up.weight.grad.abs().sum() > 0
    # every parameter learns, except, without recurrence, the first layer's two that only read the zero state h_0
    unused = set() if recurrence else {"0.joiner.F.0.weight", "0.cell.weight_hh"}
    assert all((p.grad is None) == (n in unused) for n, p in model.encoder.layers.named_parameters())
    assert shared == (1 if recurrence else model.spec.n_layers) * sum(p.numel() for p in model.encoder.layers[0].parameters())


def test_streaming_serves_every_example_once_with_the_same_values(t5_cache):
    cache = CacheReader(t5_cache)
    spec = read_spec(cache, 8, "gru")
    held = InMemorySplit(cache.split("train"), spec)
    streamed = StreamingSplit(cache.split("train"), spec, window=4)
    epochs = []
    for seed in range(6):
        seen = []
        for batch in streamed.batches(2, shuffle=True, seed=seed):
            seen.append(batch.index.tolist())
            reference = held.batch(batch.index)
            assert all(torch.equal(a, b) for a, b in zip(batch.inputs.encoder_attention, reference.inputs.encoder_attention))
            assert torch.equal(batch.labels, reference.labels)
        assert sorted(sum(seen, [])) == list(range(held.n_examples)) and sum(seen, []) != sorted(sum(seen, []))
        assert len(seen) == streamed.n_batches(2)  # the schedule's count, whatever the window grid's phase
        epochs.append({frozenset(b) for b in seen})
    assert len({frozenset(e) for e in epochs}) > 1  # the grid moves: batch-mates change between epochs
    assert streamed.n_batches(2) == len(list(streamed.batches(2, shuffle=False)))
    task, model = model_of(cache, 8, "gru")
    torch.nn.init.normal_(model.decoder.up.weight, std=0.1)
    a, b = (evaluate(model, task, s, 4, torch.device("cpu"))[2] for s in (held, streamed))
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)
    splits, how = open_splits(cache, spec, memory_bytes=1, batch_size=3)
    assert isinstance(splits["train"], StreamingSplit) and "streaming" in how
    assert splits["train"].window == 3  # a tiny budget still streams whole batches
    splits, how = open_splits(cache, spec, memory_bytes=2**30, batch_size=3)
    assert isinstance(splits["train"], InMemorySplit) and "holding" in how


@pytest.mark.parametrize("kind", list(CELLS))
def test_each_member_of_a_cell_is_torchs_cell(kind):
    torch.manual_seed(0)
    cell = Cell(3, 6, kind)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()  # members that differ
    x, h, c = torch.randn(3, 5, 6), torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    out = cell(x, (h, c) if kind == "lstm" else h)
    for m in range(3):
        reference = CELLS[kind].torch_cell(6, 6)
        reference.load_state_dict({k: v[m] for k, v in cell.state_dict().items()})
        expected = reference(x[m], (h[m], c[m]) if kind == "lstm" else h[m])
        for got, want in zip(out if kind == "lstm" else [out], expected if kind == "lstm" else [expected]):
            torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)


def _members(cache, cell, recurrence, members=3):
    """A model of `members` whose members differ (Up given weights so that its path is compared too), each
    also as a model of one member, and a batch."""
    task, model = model_of(cache, 8, cell, members, recurrence=recurrence)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    alone = [ReadModel.from_member_state(model.spec, {task.name: task.num_labels}, model.member_state(m))
             for m in range(members)]
    batch = InMemorySplit(cache.split("test"), model.spec).batch(torch.arange(12))
    return task, model, alone, batch


@pytest.mark.parametrize("which", ["t5 heads", "t5 mean", "bert"])
@pytest.mark.parametrize("cell, recurrence", [("gru", True), ("lstm", True), ("rnn", False)])
def test_members_compute_what_each_computes_alone(caches, which, cell, recurrence):
    task, model, alone, batch = _members(caches[which], cell, recurrence)
    with torch.no_grad():
        together = model(batch.inputs, task.name)  # [M, B, C]
        for m, one in enumerate(alone):
            torch.testing.assert_close(together[m], one(batch.inputs, task.name)[0], rtol=1e-5, atol=1e-6)
            assert all(torch.equal(a, b) for a, b in zip(one.member_state(0).values(), model.member_state(m).values()))


def test_every_member_starts_as_a_model_of_one_with_the_same_seed(caches):
    cache = caches["t5 heads"]
    torch.manual_seed(5)
    _, three = model_of(cache, 8, "gru", 3)
    torch.manual_seed(5)
    _, one = model_of(cache, 8, "gru", 1)
    for m in range(3):
        assert all(torch.equal(a, b) for a, b in zip(three.member_state(m).values(), one.member_state(0).values()))


@pytest.mark.parametrize("cell", list(CELLS))
def test_read_adamw_trains_each_member_as_torch_adamw_alone(caches, cell):
    """Three members at their own learning rates; the third stops after two steps (the masked update from
    then on, its gradient NaN as a diverged member's would be) and must stay as it was."""
    task, model, alone, batch = _members(caches["t5 heads"], cell, True)
    lrs, schedule, stop_after = [3e-3, 1e-3, 2e-3], lambda step: 1.0 - step / 10, 2
    optimizer = ReadAdamW(model.parameters(), weight_decay=0.01)
    references = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m, lr in zip(alone, lrs)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in references]
    for step in range(5):
        active = torch.tensor([True, True, step < stop_after])
        losses = member_losses(task, model(batch.inputs, task.name), batch.labels)
        optimizer.zero_grad()
        torch.where(active, losses, 0).sum().backward()
        if not active[2]:
            for p in model.parameters():
                p.grad[2] = float("nan")
        optimizer.step(torch.tensor(lrs) * schedule(step), active)
        for m, (one, reference, lr_schedule) in enumerate(zip(alone, references, schedules)):
            if not active[m]:
                continue
            loss = loss_of(task, one(batch.inputs, task.name)[0], batch.labels)
            torch.testing.assert_close(losses[m], loss, rtol=1e-5, atol=1e-6)
            reference.zero_grad()
            loss.backward()
            reference.step()
            lr_schedule.step()
    for m, one in enumerate(alone):
        for key, value in one.member_state(0).items():
            torch.testing.assert_close(model.member_state(m)[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width, heads", [(128, 12), (13, 4), (12, 4), (3, 4)])
def test_each_head_mixes_its_own_slice_for_any_width(width, heads):
    columns = head_columns(width, heads)
    real = [row[row < width].tolist() for row in columns]
    assert sum(real, []) == list(range(width))  # every column once, in order, in contiguous slices
    assert max(map(len, real)) - min(map(len, real)) <= 1  # as even as they can be
    torch.manual_seed(0)
    attention = torch.softmax(torch.randn(2, heads, 5, 5), -1).to(torch.bfloat16)
    values = torch.randn(3, 2, 5, width, requires_grad=True)  # 3 members
    reference = torch.cat([attention[:, a].float() @ values[..., cols] for a, cols in enumerate(real)], -1)
    torch.testing.assert_close(mix(attention, values, heads), reference)
    mix(attention, values, heads).sum().backward()
    assert values.grad.abs().min() > 0 or width < heads  # every column is mixed (one head each)


def test_the_papers_width_trains_on_a_backbone_whose_heads_do_not_divide_it(t5_cache):
    cache = CacheReader(t5_cache)  # 4 heads
    task, model = model_of(cache, 10, "gru")
    torch.nn.init.normal_(model.decoder.up.weight, std=0.1)  # a fresh Up is zero: nothing would reach the layers
    split = InMemorySplit(cache.split("train"), model.spec)
    batch = split.batch(torch.arange(split.n_examples))
    loss_of(task, model(batch.inputs, task.name)[0], batch.labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.layers.parameters())


@pytest.mark.parametrize("which", ["t5 heads", "t5 mean", "bert"])
@pytest.mark.parametrize("cell, recurrence, width, pooling", [("gru", True, 10, "mean"), ("lstm", False, 8, "first"),
                                                              ("rnn", True, 8, "mean")])
def test_read_model_computes_the_papers_equations(caches, which, cell, recurrence, width, pooling):
    """Every member's outputs on a padded batch of examples of different lengths equal the plain per-example
    reference's (width 10 does not divide by 4 heads: uneven head slices)."""
    cache = caches[which]
    task, model = model_of(cache, width, cell, 2, recurrence=recurrence, pooling=pooling)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a trained network: Up no longer zero, members differ
    split = InMemorySplit(cache.split("test"), model.spec)
    index = torch.tensor([3, 0, 11, 6, 7])
    assert len(set(split.lengths[index].tolist())) > 1
    with torch.no_grad():
        outputs = model.eval()(split.batch(index).inputs, task.name)  # [M, B, C]
    reader = cache.split("test")
    paths = reader.array_paths()
    for row, j in enumerate(index.tolist()):
        example = reader.example(j, paths)
        for m in range(2):
            expected = reference_outputs(model.member_state(m), model.spec, example, task.name)
            torch.testing.assert_close(outputs[m, row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which, options", [
    ("t5 heads", {"down_norm": True}), ("t5 mean", {"output_gate": True}), ("bert", {"down_norm": True}),
    ("bert", {"layer_mix": True}), ("bert", {"output_gate": True, "layer_mix": True, "pooling": "first"}),
    ("bert", {"token_mix": True}), ("t5 heads", {"token_mix": True, "recurrence": False})])
def test_the_side_network_options_compute_their_equations(caches, which, options):
    """down_norm, layer_mix, output_gate and token_mix: every member against the per-example reference, on a
    batch of examples of different lengths (token_mix must not attend to another example's or padding)."""
    cache = caches[which]
    task, model = model_of(cache, 10, "gru", 2, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # members differ; the mix and the gate away from their start
    split = InMemorySplit(cache.split("test"), model.spec)
    index = torch.tensor([3, 0, 11, 6])
    with torch.no_grad():
        outputs = model.eval()(split.batch(index).inputs, task.name)
    reader = cache.split("test")
    for row, j in enumerate(index.tolist()):
        example = reader.example(j, reader.array_paths())
        for m in range(2):
            expected = reference_outputs(model.member_state(m), model.spec, example, task.name)
            torch.testing.assert_close(outputs[m, row], expected, rtol=1e-4, atol=1e-5)


def test_a_fresh_gate_and_mix_start_where_documented(caches):
    _, model = model_of(caches["bert"], 8, "gru", 3, layer_mix=True, output_gate=True)
    assert model.layer_weights.shape == (3, model.spec.n_layers) and not model.layer_weights.any()
    torch.testing.assert_close(model.gate, torch.ones(3))


def test_layer_mix_is_refused_where_it_has_no_meaning(caches):
    with pytest.raises(UserError, match="--layer-mix needs an encoder-only backbone"):
        read_spec(caches["t5 heads"], 8, "gru", layer_mix=True)


def test_a_regression_head_starts_at_the_label_mean_and_its_loss_is_in_label_variances(caches):
    """STS-B's 0-5 scores: the loss of an error of one standard deviation is 1, alone or as a member, so a
    regression task's gradients have the scale of a classification task's (several share one network)."""
    from side_train.config import RunConfig
    from side_train.stacks import init_model
    from side_train.tasks import with_label_scale

    cache = caches["t5 mean"]
    labels = torch.tensor([0.0, 1.0, 4.0, 5.0])
    task = with_label_scale(TaskInfo.from_cache(cache), labels)
    assert task.regression and task.label_mean == pytest.approx(2.5) and task.label_var == pytest.approx(4.25)
    model = init_model(RunConfig(width=8), cache, task, members=2)
    assert torch.equal(model.heads["stsb"].bias, torch.full((2, 1), 2.5))
    off_by_one_std = (labels + 4.25 ** 0.5)[:, None]
    assert loss_of(task, off_by_one_std, labels).item() == pytest.approx(1.0)
    assert member_losses(task, off_by_one_std.expand(2, -1, -1).clone(), labels).tolist() == pytest.approx([1.0, 1.0])
    rte = TaskInfo.from_cache(caches["bert"])
    assert with_label_scale(rte, torch.tensor([0, 1, 1])) is rte  # classification: as it was
