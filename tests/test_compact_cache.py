"""Compact caches (format v2): quantized arrays (`--quantize`) meet their stated bounds, top-k attention
(`--attention topk:K`) keeps each row's largest entries renormalised, training reads both through the
same path, predict-side reproduces training's test predictions bit for bit, and a version 1 cache still
reads."""
from __future__ import annotations

import json
import shutil

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cache_store import CacheError, CacheReader, faults
from cache_store.faults import DISK_FULL_AFTER_ENV
from cache_store.cli import main as inspect_main
from conftest import arrays_of, cache_args
from pipeline.cli import main as cache_main
from cache_store.format import (
    MANIFEST_KEY, dequantize_groups, dequantize_hidden, dequantize_probabilities, dequantize_rows, quantize_groups,
    quantize_probabilities, quantize_rows, split_outliers,
)
from pipeline.config import CacheConfig
from pipeline.errors import InputError
from pipeline.glue_data import load_source_splits
from pipeline.live import Predictor
from pipeline.splits import make_splits
from pipeline.tasks import get_task
from side_train.config import RunConfig
from side_train.data import InMemorySplit, read_spec
from side_train.devices import inputs_to
from side_train.read_model import ReadModel
from side_train.predict import load_checkpoint, predict
from side_train.train import train

LIMIT = 12
ALL_SPLITS = ("train", "validation", "test")


def test_each_row_is_within_half_a_step_of_its_int8_value():
    torch.manual_seed(0)
    x = torch.randn(500, 64) * torch.logspace(-3, 3, 500)[:, None]  # rows over six orders of magnitude
    x[7] = 0
    values, scale = quantize_rows(x)
    assert values.dtype == torch.int8 and int(values.abs().max()) == 127
    error = (dequantize_rows(values, scale) - x).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert not dequantize_rows(values, scale)[7].any()


