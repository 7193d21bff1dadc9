"""Same-shape READ models trained together: a sweep's models that share cell, width and recurrence (and a
seed's batches) become one `StackedRead` whose every parameter holds all M members, [M, ...].

Each product then runs once for all members: the largest, Down on the cached states phi (d -> r), as one
wide product phi @ [W_1 .. W_M] that reads phi once; the attention mix as one product of the cached
maps with all members' side states side by side; the rest as batched products. Members stay independent
(no product mixes two members), so each trains as it would alone, up to float rounding.

The state dict has ReadModel's keys with a leading member axis: `member_state(m)` is member m's ReadModel
state dict, and `StackedRead.from_models` stacks freshly built ReadModels (so initialisation is the one
a single run gets). `StackedAdamW` is torch's AdamW (decoupled weight decay, bias correction) with one
learning rate per member, and members that have stopped left untouched.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .read_model import ReadInputs, ReadModel, ReadSpec, _Mix, pool


class StackedLinear(nn.Module):
    """M linear maps: weight [M, out, in], bias [M, out]."""

    def __init__(self, members: int, inputs: int, outputs: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, outputs, inputs))
        self.bias = nn.Parameter(torch.empty(members, outputs)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, N, in] (each member its own) -> [M, N, out]."""
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def shared_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, in], the same for every member, times each member's weight [M, out, in] -> [M, N, out],
    as one product with the members' outputs side by side."""
    members, outputs, inputs = weight.shape
    y = x @ weight.reshape(members * outputs, inputs).T  # [N, M*out]
    return y.view(-1, members, outputs).transpose(0, 1)


def mix_stacked(attention: torch.Tensor | None, values: torch.Tensor, heads: int) -> torch.Tensor | None:
    """mix_states for all members at once. attention: [B, A, Lq, Lk] or [B, Lq, Lk], shared;
    values: [M, B, Lk, r]; returns [M, B, Lq, r]. The members' values go side by side in the last
    axis, so the maps are multiplied (and widened from bfloat16) once for all members."""
    if attention is None:
        return None
    members, batch, keys, width = values.shape
    if attention.dim() == 3:
        side = values.permute(1, 2, 0, 3).reshape(batch, keys, members * width)  # [B, Lk, M*r]
        return _Mix.apply(attention, side).view(batch, -1, members, width).permute(2, 0, 1, 3)
    c = width // heads
    side = values.view(members, batch, keys, heads, c).permute(1, 3, 2, 0, 4).reshape(batch, heads, keys, -1)
    mixed = _Mix.apply(attention, side)  # [B, A, Lq, M*c]
    queries = mixed.shape[2]
    return mixed.view(batch, heads, queries, members, c).permute(3, 0, 2, 1, 4).reshape(members, batch, queries, width)


