"""`cache-activations --outliers K`: with quantized hidden states (`--quantize hidden` or `hidden4`), each
stored layer's K channels of largest magnitude are kept in the storage dtype beside the quantized rest.

Why: a few channels of a transformer's hidden states are far larger than the rest (the activation outliers
of LLM.int8), and an absmax scale set by one of them leaves the other channels of its row or group few
steps. The channels are chosen once per layer, on the seeded train sample (pipeline.sample), by their
largest magnitude there, and recorded in the manifest; the quantized array holds 0 at them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_store.format import hidden_path
from cache_store.writer import SplitPlan

from .backbones import Backbone
from .errors import InputError
from .sample import draw, forward


@dataclass
class Outliers:
    """Per stored hidden array (e.g. encoder/hidden/3): its K kept channels, ascending."""

    channels: dict[str, list[int]]
    sample: dict

    @property
    def k(self) -> int:
        return len(next(iter(self.channels.values())))

    def describe(self) -> dict:
        """The manifest's `outliers` entry."""
        return {"k": self.k, "channels": self.channels, "sample": self.sample}

    @classmethod
    def of_cache(cls, reader) -> "Outliers | None":
        """The channels a cache (a CacheReader) keeps, or None when it was made without --outliers."""
        return cls.of_manifest(reader.manifest)

    @classmethod
    def of_manifest(cls, manifest: dict) -> "Outliers | None":
        described = manifest.get("outliers")
        return None if not described else cls({p: list(c) for p, c in described["channels"].items()}, described["sample"])

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {path: torch.tensor(c, dtype=torch.int64, device=device) for path, c in self.channels.items()}


@torch.inference_mode()
def choose(backbone: Backbone, plans: SplitPlan | dict[str, SplitPlan], layers: dict[str, list[int]], k: int,
           batch_size: int, seed: int, progress: bool = True, plan_task: str | None = None) -> Outliers:
    """Each stored layer's k channels of largest magnitude over the sample's real tokens (T5's decoder
    layers: over its examples' start positions)."""
    d = backbone.d_model
    if not 0 < k < d:
        raise InputError(f"--outliers K must lie in 1..{d - 1} (below the backbone's width), got {k}")
    sample = draw(plans, seed, plan_task)
    largest = {hidden_path(stack, layer): torch.zeros(d) for stack, kept in layers.items() for layer in kept}
    tokens = 0
    for out, real in forward(backbone, sample, batch_size, progress, "choose --outliers"):
        tokens += int(real.sum())
        for stack, states in (("encoder", out.encoder_hidden), ("decoder", out.decoder_hidden)):
            for layer in layers[stack]:
                x = states[layer][real] if stack == "encoder" else states[layer]  # [t, d] | [B, d]
                path = hidden_path(stack, layer)
                largest[path] = torch.maximum(largest[path], x.float().abs().amax(0).cpu())
    channels = {path: sorted(m.topk(k).indices.tolist()) for path, m in largest.items()}
    return Outliers(channels, sample.describe(tokens))