@pytest.mark.parametrize("levels", [31, 15])
def test_fewer_levels_keep_each_value_within_half_a_step_and_compress_to_their_bits(levels):
    """hidden6 and hidden5: int8 bytes holding |q| <= levels; the codec's bit shuffle compresses the bits they
    do not use."""
    torch.manual_seed(0)
    x = torch.randn(4000, 64) * torch.logspace(-3, 3, 4000)[:, None]
    values, scale = quantize_rows(x, levels)
    assert values.dtype == torch.int8 and int(values.abs().max()) == levels
    assert ((dequantize_rows(values, scale) - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    packed = len(numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE).encode(values.numpy()))
    assert packed < values.numel() * ({31: 6, 15: 5}[levels] + 0.5) / 8  # as the cache's codec stores them


def test_each_int4_value_is_within_half_its_groups_step():
    torch.manual_seed(0)
    x = torch.randn(300, 200) * torch.logspace(-3, 3, 300)[:, None] * torch.rand(200)  # 200: a short last group
    x[7] = 0
    x[9, :64] = 0  # one group of zeros in a row that has others
    packed, scale = quantize_groups(x)
    assert packed.dtype == torch.uint8 and packed.shape == (300, 100) and scale.shape == (300, 4)
    step = scale.repeat_interleave(64, -1)[:, :200]
    error = (dequantize_groups(packed, scale) - x).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()
    assert not dequantize_groups(packed, scale)[7].any() and not dequantize_groups(packed, scale)[9, :64].any()
    values = torch.stack([(packed & 15), packed >> 4], -1).flatten(-2).long() - 8
    assert int(values.min()) == -7 and int(values.max()) == 7  # each group's largest magnitude is +-7 exactly
    with pytest.raises(ValueError, match="even"):
        quantize_groups(torch.randn(2, 5))


def test_an_int6_cache_stores_six_bit_integers_within_half_a_step(caches):
    exact, six = caches["float32"], caches["int6"]
    a, b = exact.split("train"), six.split("train")
    for path in ("encoder/hidden/1", "decoder/hidden/1"):
        stack, _, layer = path.split("/")
        values, scale = b.load(path), b.load(f"{stack}/hidden_scale/{layer}")
        assert values.dtype == torch.int8 and int(values.abs().max()) == 31
        assert ((dequantize_rows(values, scale) - a.load(path)).abs() <= scale[..., None] / 2 * (1 + 1e-6) + 1e-7).all()
    assert zarr.open_array(str(six.path / "train" / "encoder" / "hidden" / "1")).attrs["logical_dtype"] == "int6"


def test_an_int4_cache_stores_what_its_bound_promises(caches):
    exact, packed = caches["float32"], caches["int4"]
    assert packed.manifest["quantize"] == ["attention", "hidden4"]
    a, b = exact.split("train"), packed.split("train")
    for layer in (0, 1, 2):
        values, scale = b.load(f"encoder/hidden/{layer}"), b.load(f"encoder/hidden_scale/{layer}")
        assert values.dtype == torch.uint8 and values.shape[-1] == 16 and scale.shape[-1] == 1  # d = 32
        error = (dequantize_groups(values, scale) - a.load(f"encoder/hidden/{layer}")).abs()
        assert (error <= scale.repeat_interleave(64, -1)[:, :32] / 2 * (1 + 1e-6) + 1e-7).all()
    values, scale = b.load("decoder/hidden/1"), b.load("decoder/hidden_scale/1")
    error = (dequantize_groups(values, scale) - a.load("decoder/hidden/1")).abs()
    assert (error <= scale.repeat_interleave(64, -1)[:, :32] / 2 * (1 + 1e-6) + 1e-7).all()
    shown = CliRunner().invoke(inspect_main, [str(packed.path), "--verify"])
    assert shown.exit_code == 0 and "hidden4 int4x2" in shown.output, shown.output


def test_kept_outlier_channels_come_back_as_they_were_and_leave_the_rest_finer_steps():
    torch.manual_seed(0)
    x = torch.randn(400, 128)
    x[:, [5, 70]] *= 40  # two outlier channels, one in each group of 64
    channels = torch.tensor([5, 70])
    rest, kept = split_outliers(x, channels)
    assert not rest[:, channels].any() and torch.equal(kept, x[:, channels])
    for quantize in (quantize_rows, quantize_groups):
        values, scale = quantize(rest)
        restored = dequantize_hidden(values, scale, kept, channels)
        assert torch.equal(restored[:, channels], x[:, channels])  # exact: kept in the storage dtype (float32 here)
        step = scale[:, None] if quantize is quantize_rows else scale.repeat_interleave(64, -1)
        assert ((restored - x).abs() <= step / 2 * (1 + 1e-6)).all()
        plain = dequantize_hidden(*quantize(x))  # the outliers set every scale: the others' error is far larger
        others = torch.ones(128, dtype=torch.bool).index_fill(0, channels, False)
        assert (restored - x)[:, others].abs().mean() < (plain - x)[:, others].abs().mean() / 4


def test_an_outliers_cache_keeps_each_layers_largest_channels(caches):
    exact, packed = caches["float32"], caches["int4-outliers"]
    outliers = packed.manifest["outliers"]
    assert outliers["k"] == 3 and outliers["sample"]["examples"] == LIMIT  # every train example: the sample
    a, b = exact.split("train"), packed.split("train")
    for path in ("encoder/hidden/1", "encoder/hidden/2", "decoder/hidden/1"):
        full = a.load(path)
        channels = torch.tensor(outliers["channels"][path])
        assert torch.equal(channels, full.abs().amax(0).topk(3).indices.sort().values)  # largest on the sample
        stack, _, layer = path.split("/")
        values, scale = b.load(path), b.load(f"{stack}/hidden_scale/{layer}")
        kept = b.load(f"{stack}/hidden_outliers/{layer}")
        assert kept.shape == (full.shape[0], 3)
        restored = dequantize_hidden(values, scale, kept, channels)
        assert torch.equal(restored[:, channels], full[:, channels])
        step = scale.repeat_interleave(64, -1)[:, :32]
        assert ((restored - full).abs() <= step / 2 * (1 + 1e-6) + 1e-7).all()
    shown = CliRunner().invoke(inspect_main, [str(packed.path), "--verify"])
    assert shown.exit_code == 0 and "3 outlier channels per layer kept" in shown.output, shown.output


@pytest.mark.parametrize("options, message", [
    ({"outliers": 2, "quantize": ("attention",)}, "add --quantize hidden"),
    ({"outliers": 2, "quantize": ("hidden4",), "project": 8}, "exclude each other"),
    ({"outliers": -1, "quantize": ("hidden4",)}, "--outliers must be"),
])
def test_outliers_refuse_what_they_cannot_keep(options, message):
    with pytest.raises(InputError, match=message):
        CacheConfig(task="rte", **options)


def test_uint8_attention_keeps_every_row_sum_and_each_entry_within_one_unit():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 4, 40, 40) * 3, -1)
    p[..., 30:] = 0  # padded keys
    p = p / p.sum(-1, keepdim=True)
    units = quantize_probabilities(p)
    assert units.dtype == torch.uint8
    assert (dequantize_probabilities(units) - p).abs().max() < 1 / 255
    assert (units.long().sum(-1) == 255).all()  # every row still sums to one
    assert not units[..., 30:].any()  # padding stays zero
    assert torch.equal(units, quantize_probabilities(p.clone()))  # deterministic (predict-side relies on it)


