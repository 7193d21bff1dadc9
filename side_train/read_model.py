"""The READ side network (DESIGN §2, equation (1) of arXiv 2305.15348), assembled by `build_read`.

For each stack (encoder, and T5's decoder at its start position), over layers i = 1..N:

    u     = F(h_{i-1})                                # [B, L, r]
    mix   = concat_a(sigma_i[a] @ (v W_a))            # v = u (encoder) or the encoder side's h_N (decoder)
    psi_i = Phi(u) + Psi(mix)                         # the Joiner
    h_i   = Cell(Down(concat(phi_i, psi_i)), h_{i-1}) # h_0 = 0
    out   = phi_N + Up(h_N)                           # Up zero-initialised: a fresh network is the backbone

The heads read T5's decoder side at its start position; an encoder-only backbone's corrected tokens are
pooled (`pooling`: their mean over the real tokens, or the first token), after `dropout`.

Parameters are shared across layers (one ReadLayer), or one per layer with `recurrence=False`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CELLS: dict[str, type[nn.Module]] = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}
POOLINGS = ("mean", "first")


def pool(tokens: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[..., B, L, d] corrected tokens -> [..., B, d]. Mean pooling averages the real tokens only: it is how
    sentence encoders such as all-MiniLM-L6-v2 were trained, whose [CLS] state carries little on its own."""
    if pooling == "first":
        return tokens[..., 0, :]
    weights = mask.to(tokens.dtype)  # [B, L]
    return (tokens * weights[..., None]).sum(-2) / weights.sum(-1, keepdim=True)


class _Mix(torch.autograd.Function):
    """attention.float() @ values, keeping for backward the attention maps as given (bfloat16 from a
    bfloat16 cache) rather than a float32 copy: the maps are most of a batch's memory. Exact, because
    widening bfloat16 to float32 loses nothing."""

    @staticmethod
    def forward(ctx, attention, values):
        ctx.save_for_backward(attention, values)
        return attention.to(values.dtype) @ values

    @staticmethod
    def backward(ctx, grad):
        attention, values = ctx.saved_tensors
        grad_values = attention.to(grad.dtype).transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None
        return None, grad_values  # the cached maps are data: they get no gradient


