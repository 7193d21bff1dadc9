"""Train-time augmentation of the cached activations READ reads: the cache makes it nearly free, since the
activations are data. Never applied at evaluation or in predict-side.

- Token cutoff (`cutoff`, after Cutoff, arXiv 2009.13818): each token but an example's first is dropped
  with probability p from everything READ reads. Its hidden state leaves every layer's packed rows, and
  its attention row and column leave every map, each remaining row renormalised to its former sum. The
  example is then read as the shorter example it would have been, and the pooled mean covers the kept
  tokens only.
- Gaussian noise (`noise`): every layer's hidden states plus noise of `noise` standard deviations of
  that layer's states in the batch.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from cache_store.format import dequantize_probabilities

from .read_model import Packing, ReadInputs


def token_cutoff(inputs: ReadInputs, rate: float) -> ReadInputs:
    """`inputs` with about `rate` of each example's tokens dropped (never the first). Projected caches'
    stored pooled states (`inputs.pooled`) cover every token and are kept as they are."""
    if rate <= 0:
        return inputs
    packing = inputs.packing
    mask = packing.mask  # [B, L]
    keep = mask & (torch.rand(mask.shape, device=mask.device) >= rate)
    keep[:, 0] = mask[:, 0]  # an example keeps at least its first token
    lengths = keep.sum(1)  # [B]
    kept = Packing.of(lengths.cpu()).to(mask.device)
    # positions [B, L'] of each example's kept tokens in the old layout (padding points at position 0)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :kept.mask.shape[1]]
    order = torch.where(kept.mask, order, 0)
    flat_keep = keep.flatten()[packing.real]  # [T]: which packed tokens stay

    def maps(attention: torch.Tensor, queries: bool) -> torch.Tensor:  # [B, (A,) Lq, Lk], float or uint8 units
        wide = dequantize_probabilities(attention) if attention.dtype == torch.uint8 else attention.float()
        lead = (1,) * (wide.dim() - 3)  # the heads axis, if any
        before = wide.sum(-1, keepdim=True)  # each row's sum before the cut (1 for a full row)
        keys = order.view(order.shape[0], *lead, 1, -1)
        cut = wide.gather(-1, keys.expand(*wide.shape[:-1], keys.shape[-1]))
        cut = cut * kept.mask.view(cut.shape[0], *lead, 1, -1)
        if queries:
            rows = order.view(order.shape[0], *lead, -1, 1)
            cut = cut.gather(-2, rows.expand(*cut.shape[:-2], rows.shape[-2], cut.shape[-1]))
            before = before.gather(-2, rows.expand(*before.shape[:-2], rows.shape[-2], 1))
            cut = cut * kept.mask.view(cut.shape[0], *lead, -1, 1)
        total = cut.sum(-1, keepdim=True)
        return torch.where(total > 0, cut * (before / total.clamp_min(1e-30)), cut)

    return replace(
        inputs, packing=kept,
        encoder_hidden=[h[flat_keep] for h in inputs.encoder_hidden],
        encoder_attention=None if inputs.encoder_attention is None else
        [maps(a, queries=True) for a in inputs.encoder_attention],
        cross_attention=None if inputs.cross_attention is None else
        [maps(a, queries=False) for a in inputs.cross_attention])


def gaussian_noise(inputs: ReadInputs, scale: float) -> ReadInputs:
    """Every cached hidden state plus N(0, (scale * its layer's standard deviation over the batch)^2)."""
    if scale <= 0:
        return inputs
    noisy = lambda xs: [x + torch.randn_like(x) * (scale * x.std()) for x in xs]  # noqa: E731
    return replace(inputs, encoder_hidden=noisy(inputs.encoder_hidden), decoder_hidden=noisy(inputs.decoder_hidden))


def augment(inputs: ReadInputs, cutoff: float, noise: float) -> ReadInputs:
    if noise > 0:  # noise on float32 states, not on their stored bfloat16
        inputs = inputs.widened()
    return gaussian_noise(token_cutoff(inputs, cutoff), noise)