STORAGE = {"float32": {}, "quantized": {"quantize": ("attention", "hidden")}, "topk": {"attention": "topk:3"},
           "topk-quantized": {"attention": "topk:3", "quantize": ("attention", "hidden")},
           "projected": {"project": 6, "attention": "topk:3", "quantize": ("attention", "hidden")},
           "int6": {"attention": "topk:3", "quantize": ("attention", "hidden6")},
           "int4": {"attention": "topk:3", "quantize": ("attention", "hidden4")},
           "int4-outliers": {"attention": "topk:3", "quantize": ("attention", "hidden4"), "outliers": 3}}


@pytest.fixture(scope="module")
def caches(tiny_t5, make_cache):
    return {name: CacheReader(make_cache(tiny_t5, task="rte", limit=LIMIT, dtype="float32", splits=ALL_SPLITS,
                                         **options)) for name, options in STORAGE.items()}


@pytest.fixture(scope="module")
def pair(caches):
    return caches["float32"], caches["quantized"]


def test_a_quantized_cache_stores_what_the_bounds_promise(pair):
    exact, packed = pair
    assert packed.manifest["format_version"] == 2 and packed.manifest["quantize"] == ["attention", "hidden"]
    a, b = exact.split("train"), packed.split("train")
    for layer in (1, 2):
        values, scale = b.load(f"encoder/hidden/{layer}"), b.load(f"encoder/hidden_scale/{layer}")
        assert values.dtype == torch.int8 and scale.dtype == torch.float32
        error = (dequantize_rows(values, scale) - a.load(f"encoder/hidden/{layer}")).abs()
        assert (error <= scale[:, None] / 2 * (1 + 1e-6) + 1e-7).all()
        units = b.load(f"encoder/attention/{layer}")
        assert units.dtype == torch.uint8
        assert (dequantize_probabilities(units) - a.load(f"encoder/attention/{layer}")).abs().max() < 1 / 255
        for j in range(b.n_examples):  # every query row of every example keeps its sum
            m, start = int(b.lengths[j]), int(b.attention_offsets[j])
            assert (units[:, start:start + m * m].view(-1, m, m).long().sum(-1) == 255).all()
    decoder = b.load("decoder/hidden/1"), b.load("decoder/hidden_scale/1")
    assert decoder[0].dtype == torch.int8 and decoder[1].shape == (b.n_examples,)
    shown = CliRunner().invoke(inspect_main, [str(packed.path), "--verify"])
    assert shown.exit_code == 0, shown.output
    assert "attention uint8, hidden int8" in shown.output and "per token  attention" in shown.output