def mix_states(attention: torch.Tensor | None, values: torch.Tensor, heads: int) -> torch.Tensor | None:
    """Attention-weighted side states. attention: [B, A, Lq, Lk] per head or [B, Lq, Lk] head mean, in
    any float dtype; values: [B, Lk, r]; returns [B, Lq, r] (per head, each head mixes its own r/A slice)."""
    if attention is None:
        return None
    if attention.dim() == 3:
        return _Mix.apply(attention, values)
    batch, keys, width = values.shape
    per_head = values.view(batch, keys, heads, width // heads).transpose(1, 2)  # [B, A, Lk, r/A]
    return _Mix.apply(attention, per_head).transpose(1, 2).reshape(batch, -1, width)


class Joiner(nn.Module):
    """psi = Phi(u) + Psi(mix), u = F(h_prev): what the side network adds to the backbone's state."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.F = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.W = nn.Linear(width, width, bias=False)  # the per-head W_a, side by side
        self.Phi = nn.Linear(width, width)
        self.Psi = nn.Linear(width, width)

    def forward(self, h_prev: torch.Tensor, attention: torch.Tensor | None,
                values: torch.Tensor | None = None) -> torch.Tensor:
        u = self.F(h_prev)  # [B, L, r]
        mixed = mix_states(attention, self.W(u if values is None else values), self.heads)
        return self.Phi(u) + (self.Psi(mixed) if mixed is not None else 0)


class ReadLayer(nn.Module):
    """One step of the recurrence: Joiner, Down and the Cell."""

    def __init__(self, d_model: int, width: int, heads: int, cell: str):
        super().__init__()
        self.joiner = Joiner(width, heads)
        self.d_model = d_model
        self.down = nn.Linear(d_model + width, width)
        self.cell = CELLS[cell](width, width)
        self.is_lstm = cell == "lstm"

    def forward(self, phi: torch.Tensor, attention: torch.Tensor | None, state, values=None):
        h_prev = state[0] if self.is_lstm else state  # [B, L, r]
        psi = self.joiner(h_prev, attention, values)
        # Down(concat(phi, psi)) as two products: no concatenated copy of phi is made and kept for backward.
        weight = self.down.weight  # [r, d + r]
        x = nn.functional.linear(phi, weight[:, :self.d_model]) + nn.functional.linear(
            psi, weight[:, self.d_model:], self.down.bias)  # [B, L, r]
        shape = x.shape
        flat_state = tuple(s.reshape(-1, shape[-1]) for s in state) if self.is_lstm else state.reshape(-1, shape[-1])
        new = self.cell(x.reshape(-1, shape[-1]), flat_state)
        return tuple(s.view(shape) for s in new) if self.is_lstm else new.view(shape)


class ReadStack(nn.Module):
    """The recurrence over one stack's layers, then out = phi_N + Up(h_N). A T5 encoder stack has no Up:
    its correction reaches the decoder side through h_N alone."""

    def __init__(self, n_layers: int, d_model: int, width: int, heads: int, cell: str, recurrence: bool,
                 output: bool = True):
        super().__init__()
        self.n_layers, self.width, self.is_lstm = n_layers, width, cell == "lstm"
        self.layers = nn.ModuleList(ReadLayer(d_model, width, heads, cell)
                                    for _ in range(1 if recurrence else n_layers))
        self.up = nn.Linear(width, d_model) if output else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden: list[torch.Tensor], attention: list[torch.Tensor] | None,
                values: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """hidden: phi_1..phi_N, each [B, L, d]; attention: sigma_1..sigma_N or None.
        Returns (out [B, L, d] or None without Up, h_N [B, L, r])."""
        zeros = hidden[0].new_zeros(*hidden[0].shape[:-1], self.width)
        state = (zeros, zeros) if self.is_lstm else zeros
        for i in range(self.n_layers):
            layer = self.layers[min(i, len(self.layers) - 1)]
            state = layer(hidden[i], attention[i] if attention is not None else None, state, values)
        h_last = state[0] if self.is_lstm else state
        return (hidden[-1] + self.up(h_last) if self.up is not None else None), h_last


@dataclass(frozen=True)
class ReadSpec:
    """Everything `build_read` needs, read from a cache manifest and the run's choices."""

    family: str  # t5 | bert
    d_model: int
    n_layers: int
    n_decoder_layers: int
    heads: int  # attention heads as cached: A for per-head maps, 1 for head mean or none
    width: int  # r
    cell: str
    recurrence: bool = True
    pooling: str = "mean"  # encoder-only backbones: mean | first (the corrected [CLS])
    dropout: float = 0.0  # on the features the heads read, while training

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.width <= 0 or self.width % self.heads:
            raise ValueError(f"side width {self.width} must be a positive multiple of the {self.heads} heads")


@dataclass
class ReadInputs:
    """A padded batch of cached activations (float32). Shapes written where they cross into the model."""

    mask: torch.Tensor  # bool [B, L]
    encoder_hidden: list[torch.Tensor]  # phi_1..phi_N, each [B, L, d]
    encoder_attention: list[torch.Tensor] | None  # sigma_1..sigma_N, [B, A, L, L] or [B, L, L]
    decoder_hidden: list[torch.Tensor]  # T5: phi_1..phi_Ndec at the start position, [B, 1, d]; [] otherwise
    cross_attention: list[torch.Tensor] | None  # T5: [B, A, 1, L] or [B, 1, L]


class ReadModel(nn.Module):
    """Encoder side (and T5 decoder side) plus one head per task."""

    def __init__(self, spec: ReadSpec, heads: nn.ModuleDict):
        super().__init__()
        self.spec = spec
        self.encoder = ReadStack(spec.n_layers, spec.d_model, spec.width, spec.heads, spec.cell, spec.recurrence,
                                 output=not spec.n_decoder_layers)
        self.decoder = (ReadStack(spec.n_decoder_layers, spec.d_model, spec.width, spec.heads, spec.cell,
                                  spec.recurrence) if spec.n_decoder_layers else None)
        self.heads = heads
        self.dropout = nn.Dropout(spec.dropout)

    def features(self, inputs: ReadInputs) -> torch.Tensor:
        """The corrected state each head reads: [B, d]."""
        encoded, h_last = self.encoder(inputs.encoder_hidden, inputs.encoder_attention)  # [B, L, d], [B, L, r]
        if self.decoder is None:
            return self.dropout(pool(encoded, inputs.mask, self.spec.pooling))
        decoded, _ = self.decoder(inputs.decoder_hidden, inputs.cross_attention, values=h_last)  # [B, 1, d]
        return self.dropout(decoded[:, 0])

    def forward(self, inputs: ReadInputs) -> dict[str, torch.Tensor]:
        features = self.features(inputs)
        return {task: head(features) for task, head in self.heads.items()}  # [B, C] or [B, 1]


def build_head(d_model: int, num_labels: int, label_head: torch.Tensor | None) -> nn.Linear:
    """Classification from the frozen LM-head rows of the label words when there are any (so a fresh
    model predicts what the backbone does), otherwise a fresh linear map; regression has one output."""
    head = nn.Linear(d_model, num_labels)
    if label_head is not None:
        with torch.no_grad():
            head.weight.copy_(label_head)  # [C, d]
            head.bias.zero_()
    return head


def build_read(spec: ReadSpec, tasks: dict[str, tuple[int, torch.Tensor | None]]) -> ReadModel:
    """tasks: name -> (number of outputs, label-head rows [C, d] or None)."""
    heads = nn.ModuleDict({name: build_head(spec.d_model, n, rows) for name, (n, rows) in tasks.items()})
    return ReadModel(spec, heads)