class StackedCell(nn.Module):
    """M rnn | gru | lstm cells with PyTorch's gate layout and equations (RNNCell is tanh)."""

    GATES = {"rnn": 1, "gru": 3, "lstm": 4}

    def __init__(self, members: int, width: int, kind: str):
        super().__init__()
        self.kind = kind
        gates = self.GATES[kind] * width
        self.weight_ih = nn.Parameter(torch.empty(members, gates, width))
        self.weight_hh = nn.Parameter(torch.empty(members, gates, width))
        self.bias_ih = nn.Parameter(torch.empty(members, gates))
        self.bias_hh = nn.Parameter(torch.empty(members, gates))

    def forward(self, x: torch.Tensor, state):
        """x [M, N, r]; state [M, N, r], or (h, c) for lstm."""
        h = state[0] if self.kind == "lstm" else state
        gi = torch.baddbmm(self.bias_ih.unsqueeze(1), x, self.weight_ih.transpose(1, 2))
        gh = torch.baddbmm(self.bias_hh.unsqueeze(1), h, self.weight_hh.transpose(1, 2))
        if self.kind == "rnn":
            return torch.tanh(gi + gh)
        if self.kind == "gru":
            i_r, i_z, i_n = gi.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return (1 - z) * n + z * h
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class StackedJoiner(nn.Module):
    def __init__(self, members: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.F = nn.Sequential(StackedLinear(members, width, width), nn.Tanh())
        self.W = StackedLinear(members, width, width, bias=False)
        self.Phi = StackedLinear(members, width, width)
        self.Psi = StackedLinear(members, width, width)

    def forward(self, h_prev, attention, values=None):
        """h_prev [M, B, L, r]; values [M, B, Lk, r] or None (then u itself); returns psi [M, B*L, r]."""
        members, batch, length, width = h_prev.shape
        u = self.F(h_prev.reshape(members, -1, width))  # [M, B*L, r]
        source = u if values is None else values.reshape(members, -1, width)
        mixed = mix_stacked(attention, self.W(source).view(members, batch, -1, width), self.heads)
        psi = self.Phi(u)
        return psi + self.Psi(mixed.reshape(members, -1, width)) if mixed is not None else psi


class StackedLayer(nn.Module):
    def __init__(self, members: int, d_model: int, width: int, heads: int, cell: str):
        super().__init__()
        self.d_model, self.is_lstm = d_model, cell == "lstm"
        self.joiner = StackedJoiner(members, width, heads)
        self.down = StackedLinear(members, d_model + width, width)
        self.cell = StackedCell(members, width, cell)

    def forward(self, phi, attention, state, values=None):
        """phi [B, L, d] (shared); state [M, B, L, r] or an (h, c) pair of them."""
        h_prev = state[0] if self.is_lstm else state
        shape = h_prev.shape
        psi = self.joiner(h_prev, attention, values)  # [M, B*L, r]
        weight = self.down.weight  # [M, r, d + r]: Down(concat(phi, psi)) as two products
        x = shared_product(phi.reshape(-1, self.d_model), weight[:, :, :self.d_model]) + torch.baddbmm(
            self.down.bias.unsqueeze(1), psi, weight[:, :, self.d_model:].transpose(1, 2))
        flat = tuple(s.reshape(shape[0], -1, shape[-1]) for s in state) if self.is_lstm \
            else state.reshape(shape[0], -1, shape[-1])
        new = self.cell(x, flat)
        return tuple(s.view(shape) for s in new) if self.is_lstm else new.view(shape)


class StackedStack(nn.Module):
    def __init__(self, members: int, n_layers: int, d_model: int, width: int, heads: int, cell: str,
                 recurrence: bool, output: bool = True):
        super().__init__()
        self.members, self.n_layers, self.width, self.is_lstm = members, n_layers, width, cell == "lstm"
        self.layers = nn.ModuleList(StackedLayer(members, d_model, width, heads, cell)
                                    for _ in range(1 if recurrence else n_layers))
        self.up = StackedLinear(members, width, d_model) if output else None

    def forward(self, hidden, attention, values=None):
        """hidden: phi_1..phi_N [B, L, d]; returns (out [M, B, L, d] or None, h_N [M, B, L, r])."""
        zeros = hidden[0].new_zeros(self.members, *hidden[0].shape[:-1], self.width)
        state = (zeros, zeros) if self.is_lstm else zeros
        for i in range(self.n_layers):
            layer = self.layers[min(i, len(self.layers) - 1)]
            state = layer(hidden[i], attention[i] if attention is not None else None, state, values)
        h_last = state[0] if self.is_lstm else state
        if self.up is None:
            return None, h_last
        members, batch, length, width = h_last.shape
        return hidden[-1] + self.up(h_last.reshape(members, -1, width)).view(members, batch, length, -1), h_last


class StackedRead(nn.Module):
    """M ReadModels of one spec, their parameters stacked; heads: task -> StackedLinear (d -> C)."""

    def __init__(self, spec: ReadSpec, members: int, outputs: dict[str, int]):
        super().__init__()
        self.spec, self.members = spec, members
        self.encoder = StackedStack(members, spec.n_layers, spec.d_model, spec.width, spec.heads, spec.cell,
                                    spec.recurrence, output=not spec.n_decoder_layers)
        self.decoder = (StackedStack(members, spec.n_decoder_layers, spec.d_model, spec.width, spec.heads,
                                     spec.cell, spec.recurrence) if spec.n_decoder_layers else None)
        self.heads = nn.ModuleDict({name: StackedLinear(members, spec.d_model, n) for name, n in outputs.items()})
        self.dropout = nn.Dropout(spec.dropout)  # independent masks per member, as alone

    @classmethod
    def from_models(cls, models: list[ReadModel]) -> "StackedRead":
        first = models[0]
        stacked = cls(first.spec, len(models), {name: head.out_features for name, head in first.heads.items()})
        states = [m.state_dict() for m in models]
        stacked.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
        return stacked.to(next(first.parameters()).device)

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights as a ReadModel state dict (copies)."""
        return {k: v[m].detach().clone() for k, v in self.state_dict().items()}

    def features(self, inputs: ReadInputs) -> torch.Tensor:
        """[M, B, d]: what each member's heads read."""
        encoded, h_last = self.encoder(inputs.encoder_hidden, inputs.encoder_attention)
        if self.decoder is None:
            return self.dropout(pool(encoded, inputs.mask, self.spec.pooling))
        decoded, _ = self.decoder(inputs.decoder_hidden, inputs.cross_attention, values=h_last)
        return self.dropout(decoded[:, :, 0])

    def forward(self, inputs: ReadInputs, task: str) -> torch.Tensor:
        """[M, B, C] outputs of one task's heads."""
        return self.heads[task](self.features(inputs))


class StackedAdamW:
    """torch.optim.AdamW's update (amsgrad off) over stacked parameters, with learning rates [M] and a
    mask of the members still training; the others keep their weights and moments."""

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.steps = 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, active: torch.Tensor) -> None:
        """lrs, active: [M] (float, bool)."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.steps, math.sqrt(1 - beta2 ** self.steps)
        everyone = bool(active.all())  # the usual case: update in place, no masking copies
        for p, (m, v) in zip(self.params, self.moments):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr = lrs.view(shape).to(p.dtype)
            if everyone:
                p.mul_(1 - lr * self.weight_decay)
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.sub_((lr / correction1) * m / (v.sqrt() / correction2 + self.eps))
                continue
            keep = active.view(shape)
            grad = torch.where(keep, p.grad, 0)  # a stopped member's gradient (perhaps NaN) is not used
            m.copy_(torch.where(keep, m.lerp(grad, 1 - beta1), m))
            v.copy_(torch.where(keep, v * beta2 + (1 - beta2) * grad * grad, v))
            updated = p * (1 - lr * self.weight_decay) - (lr / correction1) * m / (v.sqrt() / correction2 + self.eps)
            p.copy_(torch.where(keep, updated, p))

    def state_dict(self) -> dict:
        return {"steps": self.steps, "moments": [(m.clone(), v.clone()) for m, v in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for (m, v), (m_saved, v_saved) in zip(self.moments, state["moments"]):
            m.copy_(m_saved)
            v.copy_(v_saved)