@pytest.mark.parametrize("storage", list(STORAGE))
def test_training_and_prediction_read_a_cache_the_same_way(caches, storage, tiny_t5, glue_dir, tmp_path):
    _train_then_predict(caches[storage].path, tiny_t5, glue_dir, tmp_path)


def _train_then_predict(cache, model, glue_dir, tmp_path):
    """Train READ on a cache, then predict-side on its test rows equals training's test predictions."""
    (result,) = train([cache], [RunConfig(width=6, lr=3e-3, epochs=2, batch_size=4)], tmp_path,
                      progress=False, log=lambda line: None)
    assert result["status"] == "ok" and result["best_validation"] is not None
    run = tmp_path / result["name"]
    checkpoint = load_checkpoint(run)
    task = get_task("rte")
    _, splits = make_splits(task.name, load_source_splits(task, glue_dir), 0)
    rows = [{f: row[f] for f in task.fields} for row in splits["test"].rows[:LIMIT]]
    predictor = Predictor(str(model), checkpoint.manifest, projection=checkpoint.projection)
    out = list(predict(checkpoint, predictor, rows, progress=False))
    recorded = {r["example_index"]: r for r in map(json.loads, (run / "test_predictions.jsonl").open())}
    for record, index in zip(out, splits["test"].example_index[:LIMIT].tolist()):
        assert record["predictions"]["rte"]["probabilities"] == recorded[index]["probabilities"]  # bit for bit


def test_a_version_1_cache_reads_as_it_always_did(pair, tmp_path):
    exact, _ = pair
    old = tmp_path / "v1"
    shutil.copytree(exact.path, old)
    group = zarr.open_group(str(old), mode="r+")
    manifest = dict(group.attrs[MANIFEST_KEY])
    manifest["format_version"] = 1
    del manifest["quantize"]
    group.attrs[MANIFEST_KEY] = manifest
    a, b = exact.split("train"), CacheReader(old).split("train")
    assert a.array_paths() == b.array_paths()
    for path in a.array_paths():
        assert torch.equal(a.load(path), b.load(path))


def test_topk_keeps_each_rows_largest_entries_renormalised(caches):
    exact, sparse = caches["float32"], caches["topk"]
    assert sparse.manifest["attention"] == "heads"
    assert sparse.manifest["attention_topk"] == {"k": 3, "residual": "renormalised"}
    stored = sparse.split("train").load("encoder/attention/1")
    lengths = sparse.split("train").lengths
    assert stored.shape[-1] == int((lengths * np.minimum(3, lengths)).sum())  # m * 3 entries per example
    spec = read_spec(exact, 4, "gru")
    index = torch.arange(exact.split("train").n_examples)
    dense = InMemorySplit(exact.split("train"), spec).batch(index).inputs
    kept = InMemorySplit(sparse.split("train"), spec).batch(index).inputs
    rows = dense.mask[:, None, :, None]  # [B, 1, L, 1]: real query rows
    for full, top in zip(dense.encoder_attention, kept.encoder_attention):
        values, keys = full.topk(3, dim=-1)
        reference = torch.zeros_like(full).scatter_(-1, keys, values / values.sum(-1, keepdim=True).clamp_min(1e-30))
        torch.testing.assert_close(top, reference * rows)
        torch.testing.assert_close(top.sum(-1), rows.squeeze(-1).expand_as(top.sum(-1)).float())


@pytest.fixture(scope="module")
def projected(tiny_bert, make_cache):
    """tiny_bert (d=32) cached at full width in float32, and projected to 8 and to all 32 dimensions."""
    make = lambda **o: CacheReader(make_cache(tiny_bert, task="rte", limit=LIMIT, dtype="float32",  # noqa: E731
                                              splits=ALL_SPLITS, **o))
    return make(), make(project=8), make(project=32)


