"""Live activation sources: the frozen backbone computes, for any examples, the arrays a cache would hold
(same names and ragged layout, nothing written). Stage two's command line (side_train/cli.py) imports
them for these two paths only:

- `online` (`train-side --online`): a task's splits, in float32, nothing rounded;
- `predictor` (`predict-side`): new rows of text, rounded to the storage dtype of the cache a READ
  model was trained from, so that it sees what it saw in training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cache_store.format import differences, from_storage, stored_projection, stored_topk
from cache_store.writer import SplitPlan

from .backbones import Backbone, load_backbone
from .config import LOSSLESS, CacheConfig
from .errors import InputError
from .job import Prepared, array_specs, plan_split, prepare, run_batch
from .outliers import Outliers
from .padding import pad_examples
from .projection import Projection
from .splits import Split
from .tasks import TaskSpec


@torch.inference_mode()
def compute(backbone: Backbone, plan: SplitPlan, index, specs, dtype: str, projection=None,
            outliers=None) -> dict[str, torch.Tensor]:
    """Every array for examples `index` of a plan, from one backbone pass, concatenated in that order
    along the ragged axis, rounded to `dtype` (and projected, its outlier channels kept) as a cache stores it."""
    index = np.asarray(index)
    ids, mask = pad_examples(plan, index, backbone.tokenizer.pad_token_id or 0)
    arrays = run_batch(backbone, ids.to(backbone.device), mask.to(backbone.device), plan.lengths[index].tolist(),
                       specs, dtype, projection, outliers)
    stored = {spec.path: spec.dtype or dtype for spec in specs}
    return {path: from_storage(value, stored[path]) for path, value in arrays.items()}


class LiveSplit:
    """A split whose activations are computed on demand, `forward_passes` counting backbone calls."""

    def __init__(self, ready: Prepared, name: str):
        self.ready, self.name = ready, name
        plan = ready.plans[name]
        self.plan = plan
        self.lengths, self.labels, self.example_index = plan.lengths, plan.labels, plan.example_index
        self.n_examples = plan.n_examples
        self.forward_passes = 0

    def compute(self, index) -> dict[str, torch.Tensor]:
        """Every array for examples `index`, concatenated in that order along the ragged axis."""
        self.forward_passes += 1
        return compute(self.ready.backbone, self.plan, index, self.ready.specs, "float32")


class LiveSource:
    """An ActivationSource (cache_store/source.py) whose splits compute their arrays with the backbone."""

    live = True

    def __init__(self, config: CacheConfig):
        self.ready = prepare(config)
        self.manifest = {**self.ready.manifest, "storage_dtype": "float32", "format_version": None}
        self.path = Path(f"online:{self.manifest['backbone']['name']}/{config.task}")

    def label_head(self) -> torch.Tensor | None:
        head = self.ready.label_head
        return None if head is None else torch.from_numpy(head)

    def split(self, name: str) -> LiveSplit:
        return LiveSplit(self.ready, name)


def open_online(model: str, task: str, data_dir=None, limit=None, init: str = "pretrained", seed: int = 0,
                device: str = "auto", max_length: int = 128, attention: str = "heads") -> LiveSource:
    return LiveSource(CacheConfig(task=task, model=model, init=init, seed=seed, data_dir=data_dir, limit=limit,
                                  device=device, max_length=max_length, dtype="float32",
                                  **{**LOSSLESS, "attention": attention}))


class Predictor:
    """The backbone a READ checkpoint was trained on, computing activations for new rows of text as its
    cache stored them. `forward_passes` and `examples_forwarded` count the backbone's work."""

    def __init__(self, model: str, manifest: dict, device: str = "auto", progress: bool = True,
                 projection: dict[str, np.ndarray] | None = None):
        self.manifest = manifest
        backbone = manifest["backbone"]
        self.backbone = load_backbone(model, backbone["init"], backbone["init_seed"] or 0, device,
                                      manifest["attention"] != "none", progress)
        found = differences({"backbone": self.backbone.describe(), "tokenizer": self.backbone.describe_tokenizer()},
                            {"backbone": backbone, "tokenizer": manifest["tokenizer"]})
        found = [d for d in found if not d.startswith(("backbone.name", "backbone.revision"))]
        if found:
            raise InputError(f"--model {model} is not the backbone this READ model was trained on ("
                             + "; ".join(d.replace("cache has", "--model has").replace("asked for", "training had")
                                         for d in found[:3]) + "); give the model folder that made its cache")
        outliers = Outliers.of_manifest(manifest)  # the channels the cache kept beside its quantized states
        self.specs = array_specs(self.backbone, manifest["attention"], manifest["layers"],
                                 tuple(manifest.get("quantize", ())), stored_topk(manifest), manifest["max_length"],
                                 stored_projection(manifest), outliers.k if outliers else 0)
        self.outliers = outliers.on(self.backbone.device) if outliers else None
        self.projection = None
        if stored_projection(manifest):  # the cache's basis, which training's checkpoint carries
            if projection is None:
                raise InputError("this READ model was trained on a --project cache; predict-side needs its basis "
                                 "(projection.safetensors in the run folder)")
            basis = Projection.from_arrays(projection, manifest["projection"])
            if basis.describe()["digest"] != manifest["projection"]["digest"]:
                raise InputError("projection.safetensors is not the basis of the cache this READ model was "
                                 "trained on; retrain it")
            self.projection = basis.on(self.backbone.device)
        self.device = self.backbone.device  # predict-side runs READ here too
        self.batch_size = manifest.get("batch_size", 32)  # the cache's backbone batches
        self.forward_passes = 0
        self.examples_forwarded = 0

    def plan(self, task_manifest: dict, rows: list[dict]) -> SplitPlan:
        """Tokenize rows as the cache of `task_manifest` did, longest first (ties in input order), as
        caching orders a split; the plan's example_index gives each example's position in `rows`."""
        task = TaskSpec.from_manifest(task_manifest)  # as the cache recorded it: a GLUE task or a user's
        rows = [{**row, "label": 0} for row in rows]  # new text has no labels; the plan wants some
        split = Split("input", "input", rows, np.arange(len(rows), dtype=np.int64))
        return plan_split(self.backbone, task, split, self.manifest["max_length"])

    def compute(self, plan: SplitPlan, index) -> dict[str, torch.Tensor]:
        """Every array for examples `index`, the backbone run in the cache's batch size (so the values'
        last bits are the cache's), the parts joined along each array's ragged axis."""
        index = np.asarray(index)
        parts = []
        for start in range(0, len(index), self.batch_size):
            chunk = index[start:start + self.batch_size]
            parts.append(compute(self.backbone, plan, chunk, self.specs, self.manifest["storage_dtype"],
                                 self.projection, self.outliers))
            self.forward_passes += 1
            self.examples_forwarded += len(chunk)
        return {spec.path: torch.cat([p[spec.path] for p in parts], dim=spec.axis) for spec in self.specs}
