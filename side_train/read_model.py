"""The READ side network (equation (1) of arXiv 2305.15348): the implementation every path trains and serves.

The equations, for each stack (the encoder; T5's decoder at its start position), layers i = 1..N, with
the code that computes each term. Shapes are a batch's: T packed tokens, B examples padded to L
positions, M members, A heads, side width r, backbone width d.

    u_i   = tanh(F h_{i-1})                         ReadLayer.joiner.F            [M, T, r]
    mix_i = concat_a(sigma_i[a] @ (v W)[a's slice]) mix(), joiner.W; head_slices  [M, T, r]
            (v = u_i on the encoder; the encoder side's h_N on T5's decoder, mixed by cross-attention)
    psi_i = Phi u_i + Psi mix_i                     joiner.Phi, joiner.Psi         [M, T, r]
    h_i   = Cell(Down [phi_i ; psi_i], h_{i-1})     ReadLayer.down, ReadLayer.cell [M, T, r]; h_0 = 0
    out   = phi_N + Up h_N                          ReadStack.up (zero at start)   [M, B, d] after pooling

Options beside the paper's network (ReadSpec, all off by default): `down_norm`, Down reads LayerNorm(phi_i);
`layer_mix` (encoder-only), out's phi_N becomes sum_i softmax(w)_i phi_i; `output_gate`,
out = s phi_N + (1 - s) Up h_N with s = sigmoid(z); `token_mix`, the encoder side's h_N gets a residual
self-attention block over its example's tokens, h_N + O softmax(q k^T / sqrt(r)) v with q, k, v = Q, K, V
LayerNorm(h_N): a path between tokens that the frozen maps do not fix (for pair tasks). While training only: `side_dropout` on each h_i,
`layer_drop` keeps h_{i-1} for an example, `dropout` on what the heads read.

    phi_i     ReadInputs.encoder_hidden[i-1]  [T, d] (cached; [T, K] on a projected cache)
    sigma_i   ReadInputs.encoder_attention[i-1]  [B, A, L, L] or [B, L, L] (cached)
    heads     ReadModel.heads, one per task, on `out`: T5's decoder start position, or an encoder's
              corrected tokens pooled (`pooling`: mean over real tokens, or the first), after `dropout`

`side_train/reference.py` writes these equations out plainly for one example; it is the definition this
module is tested against. What this module adds is speed, each shortcut exact up to float rounding:

- Packed tokens: per-token products run on the batch's T real tokens, none on padding. Only the mix
  needs each example's L x L block: the side states are padded for it and packed again (`Packing`).
- Layer 1 starts from h_0 = 0, so F h_0 and the cell's W_hh h_0 are their biases and are not multiplied.
- Products that read one input run as one wider product: F with the cell's W_hh (both read h), Phi
  with W (both read u). Down [phi ; psi] runs as two products, so phi, shared by every member, is read
  once and no concatenated copy is kept for backward.
- Pooling is linear and Up affine, so Up runs on pool(h_N), B rows instead of T.
- Members: a `ReadModel` holds M networks of one spec; every parameter is [M, ...] and the outputs
  [M, B, ...]. A sweep's configurations that share a seed and a shape train as one model's members; a
  single run, a checkpoint and `predict-side` are a model of one member. Down's product with phi and
  the attention mix run once for all members; no product mixes two members, so each trains as alone.

T5's encoder stack has no Up: its correction reaches the head through the decoder side's mix of h_N.
Parameters are shared across layers (one ReadLayer), or one per layer with `recurrence=False`.

Projected caches (`cache-activations --project K`) store phi_i as K coordinates z_i = (phi_i - mean_i)
@ P_i.T; Down then reads z_i. On the span of P_i that is the same family of maps (the mean is a constant
the bias takes up); what lies outside the span READ cannot see. The heads' pool(phi_N) is stored at full
width (`ReadInputs.pooled`), so a fresh network still predicts what the backbone does.

Every member starts as torch's nn.Linear and cell modules start (built and copied, in module order),
and `member_state` gives one member's weights keyed as those modules' state dicts: the checkpoint
format. `ReadAdamW` is torch's AdamW with one learning rate per member, leaving stopped members as
they are.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cache_store import UserError
from cache_store.format import POOLINGS, STORED_POOLINGS, dequantize_probabilities, pool

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _rnn(gi: torch.Tensor, gh: torch.Tensor, state: State) -> State:
    return torch.tanh(gi + gh)


def _gru(gi: torch.Tensor, gh: torch.Tensor, state: State) -> State:
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * state


def _lstm(gi: torch.Tensor, gh: torch.Tensor, state: State) -> State:
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@dataclass(frozen=True)
class CellKind:
    """What READ needs of a recurrent cell. A new cell is one entry of CELLS."""

    torch_cell: type[nn.RNNCellBase]  # parameters (weight_ih, weight_hh [G*r, r], bias_ih, bias_hh [G*r]),
    # their initialisation and the checkpoint keys; also the cell `reference.py` runs
    update: Callable[[torch.Tensor, torch.Tensor, State], State]  # the gate equations: the new state from
    # the input's gate products gi [M, N, G*r], the state's gh (perhaps [M, 1, G*r], broadcast) and the state
    paired_state: bool = False  # the state is (h, c), as LSTM's


# The one list of cells: torch's, whose gate equations `Cell` computes for M members at once.
CELLS: dict[str, CellKind] = {"rnn": CellKind(nn.RNNCell, _rnn), "gru": CellKind(nn.GRUCell, _gru),
                              "lstm": CellKind(nn.LSTMCell, _lstm, paired_state=True)}


@dataclass(frozen=True)
class ReadSpec:
    """Everything a ReadModel needs, read from a cache manifest and the run's choices."""

    family: str  # t5 | bart | bert | decoder
    d_model: int
    n_layers: int
    n_decoder_layers: int
    heads: int  # attention heads as cached: A for per-head maps, 1 for head mean or none
    width: int  # r
    cell: str
    recurrence: bool = True
    pooling: str = "mean"  # encoder-only stacks: mean | first (the corrected [CLS]) | last (real token)
    dropout: float = 0.0  # on the features the heads read, while training
    side_dropout: float = 0.0  # on each cell's output h_i (what later layers and Up read), while training
    layer_drop: float = 0.0  # per example, skip a layer's update (h_i = h_{i-1}) after the first, while training
    projection: int = 0  # K: the cache stores encoder hidden states as K PCA coordinates (0: full width)
    down_norm: bool = False  # Down reads LayerNorm(phi_i) (no affine: Down's weights and bias take it up)
    layer_mix: bool = False  # encoder-only: base = sum_i softmax(w)_i pool(phi_i) instead of pool(phi_N)
    output_gate: bool = False  # out = s base + (1 - s) Up h_N, s = sigmoid(z), z = 1 at the start
    token_mix: bool = False  # the encoder side's h_N += one self-attention block over its example's tokens

    def __post_init__(self):
        if self.layer_mix and (self.n_decoder_layers or self.projection):
            raise UserError("--layer-mix needs an encoder-only backbone and a cache of full-width hidden states "
                            f"(this one is {self.family}" + (f", projected to {self.projection})" if self.projection
                                                             else ")"))
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.projection and not self.n_decoder_layers and self.pooling not in STORED_POOLINGS:
            raise UserError(f"--pooling {self.pooling} reads a final state that a --project cache does not store; "
                            f"choose one of {', '.join(STORED_POOLINGS)}, or cache without --project")
        if self.cell not in CELLS:
            raise UserError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.width <= 0:
            raise UserError(f"side width must be positive, got {self.width}")
        for name in ("dropout", "side_dropout", "layer_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be a fraction in [0, 1), got {getattr(self, name)}")