def test_projection_stores_pca_coordinates_and_full_width_pooled_states(projected):
    exact, narrow, full = projected
    a = exact.split("train")
    for cache, k in ((narrow, 8), (full, 32)):
        assert cache.manifest["projection"]["k"] == k and cache.manifest["projection"]["sample"]["examples"] == LIMIT
        basis_arrays = cache.projection_arrays()
        b = cache.split("train")
        for layer in (0, 1, 2):
            mean, basis = (torch.from_numpy(basis_arrays[f"projection/{kind}/{layer}"]) for kind in ("mean", "basis"))
            assert basis.shape == (k, 32)
            torch.testing.assert_close(basis @ basis.T, torch.eye(k), atol=1e-5, rtol=0)  # orthonormal rows
            h, z = a.load(f"encoder/hidden/{layer}"), b.load(f"encoder/hidden/{layer}")
            torch.testing.assert_close(z, (h - mean) @ basis.T, atol=1e-4, rtol=1e-4)
            centred = h - h.mean(0)  # the basis was fitted on these very tokens (all 12 train examples)
            kept = float(((centred @ basis.T) ** 2).sum() / (centred**2).sum())
            assert kept == pytest.approx(cache.manifest["projection"]["explained_variance"][str(layer)], abs=1e-4)
            axes = float((centred[:, :k] ** 2).sum() / (centred**2).sum())  # any other K directions keep less
            assert kept >= axes - 1e-5 and (k < 32 or kept == pytest.approx(1, abs=1e-4))
            if k == 32:  # a full basis loses nothing
                torch.testing.assert_close(mean + z @ basis, h, atol=1e-4, rtol=1e-4)
        final = a.load("encoder/hidden/2")
        starts = a.offsets
        means = torch.stack([final[starts[j]:starts[j + 1]].mean(0) for j in range(a.n_examples)])
        torch.testing.assert_close(b.load("encoder/pooled_mean/2"), means, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.load("encoder/pooled_first/2"), final[torch.from_numpy(starts[:-1])])
    variance = narrow.manifest["projection"]["explained_variance"]
    assert set(variance) == {"0", "1", "2"} and all(0 < v <= 1 for v in variance.values())
    shown = CliRunner().invoke(inspect_main, [str(narrow.path), "--verify"])
    assert shown.exit_code == 0 and "projected to 8 PCA dimensions" in shown.output, shown.output


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_a_fresh_read_network_reads_a_projected_cache_as_the_full_one(projected, pooling):
    exact, narrow, _ = projected
    spec = read_spec(exact, 6, "gru", pooling=pooling)
    narrow_spec = read_spec(narrow, 6, "gru", pooling=pooling)
    assert narrow_spec.projection == 8 and spec.projection == 0
    torch.manual_seed(0)
    full_model = ReadModel(spec, {"rte": (2, None)})
    torch.manual_seed(0)
    narrow_model = ReadModel(narrow_spec, {"rte": (2, None)})
    assert narrow_model.encoder.layers[0].down.weight.shape[-1] == 8 + 6  # Down reads the K coordinates
    index = torch.arange(exact.split("test").n_examples)
    full = inputs_to(InMemorySplit(exact.split("test"), spec).batch(index).inputs, torch.device("cpu"))
    small = inputs_to(InMemorySplit(narrow.split("test"), narrow_spec).batch(index).inputs, torch.device("cpu"))
    assert small.encoder_hidden[0].shape[-1] == 8 and small.pooled[pooling].shape == (len(index), 32)
    with torch.no_grad():  # Up starts at zero: the heads read the backbone's pooled state either way
        torch.testing.assert_close(narrow_model.features(small), full_model.features(full), atol=1e-5, rtol=1e-5)


