"""READ training throughput from a cache against a plain matmul of the same shapes, measured in one run.

For each cache: the first `--batches` training batches of an epoch (seed 0, length-bucketed as train-side
draws them) are assembled, then trained on with train-side's own step (`stacks.train_step`, `--members`
configurations side by side), after `--warmup` untimed steps. Printed per cache:
- where a step's time goes: batch assembly, forward, backward, optimizer; and the validation pass's
  share of an epoch;
- tokens per second (real tokens: READ computes nothing on padding);
- achieved GFLOP/s by operation count: every product READ's equations need on the batch's real tokens,
  forward and backward (the first layer's products of the zero state h_0 are not needed and not counted;
  no gradient is computed for the cached activations), and the attention mix;
- the rate of plain float32 matmuls (torch.mm) of exactly the same products (the same rows, widths,
  forward and backward), timed in the same run, and READ's share of it.

    python scripts/bench/throughput.py caches/all-MiniLM-L6-v2/rte caches/all-MiniLM-L6-v2/sst2

`--device cuda` measures on a GPU (the reference matmuls too), synchronising before every clock read.

`--profile` adds torch.profiler's table of the heaviest operations; `--compile` times the GRU cell's
elementwise update (forward and backward, the largest fusable part of a step) eager and under
torch.compile, on the first cache's largest batch.
"""
from __future__ import annotations

import time

import click
import torch

from cache_store import CacheReader
from cache_store.runtime import keep_freed_memory, resolve_device
from side_train.config import RunConfig
from side_train.data import InMemorySplit, read_spec
from side_train.devices import precision_scope, resolve_precision, to_device
from side_train.evaluation import evaluate_members
from side_train.read_model import CELLS, ReadSpec
from side_train.stacks import make_stacks, member_losses
from side_train.tasks import TaskInfo


def gates_of(cell: str) -> int:
    """G: the cell's weight_ih is [G * r, r]."""
    return CELLS[cell].torch_cell(1, 1).weight_ih.shape[0]


def products(spec: ReadSpec, lengths: list[int], attention: bool) -> tuple[list[tuple[int, int, int, bool]], int]:
    """READ's products for one member and one batch of examples of `lengths`: (rows, in, out, reads data),
    each forward as [rows, in] @ [in, out]; `reads data` when its input is a cached activation (no
    gradient for it). Also the attention mix's multiply-adds (forward)."""
    r, g, tokens = spec.width, gates_of(spec.cell), sum(lengths)
    d_in = spec.projection or spec.d_model
    out, mix = [], 0

    def layer(rows, first, d, own_values):
        if not first:
            out.append((rows, r, r + g * r, False))  # F and W_hh on h_{i-1}
        if attention:
            if not first:
                out.append((rows, r, 2 * r if own_values else r, False))  # Phi and W on u (Phi alone: decoder)
            out.append((rows, r, r, False))  # Psi on the mix
        elif not first:
            out.append((rows, r, r, False))  # Phi
        out.append((rows, d, r, True))  # Down's phi part
        out.append((rows, r, r, False))  # Down's psi part
        out.append((rows, r, g * r, False))  # W_ih

    for i in range(spec.n_layers):
        layer(tokens, i == 0, d_in, True)
        mix += sum(m * m for m in lengths) * r if attention else 0
    if spec.n_decoder_layers:
        distinct = 1 if spec.recurrence else spec.n_decoder_layers
        out += [(tokens, r, r, False)] * (distinct if attention else 0)  # W on the encoder side's h_N
        for i in range(spec.n_decoder_layers):
            layer(len(lengths), i == 0, spec.d_model, False)
            mix += tokens * r if attention else 0
    out.append((len(lengths), r, spec.d_model, False))  # Up (on the pooled state or the decoder's)
    return out, mix


def flops(shapes, mix: int) -> tuple[float, float]:
    """(forward, backward) FLOPs: 2 per multiply-add; backward computes the input's gradient (unless it is
    data) and the weight's; the mix's backward only the side states' gradient."""
    forward = sum(2 * n * a * b for n, a, b, _ in shapes) + 2 * mix
    backward = sum(2 * n * a * b * (1 if data else 2) for n, a, b, data in shapes) + 2 * mix
    return forward, backward