@dataclass
class Packing:
    """Where a batch's packed tokens sit in its padded [B, L] layout (built on the CPU with the batch)."""

    mask: torch.Tensor  # bool [B, L]: real positions
    real: torch.Tensor  # int64 [T]: each packed token's position in the flattened [B * L]

    @classmethod
    def of(cls, lengths: torch.Tensor) -> "Packing":
        mask = torch.arange(int(lengths.max())) < lengths[:, None]
        return cls(mask, mask.flatten().nonzero().squeeze(1))

    def to(self, device: torch.device) -> "Packing":
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return Packing(move(self.mask), move(self.real))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, k] -> [..., B, L, k], zero on padding."""
        flat = x.new_zeros(*x.shape[:-2], self.mask.numel(), x.shape[-1]).index_copy(-2, self.real, x)
        return flat.view(*x.shape[:-2], *self.mask.shape, x.shape[-1])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[..., B, L, k] -> [..., T, k]."""
        return x.flatten(-3, -2).index_select(-2, self.real)


@dataclass
class ReadInputs:
    """A batch of cached activations (float32), shared by every member. Hidden states are packed, the
    batch's real tokens one example after another; attention maps are padded to its longest example and
    zero outside each example's block (they stay in the stored dtype until READ multiplies by them)."""

    packing: Packing
    encoder_hidden: list[torch.Tensor]  # phi_1..phi_N, each [T, d]
    encoder_attention: list[torch.Tensor] | None  # sigma_1..sigma_N, [B, A, L, L] or [B, L, L]
    decoder_hidden: list[torch.Tensor]  # T5: phi_1..phi_Ndec at the start position, [B, d]; [] otherwise
    cross_attention: list[torch.Tensor] | None  # T5: [B, A, 1, L] or [B, 1, L]
    pooled: dict[str, torch.Tensor] | None = None  # projected caches, encoder-only: pooling -> pool(phi_N), [B, d]

    @property
    def mask(self) -> torch.Tensor:
        return self.packing.mask

    def widened(self) -> "ReadInputs":
        """Hidden states as float32 (a batch carries them as stored, bfloat16 or float32, to the device)."""
        wide = lambda xs: [x.float() for x in xs]  # noqa: E731 (a no-op on float32)
        return ReadInputs(self.packing, wide(self.encoder_hidden), self.encoder_attention, wide(self.decoder_hidden),
                          self.cross_attention, None if self.pooled is None else
                          {p: x.float() for p, x in self.pooled.items()})


def build_head(d_model: int, num_labels: int, label_head: torch.Tensor | None) -> nn.Linear:
    """Classification from the frozen LM-head rows of the label words when there are any (so a fresh
    model predicts what the backbone does), otherwise a fresh linear map; regression has one output."""
    head = nn.Linear(d_model, num_labels)
    if label_head is not None:
        with torch.no_grad():
            head.weight.copy_(label_head)  # [C, d]
            head.bias.zero_()
    return head


# One buffer per (dtype, device), grown as needed, for the maps each mix widens: they are used at once and
# dropped, and a fresh allocation of that size every time cost page faults that took longer than widening.
_SCRATCH: dict[tuple, torch.Tensor] = {}


def widen(attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached attention maps as `dtype`, in the shared scratch buffer (valid until the next widen):
    bfloat16 widens exactly; uint8 holds units of 1/255."""
    key = (dtype, attention.device)
    if key not in _SCRATCH or _SCRATCH[key].numel() < attention.numel():
        _SCRATCH[key] = torch.empty(attention.numel(), dtype=dtype, device=attention.device)
    out = _SCRATCH[key][:attention.numel()].view(attention.shape)
    return dequantize_probabilities(attention, out=out) if attention.dtype == torch.uint8 else out.copy_(attention)


class _Mix(torch.autograd.Function):
    """widen(attention) @ values, keeping for backward the attention maps as given (bfloat16 or uint8
    from the cache) rather than a float32 copy: the maps are most of a batch's memory."""

    @staticmethod
    def forward(ctx, attention, values):
        ctx.save_for_backward(attention, values)
        return widen(attention, values.dtype) @ values

    @staticmethod
    def backward(ctx, grad):
        attention, values = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        # (grad^T @ maps)^T is maps^T @ grad without a transposed copy of the (large) maps
        grad_values = (grad.transpose(-1, -2) @ widen(attention, grad.dtype)).transpose(-1, -2)
        return None, grad_values  # the cached maps are data: they get no gradient


def head_slices(width: int, heads: int) -> list[tuple[int, int]]:
    """(start, size) of the side-state columns each head mixes: contiguous and as even as they can be, the
    first r mod A heads one column wider (r = 128 over 12 heads: 8 slices of 11 columns, 4 of 10)."""
    sizes = [width // heads + (1 if a < width % heads else 0) for a in range(heads)]
    return [(sum(sizes[:a]), sizes[a]) for a in range(heads)]


def head_columns(width: int, heads: int) -> torch.Tensor:
    """int64 [A, c], c = ceil(r/A): head_slices as a gather index, a slice shorter than c padded with r,
    which mix_side points at a zero column."""
    c = -(-width // heads)
    return torch.tensor([[start + j if j < size else width for j in range(c)] for start, size in head_slices(width, heads)])


@functools.lru_cache(maxsize=64)
def _uneven_index(width: int, heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """head_columns flattened, and the positions of its real columns, on `device`: made once, so that a
    step neither copies them to the device nor waits on a boolean mask's count."""
    columns = head_columns(width, heads).flatten()
    return columns.to(device), (columns < width).nonzero().squeeze(1).to(device)


@dataclass
class MixSide:
    """Side states laid out for the maps to multiply: [B, Lk, M*r] (head mean) or [B, A, Lk, M*c] (per head,
    each head's slice of the r columns, see head_columns)."""

    side: torch.Tensor
    members: int
    width: int
    keep: torch.Tensor | None = None  # int64: the positions of the mix's output's real columns, when r % A != 0


def mix_side(values: torch.Tensor, heads: int | None) -> MixSide:
    """values [M, B, Lk, r] -> the layout mix multiplies by, for per-head maps of `heads` heads or (None)
    head-mean maps. It is a copy: T5's decoder side, whose values are the same at every layer, makes it once."""
    members, batch, keys, width = values.shape
    if heads is None:
        return MixSide(values.permute(1, 2, 0, 3).reshape(batch, keys, members * width), members, width)
    c, keep = -(-width // heads), None
    if width % heads:  # gather each head's columns, a zero column filling the shorter slices
        columns, keep = _uneven_index(width, heads, values.device)
        values = torch.cat([values, values.new_zeros(*values.shape[:-1], 1)], -1).index_select(-1, columns)
    side = values.reshape(members, batch, keys, heads, c).permute(1, 3, 2, 0, 4).reshape(batch, heads, keys, -1)
    return MixSide(side, members, width, keep)


def mix(attention: torch.Tensor | None, values: torch.Tensor | MixSide, heads: int) -> torch.Tensor | None:
    """Attention-weighted side states. attention: [B, A, Lq, Lk] per head or [B, Lq, Lk] head mean, in any
    float dtype, shared; values: [M, B, Lk, r] (or mix_side of them); returns [M, B, Lq, r] (per head, each
    head mixes its own slice of the r columns, see head_columns). The members' values go side by side in
    the last axis, so the maps are multiplied (and widened from bfloat16) once for all members."""
    if attention is None:
        return None
    prepared = values if isinstance(values, MixSide) else mix_side(values, heads if attention.dim() == 4 else None)
    members, width, batch = prepared.members, prepared.width, prepared.side.shape[0]
    mixed = _Mix.apply(attention, prepared.side)  # [B, Lq, M*r] or [B, A, Lq, M*c]
    if attention.dim() == 3:
        return mixed.view(batch, -1, members, width).permute(2, 0, 1, 3)
    heads, queries = mixed.shape[1], mixed.shape[2]
    mixed = mixed.view(batch, heads, queries, members, -1).permute(3, 0, 2, 1, 4).reshape(members, batch, queries, -1)
    return mixed if prepared.keep is None else mixed.index_select(-1, prepared.keep)


def shared_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, in], the same for every member, times each member's weight [M, out, in] -> [M, N, out], as
    one product with the members' outputs side by side (x is read once)."""
    members, outputs, inputs = weight.shape
    y = x @ weight.reshape(members * outputs, inputs).T  # [N, M*out]
    return y.view(-1, members, outputs).transpose(0, 1)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, N, in] (each member its own; N may be 1 and broadcast) times weight [M, out, in], plus bias
    [M, out] -> [M, N, out]. One member runs as a plain 2-D product, torch's fastest path."""
    if x.shape[0] == 1:
        return nn.functional.linear(x[0], weight[0], None if bias is None else bias[0]).unsqueeze(0)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class Linear(nn.Module):
    """M linear maps: weight [M, out, in], bias [M, out]. Every member starts as `start`, by default a
    fresh nn.Linear (torch's own initialisation, drawn once for all members)."""

    def __init__(self, members: int, inputs: int, outputs: int, bias: bool = True, start: nn.Linear | None = None):
        super().__init__()
        start = start if start is not None else nn.Linear(inputs, outputs, bias)
        self.weight = nn.Parameter(start.weight.detach().expand(members, -1, -1).clone())
        self.bias = nn.Parameter(start.bias.detach().expand(members, -1).clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, N, in] (each member its own) -> [M, N, out]."""
        return product(x, self.weight, self.bias)


class Cell(nn.Module):
    """M cells of one kind of CELLS, with torch's parameter names and layout; every member starts as a
    fresh torch cell."""

    def __init__(self, members: int, width: int, kind: str):
        super().__init__()
        self.kind = CELLS[kind]
        start = self.kind.torch_cell(width, width)
        for name, value in start.named_parameters():  # weight_ih, weight_hh [G*r, r]; bias_ih, bias_hh [G*r]
            self.register_parameter(name, nn.Parameter(value.detach().expand(members, *value.shape).clone()))

    def forward(self, x: torch.Tensor, state: State) -> State:
        """x [M, N, r]; state [M, N, r], or (h, c)."""
        h = state[0] if self.kind.paired_state else state
        return self.update(product(x, self.weight_ih, self.bias_ih), product(h, self.weight_hh, self.bias_hh), state)

    def update(self, gi: torch.Tensor, gh: torch.Tensor, state: State) -> State:
        return self.kind.update(gi, gh, state)


class Joiner(nn.Module):
    """psi = Phi(u) + Psi(mix), u = F(h_prev): what the side network adds to the backbone's state. Its
    products run inside ReadLayer.forward, fused with the cell's (the modules hold the parameters)."""

    def __init__(self, members: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.F = nn.Sequential(Linear(members, width, width), nn.Tanh())
        self.W = Linear(members, width, width, bias=False)  # the per-head W_a, side by side
        self.Phi = Linear(members, width, width)
        self.Psi = Linear(members, width, width)


class ReadLayer(nn.Module):
    """One step of the recurrence: Joiner, Down and the Cell."""

    def __init__(self, members: int, d_in: int, width: int, heads: int, cell: str):
        super().__init__()
        self.d_in, self.width, self.paired = d_in, width, CELLS[cell].paired_state
        self.joiner = Joiner(members, width, heads)
        self.down = Linear(members, d_in + width, width)
        self.cell = Cell(members, width, cell)

    def forward(self, phi, attention, state, keys: Packing, first: bool, values=None):
        """phi [N, d_in] (shared: the packed tokens, or T5's decoder start positions); state [M, N, r] or an
        (h, c) pair of them, zero when `first`. The attention mix reads, on the tokens of `keys`, W(u) or,
        given, `values` (T5's decoder: mix_side of W of the encoder side's h_N, see ReadStack)."""
        joiner, cell, r = self.joiner, self.cell, self.width
        h_prev = state[0] if self.paired else state
        f = joiner.F[0]
        if first:  # h_0 = 0: F(h_0) and W_hh h_0 are their biases, the same for every token
            u, gh = torch.tanh(f.bias).unsqueeze(1), cell.bias_hh.unsqueeze(1)  # [M, 1, r], [M, 1, G*r]
        else:  # F and W_hh both read h_prev: one product
            both = product(h_prev, torch.cat([f.weight, cell.weight_hh], 1), torch.cat([f.bias, cell.bias_hh], 1))
            u, gh = both.split([r, both.shape[-1] - r], -1)  # split: its backward is one concatenation
            u = torch.tanh(u)
        per_token = values is None  # the encoder side: every token a query, mixing its own example's W(u)
        if attention is None:  # a cache without attention maps: the Joiner is Phi(u) alone
            psi = joiner.Phi(u)
        else:
            if per_token:  # Phi and W both read u: one product
                both = product(u, torch.cat([joiner.Phi.weight, joiner.W.weight], 1),
                               torch.cat([joiner.Phi.bias, torch.zeros_like(joiner.Phi.bias)], 1))
                phi_u, values = both.split(r, -1)
                values = keys.pad(values.expand(-1, keys.real.numel(), -1))  # the zero state's W(u) is one row
            else:
                phi_u = joiner.Phi(u)
            mixed = mix(attention, values, joiner.heads)  # [M, B, Lq, r]
            psi = phi_u + joiner.Psi(keys.unpad(mixed) if per_token else mixed[:, :, 0])  # [M, N, r]
        # Down(concat(phi, psi)) as two products: no concatenated copy of phi is made and kept for backward,
        # and phi, the same for every member, is read once.
        weight = self.down.weight  # [M, r, d_in + r]
        x = shared_product(phi, weight[:, :, :self.d_in]) + product(psi, weight[:, :, self.d_in:], self.down.bias)
        return cell.update(product(x, cell.weight_ih, cell.bias_ih), gh, state)


class ReadStack(nn.Module):
    """The recurrence over one stack's layers (reading phi d_in wide), and Up, d_model wide, which the
    model applies (to the pooled h_N, or T5's decoder start position). A T5 encoder stack has no Up: its
    correction reaches the decoder side through h_N alone."""

    def __init__(self, members: int, n_layers: int, d_in: int, d_model: int, width: int, heads: int, cell: str,
                 recurrence: bool, output: bool = True, side_dropout: float = 0.0, layer_drop: float = 0.0,
                 down_norm: bool = False):
        super().__init__()
        self.members, self.n_layers, self.width, self.paired = members, n_layers, width, CELLS[cell].paired_state
        self.down_norm = down_norm
        self.side_dropout, self.layer_drop = nn.Dropout(side_dropout), layer_drop
        self.layers = nn.ModuleList(ReadLayer(members, d_in, width, heads, cell)
                                    for _ in range(1 if recurrence else n_layers))
        self.up = Linear(members, width, d_model) if output else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden, attention, keys: Packing, values=None) -> torch.Tensor:
        """hidden: phi_1..phi_N [N, d_in]; attention: sigma_1..sigma_N or None; values: T5's decoder side
        mixes the encoder side's h_N [M, T, r] (over the tokens of `keys`). Returns h_N [M, N, r]."""
        zeros = hidden[0].new_zeros(self.members, hidden[0].shape[0], self.width)
        state = (zeros, zeros) if self.paired else zeros
        projected = {}  # W(values), laid out for the mix, once per distinct layer (once in all with recurrence)
        for i in range(self.n_layers):
            layer = self.layers[min(i, len(self.layers) - 1)]
            source = None
            if values is not None and attention is not None:
                source = projected.get(id(layer))
                if source is None:
                    source = projected[id(layer)] = mix_side(keys.pad(layer.joiner.W(values)),
                                                               layer.joiner.heads if attention[i].dim() == 4 else None)
            phi = nn.functional.layer_norm(hidden[i], hidden[i].shape[-1:]) if self.down_norm else hidden[i]
            new = layer(phi, attention[i] if attention is not None else None, state, keys, i == 0, source)
            state = self._regularised(new, state, keys, values is None, i) if self.training else new
        return state[0] if self.paired else state

    def _regularised(self, new, state, keys: Packing, per_token: bool, i: int):
        """Training only: dropout on the new side state h_i, and with `layer_drop` an example keeps
        h_{i-1} instead (layer 1 always runs: h_0 is zero)."""
        h = self.side_dropout(new[0] if self.paired else new)
        new = (h, new[1]) if self.paired else h
        if not self.layer_drop or i == 0:
            return new
        runs = torch.rand(keys.mask.shape[0], device=h.device) >= self.layer_drop  # [B]: this layer runs
        rows = (runs[keys.real // keys.mask.shape[1]] if per_token else runs).view(1, -1, 1)  # [1, N, 1]
        if self.paired:
            return tuple(torch.where(rows, a, b) for a, b in zip(new, state))
        return torch.where(rows, new, state)


class TokenMix(nn.Module):
    """One residual self-attention block (one head, width r) over each example's side states:
    h + O softmax(q k^T / sqrt(r)) v, with q, k, v = Q, K, V LayerNorm(h) (no affine)."""

    def __init__(self, members: int, width: int):
        super().__init__()
        self.qkv = Linear(members, width, 3 * width)  # Q, K, V side by side: one product
        self.out = Linear(members, width, width)

    def forward(self, h: torch.Tensor, packing: Packing) -> torch.Tensor:
        """h [M, T, r] (packed tokens) -> [M, T, r]."""
        q, k, v = packing.pad(self.qkv(nn.functional.layer_norm(h, h.shape[-1:]))).chunk(3, -1)  # [M, B, L, r]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(h.shape[-1])  # [M, B, L, L]
        scores = scores.masked_fill(~packing.mask[None, :, None, :], float("-inf"))  # keys: real tokens only
        return h + self.out(packing.unpad(torch.softmax(scores, -1) @ v))


class ReadModel(nn.Module):
    """M READ networks of one spec: the encoder side (and T5's decoder side) and one head per task.
    tasks: name -> (number of outputs, label-head rows [C, d] or None), see build_head."""

    def __init__(self, spec: ReadSpec, tasks: dict[str, tuple[int, torch.Tensor | None]], members: int = 1):
        super().__init__()
        self.spec, self.members = spec, members
        # The heads are drawn first, as they always were, so that a seed still gives the weights it gave.
        starts = {name: build_head(spec.d_model, outputs, rows) for name, (outputs, rows) in tasks.items()}
        regularised = dict(side_dropout=spec.side_dropout, layer_drop=spec.layer_drop, down_norm=spec.down_norm)
        self.encoder = ReadStack(members, spec.n_layers, spec.projection or spec.d_model, spec.d_model, spec.width,
                                 spec.heads, spec.cell, spec.recurrence, output=not spec.n_decoder_layers, **regularised)
        self.decoder = (ReadStack(members, spec.n_decoder_layers, spec.d_model, spec.d_model, spec.width, spec.heads,
                                  spec.cell, spec.recurrence, **regularised) if spec.n_decoder_layers else None)
        self.heads = nn.ModuleDict({name: Linear(members, spec.d_model, head.out_features, start=head)
                                    for name, head in starts.items()})
        self.dropout = nn.Dropout(spec.dropout)  # independent masks per member, as alone
        if spec.layer_mix:  # w: the weight of each layer's pooled state, uniform at the start
            self.layer_weights = nn.Parameter(torch.zeros(members, spec.n_layers))
        if spec.output_gate:  # z: s = sigmoid(z) weighs the backbone's state against the correction
            self.gate = nn.Parameter(torch.ones(members))
        if spec.token_mix:
            self.token_mix = TokenMix(members, spec.width)

    @classmethod
    def from_member_state(cls, spec: ReadSpec, outputs: dict[str, int], state: dict[str, torch.Tensor]) -> "ReadModel":
        """A model of one member with the weights of `member_state` (a checkpoint)."""
        model = cls(spec, {name: (n, None) for name, n in outputs.items()})
        model.load_state_dict({k: v.unsqueeze(0) for k, v in state.items()})
        return model

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights (copies), keyed and shaped as one member's modules: the checkpoint format."""
        return {k: v[m].detach().clone() for k, v in self.state_dict().items()}

    def member_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.members

    def features(self, inputs: ReadInputs) -> torch.Tensor:
        """[M, B, d]: the corrected state each member's heads read."""
        inputs = inputs.widened()
        packing = inputs.packing
        h_last = self.encoder(inputs.encoder_hidden, inputs.encoder_attention, packing)  # [M, T, r]
        if self.spec.token_mix:
            h_last = self.token_mix(h_last, packing)
        if self.decoder is None:
            pooling, mask = self.spec.pooling, packing.mask
            if self.spec.layer_mix:  # [M, B, d]: each member's mix of every layer's pooled state
                pooled = torch.stack([pool(packing.pad(phi), mask, pooling) for phi in inputs.encoder_hidden])
                base = torch.einsum("mn,nbd->mbd", torch.softmax(self.layer_weights, -1), pooled)
            else:  # [B, d]
                base = inputs.pooled[pooling] if inputs.pooled is not None else \
                    pool(packing.pad(inputs.encoder_hidden[-1]), mask, pooling)
            return self.dropout(self._join(base, self.encoder.up(pool(packing.pad(h_last), mask, pooling))))
        h_decoder = self.decoder(inputs.decoder_hidden, inputs.cross_attention, packing, values=h_last)  # [M, B, r]
        return self.dropout(self._join(inputs.decoder_hidden[-1], self.decoder.up(h_decoder)))

    def _join(self, base: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """out = base + correction, or with the output gate s base + (1 - s) correction; [M, B, d]."""
        if not self.spec.output_gate:
            return base + correction
        s = torch.sigmoid(self.gate).view(-1, 1, 1)
        return s * base + (1 - s) * correction

    def forward(self, inputs: ReadInputs, task: str) -> torch.Tensor:
        """[M, B, C] outputs of one task's heads."""
        return self.heads[task](self.features(inputs))


class ReadAdamW:
    """torch.optim.AdamW's update (amsgrad off) over a ReadModel's member-stacked parameters, with
    learning rates [M] and a mask of the members still training; the others keep weights and moments."""

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.steps = 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """lrs: float [M]; active: bool [M], the members to update, or None for all of them (the usual
        case, known on the host: an update in place, no masking copies, no wait on the device)."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.steps, math.sqrt(1 - beta2 ** self.steps)
        everyone = active is None
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

