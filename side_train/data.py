"""Cached activations as READ inputs: a split held in memory, served as padded, length-bucketed batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache_store import CacheError, CacheReader, attention_path, cross_attention_path, hidden_path

from .read_model import ReadInputs, ReadSpec


def read_spec(cache: CacheReader, width: int, cell: str, recurrence: bool = True) -> ReadSpec:
    m = cache.manifest
    backbone, layers = m["backbone"], m["layers"]
    needed = {"encoder": list(range(backbone["n_layers"] + 1)),
              "decoder": list(range(backbone["n_decoder_layers"] + 1)) if backbone["n_decoder_layers"] else []}
    for stack, wanted in needed.items():
        missing = sorted(set(wanted[1:]) - set(layers[stack]))
        if missing:
            raise CacheError(f"{cache.path} lacks {stack} layers {missing}; READ reads every layer: "
                             "re-create the cache with --layers all")
    return ReadSpec(family=backbone["family"], d_model=backbone["d_model"], n_layers=backbone["n_layers"],
                    n_decoder_layers=backbone["n_decoder_layers"],
                    heads=backbone["n_heads"] if m["attention"] == "heads" else 1,
                    width=width, cell=cell, recurrence=recurrence)


def array_paths(spec: ReadSpec, attention: bool) -> list[str]:
    paths = [hidden_path("encoder", k) for k in range(1, spec.n_layers + 1)]
    paths += [attention_path(k) for k in range(1, spec.n_layers + 1)] if attention else []
    paths += [hidden_path("decoder", k) for k in range(1, spec.n_decoder_layers + 1)]
    paths += [cross_attention_path(k) for k in range(1, spec.n_decoder_layers + 1)] if attention else []
    return paths


@dataclass
class TrainBatch:
    index: torch.Tensor  # int64 [B]: positions in the split (cache order)
    labels: torch.Tensor  # [B]
    inputs: ReadInputs


class InMemorySplit:
    """Every array READ needs from one split, in memory in the stored dtype (bfloat16 by default)."""

    def __init__(self, cache: CacheReader, name: str, spec: ReadSpec):
        split = cache.split(name)
        self.name, self.spec = name, spec
        self.attention = cache.manifest["attention"] != "none"
        self.per_head = cache.manifest["attention"] == "heads"
        self.arrays = split.load_layers(array_paths(spec, self.attention))
        self.lengths = torch.from_numpy(split.lengths.copy())
        self.offsets = torch.from_numpy(split.offsets[:-1].copy())
        self.attention_offsets = torch.from_numpy(split.attention_offsets[:-1].copy())
        self.labels = torch.from_numpy(split.labels.copy())
        self.example_index = split.example_index.copy()
        self.n_examples = split.n_examples

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    def batch(self, index: torch.Tensor) -> TrainBatch:
        """Padded float32 inputs for examples `index` (any order; padding only up to this batch's longest)."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        pos = torch.arange(width)
        mask = pos[None, :] < lengths[:, None]  # [B, L]
        tokens = torch.where(mask, self.offsets[index][:, None] + pos[None, :], 0)  # [B, L] into T
        rows, cols = pos[:, None], pos[None, :]
        pair_mask = mask[:, :, None] & mask[:, None, :]  # [B, L, L]
        pairs = torch.where(pair_mask, self.attention_offsets[index][:, None, None]
                            + rows * lengths[:, None, None] + cols, 0)  # [B, L, L] into S
        spec, arrays = self.spec, self.arrays

        def tokens_of(path):  # [T, d] -> [B, L, d]
            return arrays[path].index_select(0, tokens.reshape(-1)).view(*tokens.shape, -1).float() * mask[..., None]

        def attention_of(path):  # [A, S] -> [B, A, L, L], or [S] -> [B, L, L]
            flat = arrays[path].index_select(-1, pairs.reshape(-1)).float()
            if self.per_head:
                return flat.view(-1, *pairs.shape).transpose(0, 1) * pair_mask[:, None]
            return flat.view(pairs.shape) * pair_mask

        def cross_of(path):  # [A, T] -> [B, A, 1, L], or [T] -> [B, 1, L]
            flat = arrays[path].index_select(-1, tokens.reshape(-1)).float()
            if self.per_head:
                return (flat.view(-1, *tokens.shape).transpose(0, 1) * mask[:, None]).unsqueeze(2)
            return (flat.view(tokens.shape) * mask).unsqueeze(1)

        n, n_dec = spec.n_layers, spec.n_decoder_layers
        inputs = ReadInputs(
            mask=mask,
            encoder_hidden=[tokens_of(hidden_path("encoder", k)) for k in range(1, n + 1)],
            encoder_attention=[attention_of(attention_path(k)) for k in range(1, n + 1)] if self.attention else None,
            decoder_hidden=[arrays[hidden_path("decoder", k)].index_select(0, index).float()[:, None]
                            for k in range(1, n_dec + 1)],
            cross_attention=([cross_of(cross_attention_path(k)) for k in range(1, n_dec + 1)]
                             if self.attention and n_dec else None),
        )
        return TrainBatch(index, self.labels[index], inputs)

    def batch_order(self, batch_size: int, shuffle: bool, seed: int = 0) -> list[torch.Tensor]:
        """Length-bucketed batches. Examples are stored longest first; shuffling permutes examples within
        windows of 20 batches of similar length, then the order of the batches, so every epoch sees new
        batches while padding stays small."""
        order = np.arange(self.n_examples)
        if shuffle:
            rng = np.random.default_rng(seed)
            window = 20 * batch_size
            order = np.concatenate([rng.permutation(order[i:i + window]) for i in range(0, len(order), window)])
        batches = [torch.from_numpy(order[i:i + batch_size].copy()) for i in range(0, len(order), batch_size)]
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches
