"""The `cache-activations` batch job: GLUE rows -> tokens -> frozen backbone -> cache_store."""
from __future__ import annotations

import contextlib
import datetime
import functools
import time
from dataclasses import dataclass, replace
from importlib import metadata

import numpy as np
import torch
from tqdm.auto import tqdm

from cache_store import (
    ArraySpec, BackgroundWriter, CacheError, CacheReader, CacheWriter, SplitPlan, attention_path, cross_attention_path, hidden_path,
)
from cache_store.format import (
    ARRAY_DTYPES, EXAMPLES, HIDDEN4_GROUP, PAIRS, STORED_POOLINGS, QUANTIZED, STORAGE_DTYPES, TOKENS, TOPK, TRIANGLE,
    attention_keys_path, extent, outliers_path, pool, pooled_path, quantize_probabilities, quantize_hidden, scale_path,
    split_outliers, stored_projection, hidden_quantization, to_storage, triangle_indices,
)
from cache_store.location import Location
from cache_store.lock import write_lock
from cache_store.ranked import RankedSplit, finalize, has_rank_records, open_records
from cache_store.store import StoreWriter, shared_fields
from cache_store.world import World, current_world
from cache_store.writer import storage_record

from .backbones import Backbone, BackboneOutput, load_backbone
from .config import CacheConfig
from .errors import InputError
from .glue_data import load_source_splits
from .padding import pad_batch
from .outliers import Outliers, choose
from .projection import Projection, fit
from .splits import Split, make_splits
from .tasks import TaskSpec, get_task
from .user_data import load_rows, parse_data, user_task


def package_version() -> str:
    try:
        return metadata.version("read-side")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def stored_layers(backbone: Backbone, layers: tuple[int, ...] | str) -> dict[str, list[int]]:
    """Hidden-state indices kept per stack (attention maps follow: layer k >= 1 has one): all (0..N), read
    (1..N, what READ reads) or the given indices."""
    wanted = {"encoder": backbone.n_layers, "decoder": backbone.n_decoder_layers}
    if isinstance(layers, tuple) and max(layers) > max(wanted.values()):
        raise InputError(f"--layers {max(layers)} is past the backbone's {max(wanted.values())} layers")
    keep = {"all": lambda k: True, "read": lambda k: k > 0}.get(layers, lambda k: k in layers)
    return {stack: [k for k in range(n + 1) if keep(k)] if n else [] for stack, n in wanted.items()}