def test_a_projected_bert_checkpoint_predicts_what_training_recorded(tiny_bert, make_cache, glue_dir, tmp_path):
    cache = make_cache(tiny_bert, task="rte", limit=LIMIT, splits=ALL_SPLITS, project=8, quantize=("hidden",))
    assert "encoder/pooled_mean_scale/2" in CacheReader(cache).split("train").array_paths()
    _train_then_predict(cache, tiny_bert, glue_dir, tmp_path)
    run = next(p for p in tmp_path.iterdir() if (p / "model.safetensors").is_file())
    assert (run / "projection.safetensors").is_file()
    with pytest.raises(Exception, match="projection.safetensors"):
        (run / "projection.safetensors").unlink()
        load_checkpoint(run)


def test_multi_task_needs_one_basis_for_every_task(tiny_bert, make_cache, tmp_path):
    rte = make_cache(tiny_bert, task="rte", limit=LIMIT, project=8)
    own = make_cache(tiny_bert, task="mrpc", limit=LIMIT, project=8)
    config, quiet = [RunConfig(width=6, epochs=1, batch_size=4)], dict(progress=False, log=lambda line: None)
    with pytest.raises(CacheError, match="projection"):
        train([rte, own], config, tmp_path / "own", **quiet)
    shared = make_cache(tiny_bert, task="mrpc", limit=LIMIT, project=8, project_from=rte)
    assert CacheReader(shared).manifest["projection"] == CacheReader(rte).manifest["projection"]
    (result,) = train([rte, shared], config, tmp_path / "shared", **quiet)
    assert result["status"] == "ok" and set(result["tasks"]) == {"rte", "mrpc"}
    with pytest.raises(InputError, match="has no --project 4 basis"):
        make_cache(tiny_bert, task="mrpc", limit=LIMIT, project=4, project_from=rte)