def where(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that wall-clock intervals time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(batches: list[list[tuple[int, int, int, bool]]], members: int, device: torch.device) -> float:
    """Wall time of plain torch.mm for every product of every batch, forward and backward, each member's
    own (members side by side share nothing here)."""
    cache = {}

    def tensor(*shape):
        if shape not in cache:
            cache[shape] = torch.randn(*shape, device=device)
        return cache[shape]

    sync(device)

    began = time.perf_counter()
    for shapes in batches:
        for _ in range(members):
            for n, a, b, data in shapes:
                x, w, grad = tensor(n, a), tensor(a, b), tensor(n, b)
                torch.mm(x, w)
                if not data:
                    torch.mm(grad, w.T)
                torch.mm(x.T, grad)
    sync(device)
    return time.perf_counter() - began


def bench(path: str, n_batches: int, warmup: int, members: int, width: int, cell: str, profile: bool,
          device: torch.device) -> int:
    cache = CacheReader(path)
    configs = [RunConfig(cell=cell, width=width, lr=1e-3 * (m + 1), recurrence=True) for m in range(members)]
    spec = read_spec(cache, width, cell)
    split = InMemorySplit(cache.split("train"), spec)
    info = TaskInfo.from_cache(cache)
    stack = make_stacks(configs, cache, [info], 10_000, device)[0]
    order = split.batch_order(32, shuffle=True, seed=0)[:warmup + n_batches]
    attention = cache.manifest["attention"] != "none"

    def step(batch):
        t0 = time.perf_counter()
        losses = member_losses(info, stack.model(batch.inputs, info.name), batch.labels)
        sync(device)
        t1 = time.perf_counter()
        stack.optimizer.zero_grad()
        losses.sum().backward()
        sync(device)
        t2 = time.perf_counter()
        stack.optimizer.step(stack.lrs * 0.5)
        sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for index in order[:warmup]:
        step(to_device(split.batch(index), device))
    times = dict(assembly=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    tokens, padded, shapes, mix_macs, batch_tokens = 0, 0, [], 0, []
    for index in order[warmup:]:
        t0 = time.perf_counter()
        batch = to_device(split.batch(index), device)  # as train-side: int8 hidden states widen here
        sync(device)
        times["assembly"] += time.perf_counter() - t0
        forward, backward, optimizer = step(batch)
        times["forward"] += forward
        times["backward"] += backward
        times["optimizer"] += optimizer
        lengths = batch.inputs.mask.sum(1).tolist()
        tokens += sum(lengths)
        batch_tokens.append(sum(lengths))
        padded += batch.inputs.mask.numel()
        batch_shapes, mix = products(spec, lengths, attention)
        shapes.append(batch_shapes)
        mix_macs += mix
    fwd, bwd = (sum(x) for x in zip(*(flops(s, 0) for s in shapes)))
    read_flops = members * (fwd + bwd + 4 * mix_macs)
    matmul_flops = members * (fwd + bwd)
    matmul_seconds(shapes[:2], members, device)  # warm-up
    reference = matmul_seconds(shapes, members, device)
    total = sum(times.values())
    name = cache.manifest["task"]["name"]
    print(f"\n{cache.manifest['backbone']['name']} {name}: {len(shapes)} batches of 32, {tokens} real tokens "
          f"({tokens / padded:.0%} of the padded batches), {cell} r={width}, {members} member(s), "
          f"on {where(device)}")
    print("  time per step: " + ", ".join(f"{k} {v / len(shapes) * 1e3:.1f} ms ({v / total:.0%})"
                                          for k, v in times.items()))
    print(f"  READ     : {tokens * members / total:9.0f} tokens/s, {read_flops / total / 1e9:6.1f} GFLOP/s "
          f"({read_flops / len(shapes) / 1e9:.2f} GFLOP per step, mix {4 * mix_macs * members / read_flops:.1%})")
    print(f"  matmul   : {matmul_flops / reference / 1e9:6.1f} GFLOP/s on the same products")
    print(f"  RATIO READ / matmul rate = {read_flops / total / (matmul_flops / reference):.2f}")
    validation = InMemorySplit(cache.split("validation"), spec)
    began = time.perf_counter()
    evaluate_members(stack.model, info, validation, 64, device)  # as train-side validates: batches of 64, no gradient
    sync(device)
    seconds = time.perf_counter() - began
    epoch = total / len(shapes) * split.n_batches(32)
    print(f"  an epoch: {split.n_batches(32)} steps, about {epoch:.1f} s, then validation of {validation.n_examples} "
          f"examples {seconds:.1f} s ({seconds / (epoch + seconds):.0%} of the epoch)")
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        batches = [to_device(split.batch(index), device) for index in order[warmup:]]
        gpu = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with torch_profile(activities=activities) as prof:
            for batch in batches:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                        row_limit=15))
    return max(batch_tokens)


def compare_compile(tokens: int, width: int, device: torch.device) -> None:
    """The GRU update of read_model.Cell, eager against torch.compile (dynamic shapes), forward and backward."""
    from side_train.read_model import Cell

    cell = Cell(1, width, "gru")
    cell = cell.to(device)
    gi, gh = (torch.randn(1, tokens, 3 * width, device=device, requires_grad=True) for _ in range(2))
    h = torch.randn(1, tokens, width, device=device, requires_grad=True)

    def run(update, n=20):
        update(gi, gh, h).sum().backward()
        sync(device)
        began = time.perf_counter()
        for _ in range(n):
            update(gi, gh, h).sum().backward()
        sync(device)
        return (time.perf_counter() - began) / n

    eager = run(cell.update)
    began = time.perf_counter()
    compiled = torch.compile(cell.update, dynamic=True)
    compiled(gi, gh, h).sum().backward()
    compile_seconds = time.perf_counter() - began
    fused = run(compiled)
    print(f"\nGRU update on {tokens} tokens, r={width}, forward and backward: eager {eager * 1e3:.2f} ms, "
          f"torch.compile {fused * 1e3:.2f} ms (compiling took {compile_seconds:.0f} s)")


@click.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("--batches", type=int, default=40, help="Timed training batches per cache.")
@click.option("--warmup", type=int, default=3)
@click.option("--members", type=int, default=1, help="Configurations trained side by side (a sweep's stack).")
@click.option("--hidden", type=int, default=144)
@click.option("--rnn", default="gru")
@click.option("--profile", is_flag=True, help="Also print torch.profiler's heaviest operations.")
@click.option("--compile", "check_compile", is_flag=True, help="Also time the GRU update under torch.compile.")
@click.option("--device", default="cpu", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--precision", default="auto", show_default=True,
              help="train-side's --precision; the reference matmuls run in it too")
def main(caches, batches, warmup, members, hidden, rnn, profile, check_compile, device, precision):
    keep_freed_memory()  # as train-side does
    device = resolve_device(device)
    with precision_scope(resolve_precision(precision, device), device):
        largest = max(bench(path, batches, warmup, members, hidden, rnn, profile, device) for path in caches)
    if check_compile:
        compare_compile(largest, hidden, device)


if __name__ == "__main__":
    main()
