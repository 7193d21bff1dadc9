"""Same-shape READ models stacked into one: each member computes and trains as it would alone."""
from __future__ import annotations

import pytest
import torch

from cache_store import CacheReader
from pipeline.config import CacheConfig
from pipeline.job import run as cache_run
from side_train.data import InMemorySplit, read_spec
from side_train.read_model import build_read
from side_train.stacked import StackedAdamW, StackedRead
from side_train.tasks import TaskInfo, loss_of
from side_train.train import member_losses


def _cache(model, glue_dir, factory, **options):
    config = CacheConfig(model=str(model), data_dir=glue_dir, out=factory.mktemp("c"), splits=("test",), **options)
    cache_run(config, progress=False)
    return CacheReader(config.cache_dir)


@pytest.fixture(scope="module")
def caches(tiny_t5, tiny_bert, glue_dir, tmp_path_factory):
    return {"t5 heads": _cache(tiny_t5, glue_dir, tmp_path_factory, task="rte", limit=12),
            "t5 mean": _cache(tiny_t5, glue_dir, tmp_path_factory, task="stsb", limit=12, attention="mean"),
            "bert": _cache(tiny_bert, glue_dir, tmp_path_factory, task="rte", limit=12)}


def _members(cache, cell, recurrence, seeds=(0, 1, 2)):
    task = TaskInfo.from_cache(cache)
    spec = read_spec(cache, 8, cell, recurrence)
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_read(spec, {task.name: (task.num_labels, task.label_head)})
        with torch.no_grad():  # Up starts at zero; give it weights so that its path is compared too
            for stack in (model.encoder, model.decoder):
                if stack is not None and stack.up is not None:
                    stack.up.weight.normal_(0, 0.1)
        models.append(model)
    batch = InMemorySplit(cache.split("test"), spec).batch(torch.arange(12))
    return task, models, batch


@pytest.mark.parametrize("which", ["t5 heads", "t5 mean", "bert"])
@pytest.mark.parametrize("cell, recurrence", [("gru", True), ("lstm", True), ("rnn", False)])
def test_stacked_members_compute_what_each_model_computes(caches, which, cell, recurrence):
    task, models, batch = _members(caches[which], cell, recurrence)
    stacked = StackedRead.from_models(models)
    with torch.no_grad():
        together = stacked(batch.inputs, task.name)  # [M, B, C]
        for m, model in enumerate(models):
            torch.testing.assert_close(together[m], model(batch.inputs)[task.name], rtol=1e-5, atol=1e-6)
            alone = build_read(model.spec, {task.name: (task.num_labels, None)})
            alone.load_state_dict(stacked.member_state(m))
            assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_stacked_adamw_trains_each_member_as_torch_adamw_alone(caches, cell):
    task, models, batch = _members(caches["t5 heads"], cell, True, seeds=(0, 1))
    lrs, schedule = [3e-3, 1e-3], lambda step: 1.0 - step / 10
    stacked = StackedRead.from_models(models)
    optimizer = StackedAdamW(stacked.parameters(), weight_decay=0.01)
    alone = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m, lr in zip(models, lrs)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in alone]
    for step in range(5):
        losses = member_losses(task, stacked(batch.inputs, task.name), batch.labels)
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step(torch.tensor(lrs) * schedule(step), torch.tensor([True, True]))
        for m, (model, opt, sched) in enumerate(zip(models, alone, schedules)):
            loss = loss_of(task, model(batch.inputs)[task.name], batch.labels)
            torch.testing.assert_close(losses[m], loss, rtol=1e-5, atol=1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for m, model in enumerate(models):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(stacked.member_state(m)[key], value, rtol=1e-4, atol=1e-6)


def test_a_stopped_member_is_left_untouched(caches):
    task, models, batch = _members(caches["t5 heads"], "gru", True, seeds=(0, 1))
    stacked = StackedRead.from_models(models)
    before = stacked.member_state(1)
    optimizer = StackedAdamW(stacked.parameters(), weight_decay=0.01)
    losses = member_losses(task, stacked(batch.inputs, task.name), batch.labels)
    losses.sum().backward()
    optimizer.step(torch.tensor([1e-3, 1e-3]), torch.tensor([True, False]))
    after = stacked.member_state(1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(stacked.member_state(0)[k], models[0].state_dict()[k]) for k in before)
