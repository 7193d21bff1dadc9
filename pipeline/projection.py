"""`cache-activations --project K`: each encoder layer's hidden states stored as K coordinates in a PCA
basis fitted on a seeded sample of the train split, z = (h - mean) @ basis.T, so that h ~ mean + z @ basis.

Why it is enough for READ: the side network reads encoder hidden states only through Down, a linear map,
and Down(h) = Down'(z) + a constant for h in the basis's span; the K directions of largest variance are
the ones Down can use most. What the heads read is kept at full width instead (format.pooled_path): the
final layer's mean and first token per example for encoder-only backbones (T5's decoder start-position
states are per example and stay full width anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache_store.format import block_digest, projection_paths
from cache_store.writer import SplitPlan

from .backbones import Backbone
from .errors import InputError
from .sample import draw, forward


@dataclass
class Projection:
    """Per stored encoder layer: mean float32 [d] and basis float32 [K, d] (orthonormal rows, largest
    variance first, each row's largest-magnitude entry positive so that a refit gives the same signs)."""

    mean: dict[int, np.ndarray]
    basis: dict[int, np.ndarray]
    explained: dict[int, float]  # the share of the sample's variance the K directions keep
    sample: dict

    @property
    def k(self) -> int:
        return next(iter(self.basis.values())).shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """What the cache stores at its root (format.projection_paths)."""
        out = {}
        for layer in self.basis:
            mean_at, basis_at = projection_paths(layer)
            out[mean_at], out[basis_at] = self.mean[layer], self.basis[layer]
        return out

    def describe(self) -> dict:
        """The manifest's `projection` entry."""
        arrays = self.arrays()
        return {"k": self.k, "method": "pca", "sample": self.sample,
                "explained_variance": {str(k): round(v, 6) for k, v in self.explained.items()},
                "digest": block_digest(np.concatenate([arrays[p].ravel() for p in sorted(arrays)]))}

    def on(self, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {layer: (torch.from_numpy(self.mean[layer]).to(device), torch.from_numpy(self.basis[layer]).to(device))
                for layer in self.basis}

    @classmethod
    def of_cache(cls, reader) -> "Projection | None":
        """The basis a cache (a CacheReader) stores, or None when it was made without --project."""
        arrays = reader.projection_arrays()
        return None if arrays is None else cls.from_arrays(arrays, reader.manifest["projection"])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], described: dict) -> "Projection":
        """The projection a cache (or a READ checkpoint) stores, with its manifest entry."""
        layers = sorted({int(p.rsplit("/", 1)[1]) for p in arrays})
        mean = {k: np.asarray(arrays[projection_paths(k)[0]], np.float32) for k in layers}
        basis = {k: np.asarray(arrays[projection_paths(k)[1]], np.float32) for k in layers}
        explained = {int(k): v for k, v in described["explained_variance"].items()}
        return cls(mean, basis, explained, described["sample"])


@torch.inference_mode()
def fit(backbone: Backbone, plans: SplitPlan | dict[str, SplitPlan], layers: list[int], k: int, batch_size: int,
        seed: int, progress: bool = True, plan_task: str | None = None) -> Projection:
    """PCA of each layer's hidden states over the real tokens of the seeded train sample (pipeline.sample):
    of one plan (of task `plan_task`), or shared evenly between several tasks' plans ({task: plan}: one basis
    for a store's tasks, which a multi-task READ network reads); moments in float64."""
    d = backbone.d_model
    if not 0 < k <= d:
        raise InputError(f"--project K must lie in 1..{d} (the backbone's width), got {k}")
    sample = draw(plans, seed, plan_task)
    sums = {layer: torch.zeros(d, dtype=torch.float64) for layer in layers}
    grams = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in layers}
    tokens = 0
    for out, real in forward(backbone, sample, batch_size, progress, "fit --project"):
        tokens += int(real.sum())
        for layer in layers:
            x = out.encoder_hidden[layer][real].double().cpu()  # [t, d]
            sums[layer] += x.sum(0)
            grams[layer] += x.T @ x
    mean, basis, explained = {}, {}, {}
    for layer in layers:
        mu = sums[layer] / tokens
        covariance = grams[layer] / tokens - torch.outer(mu, mu)
        variances, vectors = torch.linalg.eigh(covariance)  # ascending
        top = vectors[:, -k:].flip(-1).T  # [K, d], largest variance first
        top *= torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        mean[layer], basis[layer] = mu.float().numpy(), top.float().contiguous().numpy()
        explained[layer] = float(variances[-k:].sum() / variances.clamp_min(0).sum())
    return Projection(mean, basis, explained, sample.describe(tokens))
