"""Equation (1) of the READ paper written out plainly: the definition the fast network is tested against.

One network, one example, no padding, no members, no fused products: nn.Linear-style products, torch's
own cell, and each attention head mixing its own slice of the side state. `read_model.py` computes the
same outputs fused, packed and for M members at once; `tests/test_read_model.py` checks every member
of a `ReadModel` against `reference_outputs` for T5 with per-head and head-mean maps and for an
encoder-only backbone, every cell, with and without recurrence, and widths the heads do not divide.

For one stack (the encoder; T5's decoder at its start position), layers i = 1..N:

    u_i    = tanh(F h_{i-1})                        # F: r -> r
    mix_i  = concat_a(sigma_i[a] @ (v W)[:, a's columns])   # v = u_i (encoder) or the encoder side's h_N (decoder)
    psi_i  = Phi u_i + Psi mix_i                    # the Joiner
    h_i    = Cell(Down [phi_i ; psi_i], h_{i-1})    # Down: d + r -> r;  h_0 = 0
    out    = phi_N + Up h_N                         # Up: r -> d, zero at the start

with the options: Down reads LayerNorm(phi_i) (`down_norm`); phi_N in `out` is sum_i softmax(w)_i phi_i
(`layer_mix`); out = s phi_N + (1 - s) Up h_N, s = sigmoid(z) (`output_gate`); the encoder side's h_N
becomes h_N + O softmax(q k^T / sqrt(r)) v, q, k, v = Q, K, V LayerNorm(h_N) (`token_mix`).

The heads read `out`: T5's decoder start position, or an encoder's tokens pooled (mean or first).
"""
from __future__ import annotations

import torch

from .read_model import CELLS, ReadSpec, head_slices


def reference_outputs(state: dict[str, torch.Tensor], spec: ReadSpec, example: dict[str, torch.Tensor],
                      task: str) -> torch.Tensor:
    """One task's head outputs [C] for one example.

    state: one member's weights in the checkpoint format (`ReadModel.member_state`); example: the
    example's arrays as `SplitReader.example` gives them from a cache with dense maps (`--attention
    heads` or `mean`): hidden [m, d], attention [A, m, m] or [m, m], decoder [d], cross [A, m] or [m]."""
    r = spec.width

    def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
        bias = state.get(prefix + ".bias")
        return x @ state[prefix + ".weight"].T + (bias if bias is not None else 0)

    def mixed(attention: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [A, Lq, Lk] or [Lq, Lk]; v [Lk, r]
        if attention.dim() == 2:
            return attention @ v
        return torch.cat([attention[a] @ v[:, s:s + n] for a, (s, n) in enumerate(head_slices(r, len(attention)))], -1)

    def stack(name: str, hidden: list[torch.Tensor], attention: list[torch.Tensor], values=None) -> torch.Tensor:
        cell = CELLS[spec.cell].torch_cell(r, r)
        h = torch.zeros(hidden[0].shape[0], r)
        c = torch.zeros_like(h)
        for i, phi in enumerate(hidden):
            p = f"{name}.layers.{i if not spec.recurrence else 0}."
            cell.load_state_dict({k.removeprefix(p + "cell."): v for k, v in state.items() if k.startswith(p + "cell.")})
            u = torch.tanh(linear(p + "joiner.F.0", h))
            psi = linear(p + "joiner.Phi", u) + linear(p + "joiner.Psi", mixed(
                attention[i], linear(p + "joiner.W", u if values is None else values)))
            if spec.down_norm:
                phi = normalised(phi)
            x = linear(p + "down", torch.cat([phi, psi], -1))
            if CELLS[spec.cell].paired_state:
                h, c = cell(x, (h, c))
            else:
                h = cell(x, h)
        return h

    def normalised(x: torch.Tensor) -> torch.Tensor:  # LayerNorm without affine, over the last axis
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    def join(base: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:  # out, with or without the gate
        if not spec.output_gate:
            return base + correction
        s = torch.sigmoid(state["gate"])
        return s * base + (1 - s) * correction

    layers = range(1, spec.n_layers + 1)
    encoder = [example[f"encoder/hidden/{k}"].float() for k in layers]
    maps = [example[f"encoder/attention/{k}"].float() for k in layers]
    h_encoder = stack("encoder", encoder, maps)
    if spec.token_mix:
        q, k, v = linear("token_mix.qkv", normalised(h_encoder)).chunk(3, -1)  # [m, r] each
        h_encoder = h_encoder + linear("token_mix.out", torch.softmax(q @ k.T / r ** 0.5, -1) @ v)
    if not spec.n_decoder_layers:
        base = encoder[-1]  # [m, d]
        if spec.layer_mix:  # every layer's state, weighed by the softmax of the learned w
            base = sum(w * phi for w, phi in zip(torch.softmax(state["layer_weights"], -1), encoder))
        corrected = join(base, linear("encoder.up", h_encoder))  # [m, d]
        features = {"mean": corrected.mean(0), "first": corrected[0], "last": corrected[-1]}[spec.pooling]
    else:
        layers = range(1, spec.n_decoder_layers + 1)
        decoder = [example[f"decoder/hidden/{k}"].float().reshape(1, -1) for k in layers]  # [1, d]
        cross = [example[f"decoder/cross_attention/{k}"].float().unsqueeze(-2) for k in layers]  # [A, 1, m] or [1, m]
        features = join(decoder[-1], linear("decoder.up", stack("decoder", decoder, cross, h_encoder)))[0]
    return linear(f"heads.{task}", features)