def array_specs(backbone: Backbone, attention: str, layers: dict[str, list[int]],
                quantize: tuple[str, ...] = (), topk: int = 0, max_length: int = 128, project: int = 0,
                outliers: int = 0) -> list[ArraySpec]:
    """Every backbone array a split stores; quantized kinds in their QUANTIZED dtype (None: the storage
    dtype), int8 hidden states with a float32 scale array beside each (int4 ones: two channels a byte,
    one scale per group of channels), top-k attention entries with an
    array of their key positions (uint8 while positions fit, int16 beyond), causal maps as their lower
    triangles, encoder hidden states K wide with --project K (and an encoder-only backbone's pooled final
    states, full width), and with --outliers K each quantized hidden array's K kept channels beside it."""
    d, heads = backbone.d_model, backbone.n_heads
    att_row, att_axis = ((heads,), 1) if attention == "heads" else ((), 0)
    hidden = hidden_quantization(quantize)
    maps = QUANTIZED["attention"] if "attention" in quantize else None

    def rows(width):  # a hidden array's row and its scales' row: int4 packs two channels a byte, a scale a group
        if hidden == "int4x2":
            return (width // 2,), (-(-width // HIDDEN4_GROUP),)
        return (width,), ()

    def with_scales(out, width):
        scales = rows(width)[1]
        kept = [ArraySpec(outliers_path(s.path), s.grows_along, (outliers,), 0) for s in out] if outliers else []
        return out + ([ArraySpec(scale_path(s.path), s.grows_along, scales, 0, "float32") for s in out] if hidden else []) + kept

    width = project or d
    specs = with_scales([ArraySpec(hidden_path("encoder", k), TOKENS, rows(width)[0], 0, hidden)
                         for k in layers["encoder"]], width)
    if project and not backbone.n_decoder_layers:
        specs += with_scales([ArraySpec(pooled_path(p, backbone.n_layers), EXAMPLES, rows(d)[0], 0, hidden)
                              for p in STORED_POOLINGS], d)
    if attention != "none" and topk:
        keys = "uint8" if max_length <= 256 else "int16"
        specs += [ArraySpec(attention_path(k), TOPK, att_row, att_axis, maps, topk) for k in layers["encoder"] if k]
        specs += [ArraySpec(attention_keys_path(k), TOPK, att_row, att_axis, keys, topk) for k in layers["encoder"] if k]
    elif attention != "none":
        layout = map_layout(backbone, attention, topk)
        specs += [ArraySpec(attention_path(k), layout, att_row, att_axis, maps) for k in layers["encoder"] if k]
    specs += with_scales([ArraySpec(hidden_path("decoder", k), EXAMPLES, rows(d)[0], 0, hidden) for k in layers["decoder"]], d)
    if attention != "none":
        specs += [ArraySpec(cross_attention_path(k), TOKENS, att_row, att_axis, maps) for k in layers["decoder"] if k]
    return specs


def plan_split(backbone: Backbone, task: TaskSpec, split: Split, max_length: int) -> SplitPlan:
    """Tokenize a split and order it longest first (ties keep source order): consecutive examples then
    make length-bucketed batches, with the least padding."""
    tokens = backbone.tokenize(task, split.rows, max_length)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    order = np.lexsort((np.arange(len(tokens)), -lengths))
    labels = np.array([split.rows[i]["label"] for i in order],
                      dtype=np.float32 if task.is_regression else np.int64)
    input_ids = np.fromiter((tok for i in order for tok in tokens[i]), dtype=np.int32, count=int(lengths.sum()))
    return SplitPlan(split.source, lengths[order], input_ids, labels, split.example_index[order])


def build_manifest(config: CacheConfig, backbone: Backbone, task: TaskSpec, protocol: str,
                   plans: dict[str, SplitPlan], layers: dict[str, list[int]],
                   label_ids: list[int] | None, projection: Projection | None = None,
                   outliers: Outliers | None = None) -> dict:
    return {
        "package_version": package_version(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone.describe(),
        "tokenizer": backbone.describe_tokenizer(),
        "task": {**task.as_manifest(), "label_token_ids": label_ids},
        "split_protocol": {"name": protocol, "seed": config.seed, "limit": config.limit,
                           "sources": {name: plan.source for name, plan in plans.items()}},
        "max_length": config.max_length,
        # The backbone's batches (longest first, this many) fix the values' last bits: a resume and
        # predict-side batch the same way.
        "batch_size": config.batch_size,
        "storage_dtype": config.dtype,
        "quantize": list(config.quantize),
        "attention": config.attention_mode,
        "attention_topk": {"k": config.topk, "residual": "renormalised"} if config.topk else None,
        "attention_layout": map_layout(backbone, config.attention_mode, config.topk),
        "projection": projection.describe() if projection else None,
        "outliers": outliers.describe() if outliers else None,
        "layers": layers,
        "splits": {name: {"n_examples": plan.n_examples, "n_tokens": int(plan.lengths.sum()),
                          "n_attention_pairs": int((plan.lengths**2).sum())} for name, plan in plans.items()},
    }


def map_layout(backbone: Backbone, attention: str, topk: int) -> str | None:
    """How the cache lays out its attention maps (format.MAP_LAYOUTS), None without maps."""
    if attention == "none":
        return None
    return TOPK if topk else TRIANGLE if backbone.causal else PAIRS


def _unpad(value: torch.Tensor, lengths: list[int], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Concatenate each example's real part: tokens [B, L, d] -> [Tb, d]; pairs [B, *h, L, L] -> [*h, Sb];
    triangle [B, *h, L, L] -> [*h, Sb] (each map's lower triangle); cross [B, *h, L] -> [*h, Tb]. Slice
    copies into one preallocated tensor are several times faster than boolean-mask indexing, and convert
    to the storage dtype in the same pass."""
    maps = kind in (PAIRS, TRIANGLE)
    sizes = [int(s) for s in np.diff(extent(kind, np.array(lengths)))] if maps else lengths
    if kind == "tokens":
        out = value.new_empty((sum(sizes), value.shape[-1]), dtype=dtype)
    else:
        out = value.new_empty((*value.shape[1:-2 if maps else -1], sum(sizes)), dtype=dtype)
    offset = 0
    for j, (n, size) in enumerate(zip(lengths, sizes)):
        if kind == "tokens":
            out[offset:offset + n].copy_(value[j, :n])
        elif kind == PAIRS:
            out[..., offset:offset + size].unflatten(-1, (n, n)).copy_(value[j, ..., :n, :n])
        elif kind == TRIANGLE:
            rows, cols = triangle_indices(n)
            out[..., offset:offset + size].copy_(value[j, ..., rows.to(value.device), cols.to(value.device)])
        else:
            out[..., offset:offset + n].copy_(value[j, ..., :n])
        offset += size
    return out


def _top_entries(maps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, A, L, L] -> the k largest entries of each row renormalised to sum to 1, and their key positions,
    both [B, A, L, min(k, L)] in key order. Padded keys hold 0, so an example of m < k tokens finds its m
    keys first (the rest is dropped by _unpad_topk)."""
    values, keys = maps.float().topk(min(k, maps.shape[-1]), dim=-1)
    keys, order = keys.sort(-1)
    values = values.gather(-1, order)
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny), keys


def _unpad_topk(value: torch.Tensor, lengths: list[int], k: int) -> torch.Tensor:
    """[B, A, L, K] -> [A, P]: each example's m query rows of min(k, m) entries, row-major."""
    return torch.cat([value[j, :, :n, :min(k, n)].reshape(value.shape[1], -1) for j, n in enumerate(lengths)], -1)


def _pooled(final: torch.Tensor, lengths: list[int], pooling: str) -> torch.Tensor:
    """[B, L, d] -> [B, d] float32: what READ's heads read of the final layer (format.pool)."""
    real = (torch.arange(final.shape[1], device=final.device)[None, :]
            < torch.tensor(lengths, device=final.device)[:, None])  # [B, L]
    return pool(final.float(), real, pooling)


def reduce_maps(maps: torch.Tensor, per_head: bool, k: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One layer's [B, A, L, L] self-attention maps as a cache keeps them, before rounding: their head mean
    unless `per_head`, and with `k` each query row's k largest entries and their keys (_top_entries)."""
    if not per_head:
        maps = maps.mean(1)
    return _top_entries(maps, k) if k else maps


def map_reduction(specs: list[ArraySpec]):
    """reduce_maps as `specs` store the self-attention maps, or None when they store none."""
    spec = next((s for s in specs if s.path.startswith("encoder/attention/")), None)
    return None if spec is None else functools.partial(reduce_maps, per_head=bool(spec.axis), k=spec.k)


@torch.inference_mode()
def run_batch(backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, lengths: list[int], specs: list[ArraySpec],
              dtype: str, projection=None, outliers=None) -> dict[str, np.ndarray]:
    """One padded batch through the backbone, as the arrays of `specs` (extract). Each layer's maps are
    reduced as the layer runs, so a long batch never holds every layer's dense maps at once."""
    return extract(backbone.forward(ids, mask, reduce=map_reduction(specs)), lengths, specs, dtype, projection,
                   outliers)


@torch.inference_mode()
def extract(out: BackboneOutput, lengths: list[int], specs: list[ArraySpec], dtype: str,
            projection: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
            outliers: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Drop padding and convert to each array's stored dtype (`dtype`, the storage dtype, unless the spec
    says int8 or uint8), on the backbone's device, before the copy out. Quantization and projection (layer
    -> mean [d], basis [K, d], on the device) see the unrounded float32 values, and --outliers' channels
    (hidden path -> int64 [K], on the device) are taken out before quantizing; attention rows are
    quantized before the padding goes, as whole rows. Self-attention maps are reduced (reduce_maps) here
    unless the backbone did it as it ran (out.reduced)."""
    logical = STORAGE_DTYPES[dtype][1]
    key_dtype = {spec.path: spec.dtype for spec in specs}
    arrays = {}
    for spec in specs:
        stack, kind, layer = spec.path.split("/")  # e.g. encoder/attention/3
        if kind.endswith(("_scale", "_keys", "_outliers")):
            continue  # written with their hidden or attention array
        layer = int(layer)
        stored = spec.dtype or dtype
        project = projection.get(layer) if projection and kind == "hidden" and stack == "encoder" else None
        wide = torch.float32 if spec.dtype or project is not None else logical
        if kind in ("hidden", "pooled_mean", "pooled_first"):
            if kind != "hidden":  # pooled final state [B, d]
                value = _pooled(out.encoder_hidden[layer], lengths, kind.removeprefix("pooled_"))
            elif stack == "encoder":
                value = _unpad(out.encoder_hidden[layer], lengths, "tokens", wide)  # [Tb, d]
                if project is not None:
                    mean, basis = project
                    value = (value - mean) @ basis.T  # [Tb, K]
            else:
                value = out.decoder_hidden[layer].to(wide)  # [B, d]
            if spec.dtype:
                if outliers:  # kept in the storage dtype; the quantizer sees 0 there
                    value, kept = split_outliers(value, outliers[spec.path])
                    arrays[outliers_path(spec.path)] = to_storage(kept, dtype)
                value, scale = quantize_hidden(value, spec.dtype)
                arrays[scale_path(spec.path)] = to_storage(scale, "float32")
        else:
            if kind == "attention":
                maps = out.encoder_attention[layer - 1]
                maps = maps if out.reduced else reduce_maps(maps, bool(spec.axis), spec.k)
            else:
                maps = out.cross_attention[layer - 1]  # [B, A, L]
                maps = maps if spec.axis else maps.mean(1)
            if spec.k:  # each query row's k largest entries, renormalised, in key order
                maps, keys = maps
                keys_spec = attention_keys_path(layer)
                arrays[keys_spec] = to_storage(_unpad_topk(keys, lengths, spec.k), key_dtype[keys_spec])
            if spec.dtype:
                maps = quantize_probabilities(maps)
            if spec.k:
                arrays[spec.path] = to_storage(_unpad_topk(maps, lengths, spec.k), stored)
                continue
            value = _unpad(maps, lengths, spec.grows_along if kind == "attention" else "cross",
                           maps.dtype if spec.dtype else logical)
        arrays[spec.path] = to_storage(value, stored)  # [Tb, d] | [B, d] | [A, Sb] | [Sb] | [A, Tb] | [Tb]
    return arrays


@dataclass
class SplitReport:
    task: str
    name: str
    n_examples: int
    n_tokens: int
    computed: int  # examples run through the backbone by this invocation
    seconds: float
    logical_bytes: int
    disk_bytes: int

    @property
    def compression_ratio(self) -> float:
        return self.logical_bytes / max(self.disk_bytes, 1)


def stored_bytes(cache, split: str) -> int:
    """Bytes a split takes on disk or in its bucket."""
    return sum(Location(cache).sizes(split).values())


def logical_bytes(specs: list[ArraySpec], plan: SplitPlan, dtype: str) -> int:
    return sum(int(np.prod(s.row, dtype=np.int64)) * int(plan.extent(s.grows_along, s.k)[-1])
               * ARRAY_DTYPES[s.dtype or dtype][0].itemsize for s in specs)


@dataclass
class Prepared:
    """Everything a run needs before the backbone's first batch: shared by caching and the live source."""

    task: TaskSpec
    backbone: Backbone
    plans: dict[str, SplitPlan]
    specs: list[ArraySpec]
    manifest: dict
    label_head: np.ndarray | None  # [C, d]
    projection: Projection | None = None  # --project K
    outliers: Outliers | None = None  # --outliers K
    sample_plan: SplitPlan | None = None  # --project K, --outliers K: the train rows they are fitted on


def load_task(config: CacheConfig) -> tuple[TaskSpec, dict]:
    """The task and its rows by source split: a GLUE task from the registry, or a user's --data."""
    if config.data:
        return user_task(config.task, load_rows(parse_data(config.data)), config.text_fields, config.label_field,
                         config.metric, config.labels)
    task = get_task(config.task)
    return task, load_source_splits(task, config.data_dir)


def open_backbone(config: CacheConfig, progress: bool = True) -> Backbone:
    return load_backbone(config.model, config.init, config.seed, config.device, progress=progress,
                         attentions=config.attention_mode != "none", name=config.name)


def prepare(config: CacheConfig, progress: bool = True, fit_projection: bool = True, backbone: Backbone | None = None,
            projection: Projection | None = None, choose_outliers: bool = True) -> Prepared:
    """Read and tokenize the task's splits, load the backbone (unless given) and, for --project, fit the
    basis (unless given, or kept by the cache being resumed, or --project-from); for --outliers, choose the
    channels (unless kept by the cache being resumed). With `fit_projection` or `choose_outliers` false that
    is left to the caller (a store fits one basis for all its tasks; torchrun's other ranks read rank 0's
    from the cache)."""
    task, source = load_task(config)
    protocol, splits = make_splits(task.name, source, config.seed)
    backbone = backbone or open_backbone(config, progress)
    layers = stored_layers(backbone, config.layers)

    def plan(name: str) -> SplitPlan:
        split = splits[name]
        if config.limit is not None:
            split = Split(split.name, split.source, split.rows[: config.limit], split.example_index[: config.limit])
        return plan_split(backbone, task, split, config.max_length)

    plans = {name: plan(name) for name in config.splits}
    sample = (plans["train"] if "train" in plans else plan("train")) if config.project or config.outliers else None
    if config.project and fit_projection and projection is None:  # fitted before anything is written; a resumed cache keeps its basis
        projection = resumed_projection(config) or shared_projection(config, backbone) or fit(
            backbone, sample, layers["encoder"], config.project, config.batch_size, config.seed, progress, task.name)
    outliers = None
    if config.outliers and choose_outliers:  # a resumed cache keeps its channels
        outliers = resumed(config, Outliers.of_cache) or choose(
            backbone, sample, layers, config.outliers, config.batch_size, config.seed, progress, task.name)
    head = backbone.label_head(task)
    manifest = build_manifest(config, backbone, task, protocol, plans, layers, head[0] if head else None, projection,
                              outliers)
    specs = array_specs(backbone, config.attention_mode, layers, config.quantize, config.topk, config.max_length,
                        config.project, config.outliers)
    return Prepared(task, backbone, plans, specs, manifest, head[1] if head else None, projection, outliers, sample)


def shared_projection(config: CacheConfig, backbone: Backbone) -> Projection | None:
    """--project-from CACHE: that cache's basis, when it is of this backbone and this K."""
    if config.project_from is None:
        return None
    try:
        reader = CacheReader(config.project_from)
    except CacheError as exc:
        raise InputError(f"--project-from: {exc}") from None
    theirs, projection = reader.manifest["backbone"], Projection.of_cache(reader)
    if projection is None or projection.k != config.project:
        raise InputError(f"--project-from {config.project_from} has no --project {config.project} basis "
                         f"(it has {stored_projection(reader.manifest) or 'none'})")
    if theirs["config_hash"] != backbone.describe()["config_hash"] or theirs["init"] != config.init:
        raise InputError(f"--project-from {config.project_from} was made from another backbone ({theirs['name']})")
    return projection


def resumed_projection(config: CacheConfig) -> Projection | None:
    """The basis of the cache a --resume continues, when it was made with the same --project K."""
    projection = resumed(config, Projection.of_cache)
    return projection if projection is not None and projection.k == config.project else None


def resumed(config: CacheConfig, read):
    """read(CacheReader) of the cache a --resume (or a store's --add) continues, or None when there is none:
    what it was fitted with stays (a differing setting is refused when the manifests are compared)."""
    if config.mode not in ("resume", "add") or not Location(config.cache_dir).exists("zarr.json"):
        return None
    return read(CacheReader(config.cache_dir))


@contextlib.contextmanager
def _locked(path, log):
    """The write lock of a cache or store (a second writer is refused, naming this one)."""
    with write_lock(path) as lock:
        if lock.took_over and log:
            log(f"{path}: {lock.took_over}")
        yield


def run(config: CacheConfig, progress: bool = True, log=None, ready: Prepared | None = None,
        locked: bool = False) -> list[SplitReport]:
    """Cache every split. Bad input fails in `prepare`, before anything is written; then the cache's
    write lock is taken (unless the caller holds its store's: `locked`). Under torchrun (WORLD_SIZE > 1)
    the ranks share every split shard by shard (cache_store.ranked), and a cache that ranks were writing
    is resumed that way whatever the number of processes."""
    world = current_world()
    if world.distributed or has_rank_records(config.cache_dir) and config.mode == "resume":
        return _run_ranked(config, world, progress, log, ready, locked)
    ready = ready or prepare(config, progress)
    projection = ready.projection.on(ready.backbone.device) if ready.projection else None
    with contextlib.nullcontext() if locked else _locked(config.cache_dir, log):
        writer = CacheWriter(config.cache_dir, ready.manifest, config.mode, shard_bytes=config.shard_bytes,
                             compressor=config.compressor)
        _write_root_arrays(writer, ready)
        reports = []
        for name, plan in ready.plans.items():
            split = writer.split(name, plan, ready.specs)
            # A resumed run restarts at the batch holding the first uncommitted example, so that every
            # batch, and so every value, is the one an uninterrupted run computes.
            first = split.start_example() // config.batch_size * config.batch_size
            starts = list(range(first, plan.n_examples, config.batch_size)) if not split.complete else []
            if starts:
                split.begin(first)
            reports.append(_cache_split(split, starts, ready, config, progress, projection))
        writer.finish()
    return reports


def run_store(configs: list[CacheConfig], progress: bool = True, log=None) -> list[SplitReport]:
    """Cache several tasks into one store (cache_store.store), in order: the backbone loads once, and every
    task's rows are read and tokenized before anything is written (bad input writes nothing). The store's
    manifest is written, or checked against this run's settings (--resume, --add), then each task is
    cached, resumed where a killed run stopped, or left as it is when complete. With --project one basis,
    fitted on every task's train rows, serves every task (a multi-task READ network needs one basis)."""
    first, world = configs[0], current_world()
    backbone = open_backbone(first, progress and world.leader)
    prepared = [prepare(config, progress and world.leader, fit_projection=False, backbone=backbone,
                        choose_outliers=world.leader) for config in configs]
    if first.project and world.leader:  # a resumed store keeps its basis
        kept = next((p for p in map(resumed_projection, configs) if p is not None), None)  # a task already cached
        projection = kept or shared_projection(first, backbone) or fit(
            backbone, {r.task.name: r.sample_plan for r in prepared}, stored_layers(backbone, first.layers)["encoder"],
            first.project, first.batch_size, first.seed, progress)
        for ready in prepared:
            ready.projection = projection
            ready.manifest["projection"] = projection.describe()
    task_mode = "resume" if first.mode in ("resume", "add") else "new"
    shared = shared_fields({**prepared[0].manifest, "storage": storage_record(first.shard_bytes,
                                                                                compressor=first.compressor)})
    reports = []
    with _locked(first.store_dir, log) if world.leader else contextlib.nullcontext():
        if world.leader:
            store = StoreWriter(first.store_dir, shared, first.mode, package_version())
            for config in configs:
                store.add_task(config.task)
        world.barrier()
        for config, ready in zip(configs, prepared):
            reports += run(replace(config, mode=task_mode), progress, log, ready, locked=True)
    return reports


def _write_root_arrays(writer: CacheWriter, ready: Prepared) -> None:
    if ready.label_head is not None:
        writer.write_label_head(ready.label_head)
    if ready.projection is not None:
        writer.write_projection(ready.projection.arrays())


def _run_ranked(config: CacheConfig, world: World, progress: bool, log, ready: Prepared | None = None,
                locked: bool = False) -> list[SplitReport]:
    """Rank 0 opens the cache (lock, manifest, split groups) while the others wait; every rank writes its
    shards of every split; rank 0 checks and completes each split once all are done."""
    leader = world.leader
    ready = ready or prepare(config, progress and leader, fit_projection=leader, choose_outliers=leader)
    with _locked(config.cache_dir, log) if leader and not locked else contextlib.nullcontext():
        if leader:
            writer = CacheWriter(config.cache_dir, ready.manifest, config.mode, shard_bytes=config.shard_bytes,
                             compressor=config.compressor)
            _write_root_arrays(writer, ready)
            for name, plan in ready.plans.items():  # each split's group, metadata arrays and records group
                open_records(writer.split(name, plan, ready.specs))
        world.barrier()
        if not leader:
            writer = CacheWriter.join(config.cache_dir)
            if config.project:  # rank 0 fitted the basis (or kept the resumed cache's); every rank uses it
                ready.projection = Projection.of_cache(CacheReader(config.cache_dir))
            if config.outliers:  # and chose the channels
                ready.outliers = Outliers.of_cache(CacheReader(config.cache_dir))
        projection = ready.projection.on(ready.backbone.device) if ready.projection else None
        splits = {name: writer.split(name, plan, ready.specs) for name, plan in ready.plans.items()}
        parts = {name: RankedSplit(split, world, config.batch_size) for name, split in splits.items()
                 if not split.complete}
        world.barrier()  # every rank has read the earlier records before any rank replaces its own
        reports = []
        for name, split in splits.items():
            part = parts.get(name)
            if part is not None:
                part.start()
            reports.append(_cache_split(part or split, part.batch_starts if part else [], ready, config,
                                        progress and leader, projection))
        world.barrier()
        if leader:
            for split in splits.values():
                finalize(split)
            writer.finish()
    # Every rank's count of examples run through the backbone, and the slowest rank's time.
    everyone = world.gather([(r.computed, r.seconds) for r in reports])
    for i, report in enumerate(reports):
        report.computed = sum(theirs[i][0] for theirs in everyone)
        report.seconds = max(theirs[i][1] for theirs in everyone)
        report.disk_bytes = stored_bytes(config.cache_dir, report.name)  # now that every rank is done
    return reports


def _cache_split(sink, starts: list[int], ready: Prepared, config: CacheConfig, progress: bool,
                 projection=None) -> SplitReport:
    """Run the backbone over the batches starting at `starts` and hand each batch's arrays to `sink` (a
    SplitWriter, or this rank's RankedSplit) on a background thread."""
    backbone, plan, specs, name = ready.backbone, sink.plan, ready.specs, sink.name
    outliers = ready.outliers.on(backbone.device) if ready.outliers else None
    pad_id = backbone.tokenizer.pad_token_id or 0
    attentions = config.attention_mode != "none"
    began = time.perf_counter()
    computed = 0
    if starts:
        # The examples this process runs (a resumed run's remainder, or a rank's part of the split).
        bar = tqdm(total=sum(min(s + config.batch_size, plan.n_examples) - s for s in starts), unit="ex",
                   desc=f"{config.task}/{name}", disable=not progress, dynamic_ncols=True)
        written = 0
        with BackgroundWriter(sink) as background, torch.inference_mode():
            for start in starts:
                stop = min(start + config.batch_size, plan.n_examples)
                ids, mask = pad_batch(plan, start, stop, pad_id)
                ids, mask = ids.to(backbone.device), mask.to(backbone.device)
                lengths = plan.lengths[start:stop].tolist()
                arrays = run_batch(backbone, ids, mask, lengths, specs, config.dtype, projection, outliers)
                background.put(arrays)
                written += sum(a.nbytes for a in arrays.values())
                computed += stop - start
                bar.update(stop - start)
                bar.set_postfix_str(f"{written / 2**20:.0f} MiB raw", refresh=False)
        bar.close()
    seconds = time.perf_counter() - began
    return SplitReport(config.task, name, plan.n_examples, int(plan.lengths.sum()), computed, seconds,
                       logical_bytes(specs, plan, config.dtype), stored_bytes(config.cache_dir, name))