def test_the_codec_changes_the_bytes_on_disk_and_nothing_read(tiny_bert, make_cache):
    lz4 = CacheReader(make_cache(tiny_bert, task="rte", limit=LIMIT, splits=("train",), quantize=("attention", "hidden4"),
                                 codec="lz4"))
    zstd = CacheReader(make_cache(tiny_bert, task="rte", limit=LIMIT, splits=("train",), quantize=("attention", "hidden4"),
                                  codec="zstd:5"))
    assert zstd.manifest["storage"]["compressor"] == {"codec": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"}
    assert lz4.manifest["storage"]["compressor"]["cname"] == "lz4"
    a, b = lz4.split("train"), zstd.split("train")
    for path in a.array_paths():
        assert torch.equal(a.load(path), b.load(path))
    assert zarr.open_array(str(zstd.path / "train" / "encoder" / "hidden" / "1")).compressors[0].cname.value == "zstd"


def test_cache_activations_writes_the_default_storage_the_study_chose(tiny_bert, glue_dir, tmp_path):
    """No storage option: top-4 uint8 attention, 6-bit hidden states of layers 1..N, zstd at level 1."""
    args = ["--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir), "--out", str(tmp_path),
            "--limit", "12", "--splits", "train", "--quiet"]
    result = CliRunner().invoke(cache_main, args)
    assert result.exit_code == 0, result.output
    m = CacheReader(tmp_path / tiny_bert.name / "rte").manifest
    assert (m["attention_topk"]["k"], m["quantize"], m["projection"], m["outliers"]) == (4, ["attention", "hidden6"],
                                                                                          None, None)
    assert m["storage"]["compressor"] == {"codec": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
    assert m["layers"]["encoder"] == list(range(1, m["backbone"]["n_layers"] + 1))


# The default storage before top-4 attention, 6-bit hidden states and zstd:1: what users' caches hold.
PREVIOUS_DEFAULT = dict(attention="topk:8", quantize=("attention", "hidden"), codec="lz4", layers="all")


def test_a_cache_of_the_previous_default_storage_reads_and_trains_unchanged(tiny_bert, make_cache, tmp_path):
    """Caches of the previous default storage, written before `attention_layout` and `outliers` existed (and
    with lz4, the only codec then): the same batches, the same training, as the same cache with today's
    manifest."""
    made = make_cache(tiny_bert, task="rte", limit=LIMIT, **PREVIOUS_DEFAULT)
    old = tmp_path / "old"
    shutil.copytree(made, old)
    group = zarr.open_group(str(old), mode="r+")
    manifest = dict(group.attrs[MANIFEST_KEY])
    assert manifest["attention_layout"] == "topk" and manifest["outliers"] is None
    assert manifest["storage"]["compressor"]["cname"] == "lz4"
    del manifest["attention_layout"], manifest["outliers"]
    group.attrs[MANIFEST_KEY] = manifest
    new, before = CacheReader(made), CacheReader(old)
    assert "encoder/hidden/0" in before.split("train").array_paths()
    spec = read_spec(new, 6, "gru")
    index = torch.arange(new.split("train").n_examples)
    a = inputs_to(InMemorySplit(new.split("train"), spec).batch(index).inputs, torch.device("cpu"))
    b = inputs_to(InMemorySplit(before.split("train"), spec).batch(index).inputs, torch.device("cpu"))
    for x, y in zip(a.encoder_hidden + a.encoder_attention, b.encoder_hidden + b.encoder_attention):
        assert torch.equal(x, y)
    config, quiet = [RunConfig(width=6, epochs=1, batch_size=4)], dict(progress=False, log=lambda line: None)
    (first,) = train([made], config, tmp_path / "new", **quiet)
    (second,) = train([old], config, tmp_path / "before", **quiet)
    assert first["train_loss"] == second["train_loss"] and first["test"] == second["test"]


def test_the_default_cache_leaves_out_the_embeddings_which_read_never_reads(tiny_bert, make_cache, tmp_path):
    """--layers read (the default) stores hidden states 1..N: READ's recurrence starts from h_0 = 0 and reads
    phi_1..phi_N, so it trains exactly as on a cache with layer 0."""
    assert CacheConfig(task="rte").layers == "read"
    options = dict(task="rte", limit=LIMIT, attention="topk:8", quantize=("attention", "hidden"))
    every, read = make_cache(tiny_bert, layers="all", **options), make_cache(tiny_bert, layers="read", **options)
    manifest = CacheReader(read).manifest
    assert manifest["layers"]["encoder"] == list(range(1, manifest["backbone"]["n_layers"] + 1))
    assert "encoder/hidden/0" not in CacheReader(read).split("train").array_paths()
    assert "encoder/hidden/0" in CacheReader(every).split("train").array_paths()
    config, quiet = [RunConfig(width=6, epochs=1, batch_size=4)], dict(progress=False, log=lambda line: None)
    (a,) = train([every], config, tmp_path / "every", **quiet)
    (b,) = train([read], config, tmp_path / "read", **quiet)
    assert a["train_loss"] == b["train_loss"] and a["test"] == b["test"]


def test_a_resumed_outliers_cache_keeps_its_channels_and_ends_as_an_uninterrupted_one(tiny_bert, glue_dir, tmp_path,
                                                                                      monkeypatch):
    options = ["--quantize", "attention,hidden4", "--outliers", "3", "--shard-mb", "0.005"]
    whole = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path / "whole", *options))
    assert whole.exit_code == 0, whole.output
    monkeypatch.setenv(DISK_FULL_AFTER_ENV, "20")
    monkeypatch.setattr(faults, "_shards_written", 0)
    cut = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path / "cut", *options))
    assert cut.exit_code == 1 and "--resume" in cut.output
    monkeypatch.delenv(DISK_FULL_AFTER_ENV)
    resumed = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, tmp_path / "cut", *options, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    expected, got = (arrays_of(p / tiny_bert.name / "rte") for p in (tmp_path / "whole", tmp_path / "cut"))
    assert expected.keys() == got.keys() and any("hidden_outliers" in k for k in expected)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    manifests = [CacheReader(p / tiny_bert.name / "rte").manifest for p in (tmp_path / "whole", tmp_path / "cut")]
    assert manifests[0]["outliers"] == manifests[1]["outliers"]
