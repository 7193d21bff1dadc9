"""The GPU checks: the paper's figures first, then every CUDA path once, under one overall deadline.

    python scripts/gpu/checks.py --data DATA --out "$OUT" --deadline 540

DATA holds all-MiniLM-L6-v2/, glue/{SST-2,RTE}/ and t5/t5-small/ (config and tokenizer). Everything is
written under --out as it happens, so a killed run still returns what finished:

    checks.log        every step's command and output
    preflight.json    versions, the GPU, NVML's energy and power probes, idle power (5 s)
    steps.jsonl       one line per finished step: exit status, seconds, energy above idle
    summary.json      the figures and the targets, rewritten after every step
    compare.jsonl     READ, full fine-tuning, LoRA, BitFit, READ online: one line per run

Order: cache SST-2 (metered); READ, full fine-tuning and LoRA (each metered in its own process); BitFit
and READ online; throughput at 1, 8 and 32 members; the sweep (8 and 32 configurations together against
one by one); then the path checks (predict, multi-task, T5, torchrun, verify); the profile last. Each
step's limit is clamped to the time left; a step whose inputs failed is skipped. Energy is reported above
the idle power, or null (with why) where NVML is missing or the device has no reading.

`--device cpu --sst-limit 120 --limit-scale 5` dry-runs every step on a CPU (tests/test_gpu_checks.py, with a
fake NVML).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # side_train.meter, when run from a checkout

from side_train.meter import EnergyMeter, Gpu  # noqa: E402

MEMBERS = (1, 8, 32)  # throughput and sweep sizes
SWEEP_LRS = [f"{1e-4 * 1.2 ** i:.3g}" for i in range(32)]  # 32 configurations: one GRU stack of learning rates


class Checks:
    """Runs steps in order under the deadline, writing every result under `out` as it comes."""

    def __init__(self, out: Path, deadline: float, gpu: Gpu, idle_watts: float | None, limit_scale: float = 1.0):
        self.out, self.end, self.limit_scale = out, time.monotonic() + deadline, limit_scale
        self.gpu, self.idle_watts = gpu, idle_watts
        self.status: dict[str, int | str] = {}  # step -> exit status, or "skipped: why"
        self.energy: dict[str, dict] = {}
        self.outputs: dict[str, str] = {}
        self.log = open(out / "checks.log", "a", buffering=1)

    def left(self) -> float:
        return self.end - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def step(self, name: str, limit: float, command: list[str], needs: tuple[str, ...] = (), metered: bool = False,
             env: dict | None = None) -> None:
        missing = [n for n in needs if self.status.get(n) != 0]
        budget = min(limit * self.limit_scale, self.left() - 5)
        if missing or budget < 10:
            why = f"skipped: {'needs ' + ', '.join(missing) if missing else 'no time left'}"
            self.status[name] = why
            self._record({"step": name, "status": why})
            self.say(f"=== {name}: {why}")
            return
        self.say(f"\n=== {name} (limit {budget:.0f} s): {' '.join(command)}")
        meter = EnergyMeter(self.gpu, self.idle_watts) if metered else None
        if meter:
            meter.start()
        began = time.monotonic()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=budget,
                                  cwd=ROOT, env={**os.environ, **(env or {})})
            rc, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            rc, output = 124, (exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or "")
        except OSError as exc:  # the command is not there: a failed step, not a failed check
            rc, output = 127, f"{exc}\n"
        seconds = time.monotonic() - began
        self.log.write(output)
        self.outputs[name], self.status[name] = output, rc
        record = {"step": name, "status": rc, "seconds": round(seconds, 1)}
        if meter:
            self.energy[name] = meter.stop()
            record["energy"] = self.energy[name]
        self._record(record)
        self.say(f"=== {name}: exit {rc} after {seconds:.0f} s")

    def _record(self, record: dict) -> None:
        with open(self.out / "steps.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def preflight(out: Path, device: str) -> tuple[Gpu, float | None]:
    """About 20 s: imports, the GPU, NVML's probes, 5 s of idle power; preflight.json."""
    found: dict = {"device": device}
    probe = ("import json, torch, transformers, zarr, side_train, pipeline; "
             "cuda = torch.cuda.is_available(); "
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
             "'cuda': cuda, 'name': torch.cuda.get_device_name(0) if cuda else None, "
             "'uuid': str(torch.cuda.get_device_properties(0).uuid) if cuda else None, "
             "'memory_gib': torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None, "
             "'bf16': torch.cuda.is_bf16_supported() if cuda else None}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        found["error"] = done.stderr.strip().splitlines()[-1:]
    else:
        found.update(json.loads(done.stdout.splitlines()[-1]))
    if device.startswith("cuda") and not found.get("cuda"):
        found["error"] = found.get("error") or "no CUDA device visible"
    gpu = Gpu(found.get("uuid"))
    found["nvml"] = {"available": gpu.handle is not None, "note": gpu.note}
    if gpu.handle is not None:
        found["nvml"]["energy_counter_joules"] = gpu.energy_joules()
        found["nvml"]["power_watts"] = gpu.power_watts()
    idle = gpu.idle_watts(5.0)
    found["idle_watts"] = idle
    (out / "preflight.json").write_text(json.dumps(found, indent=2))
    return gpu, idle


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text or "")
    return float(match.group(1)) if match else None


def summarise(checks: Checks, out: Path, sst_tokens: int | None) -> dict:
    """The figures the issue asks for, with each target stated as met, not met or not measured."""
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()] \
        if (out / "compare.jsonl").is_file() else []
    methods = {}
    for row in rows:
        if row.get("status") != "ok":
            methods[row["method"]] = {"status": row.get("status")}
            continue
        epochs = row.get("epoch_seconds") or []
        methods[row["method"]] = {
            "energy_above_idle_joules": row.get("energy_above_idle_joules"), "energy_joules": row.get("energy_joules"),
            "energy_note": row.get("energy_note"), "peak_memory_bytes": row.get("peak_memory_bytes"),
            "peak_reserved_bytes": row.get("peak_reserved_bytes"),
            "seconds_per_epoch": sum(epochs) / len(epochs) if epochs else None,
            "tokens_per_second": sst_tokens / (sum(epochs) / len(epochs)) if epochs and sst_tokens else None,
            "test": row.get("test"), "precision": row.get("precision"), "device": row.get("device")}
    read, full = methods.get("read", {}), methods.get("full", {})

    def ratio(key, a=read, b=full):
        x, y = a.get(key), b.get(key)
        return x / y if x is not None and y else None

    cache_energy = (checks.energy.get("cache-sst2") or {}).get("energy_above_idle_joules")
    read_runs = 1 + (32 if checks.status.get("sweep-32") == 0 else 0)  # the READ runs trained from that cache
    with_cache = None
    if cache_energy is not None and read.get("energy_above_idle_joules") is not None and full.get("energy_above_idle_joules"):
        with_cache = (read["energy_above_idle_joules"] + cache_energy / read_runs) / full["energy_above_idle_joules"]
    sweeps = {m: _number(r"RATIO separate / sweep = ([\d.]+)x", checks.outputs.get(f"sweep-{m}")) for m in (8, 32)}
    throughput = {m: _number(r"READ\s*:\s*([\d.]+) tokens/s", checks.outputs.get(f"throughput-{m}")) for m in MEMBERS}

    def target(value, bound, at_most=True):
        if value is None:
            return "not measured"
        return "met" if (value <= bound if at_most else value >= bound) else "not met"

    summary = {
        "steps": checks.status, "methods": methods, "cache_energy_above_idle_joules": cache_energy,
        "read_energy_over_full": ratio("energy_above_idle_joules"),
        "read_energy_with_caching_over_full": with_cache, "read_runs_sharing_the_cache": read_runs,
        "read_peak_memory_over_full": ratio("peak_memory_bytes"),
        "read_peak_reserved_over_full": ratio("peak_reserved_bytes"),
        "throughput_tokens_per_second": throughput, "sweep_speedup": sweeps,
        "targets": {"READ energy <= 0.2 of full fine-tuning's": target(ratio("energy_above_idle_joules"), 0.2),
                    "READ peak memory <= 0.3 of full fine-tuning's": target(ratio("peak_memory_bytes"), 0.3),
                    "32-member sweep >= 8x faster than 32 runs": target(sweeps[32], 8, at_most=False)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True,
              help="A folder with all-MiniLM-L6-v2/, glue/ and t5/t5-small/.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where every result goes ($OUT).")
@click.option("--deadline", type=float, default=540, show_default=True, help="Seconds for everything.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--sst-limit", type=int, default=4000, show_default=True, help="SST-2 rows per split.")
@click.option("--limit-scale", type=float, default=1.0, show_default=True,
              help="Multiply every step's limit (set for a GPU): a CPU dry run takes longer per row.")
def main(data, out, deadline, device, sst_limit, limit_scale):
    began = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    caches, runs = work / "caches", work / "runs"
    mini, glue, t5 = data / "all-MiniLM-L6-v2", data / "glue", data / "t5" / "t5-small"
    sst, rte, t5_rte = caches / "all-MiniLM-L6-v2" / "sst2", caches / "all-MiniLM-L6-v2" / "rte", caches / "t5-small-random" / "rte"
    gpu, idle = preflight(out, device)
    checks = Checks(out, deadline - (time.monotonic() - began), gpu, idle, limit_scale)
    checks.say(f"preflight: {json.loads((out / 'preflight.json').read_text())}")
    if "error" in json.loads((out / "preflight.json").read_text()):
        checks.say("preflight failed: nothing else runs")
        sys.exit(1)
    py = sys.executable
    def tool(name):  # this install's console script: beside its Python, else on PATH
        beside = Path(sys.executable).with_name(name)
        return [str(beside) if beside.is_file() else shutil.which(name) or name]

    cache = lambda *a: tool("cache-activations") + ["--data-dir", str(glue), "--out", str(caches), "--device", device, "--quiet", *a]  # noqa: E731
    train = lambda *a: tool("train-side") + ["--out", str(runs), "--device", device, "--quiet", *a]  # noqa: E731
    compare = [py, "scripts/compare/methods.py", "--cache", str(sst), "--model", str(mini), "--data-dir", str(glue),
               "--seeds", "0", "--read-lrs", "1e-3", "--full-lrs", "5e-5", "--bitfit-lrs", "3e-3", "--lora-lrs", "1e-3",
               "--read-epochs", "3", "--epochs", "3", "--device", device, "--results", str(out / "compare.jsonl"),
               "--out", str(out / "compare")] + (["--idle-watts", str(idle)] if idle is not None else [])
    sst_tokens = None

    def after(name):
        nonlocal sst_tokens
        if name == "cache-sst2" and checks.status.get(name) == 0:
            manifest = json.loads((sst / "zarr.json").read_text())["attributes"]["read_cache"]
            sst_tokens = manifest["splits"]["train"]["n_tokens"]
        summarise(checks, out, sst_tokens)

    def step(name, limit, command, **options):
        checks.step(name, limit, command, **options)
        after(name)

    # 1-3: the paper's figures
    step("cache-sst2", 150, cache("--task", "sst2", "--model", str(mini), "--limit", str(sst_limit)), metered=True)
    step("compare", 300, compare + ["--methods", "read,full,lora"], needs=("cache-sst2",))
    step("compare-more", 150, compare + ["--methods", "bitfit,read-online"], needs=("cache-sst2",))
    # 4-5: throughput and the sweep
    for m in MEMBERS:
        step(f"throughput-{m}", 60, [py, "scripts/bench/throughput.py", str(sst), "--device", device, "--batches", "40",
                                     "--members", str(m)], needs=("cache-sst2",))
    for m in (8, 32):
        step(f"sweep-{m}", 240 if m == 32 else 120, [py, "scripts/bench/sweep.py", "--cache", str(sst), "--epochs", "1",
                                                    "--rnn", "gru", "--hidden", "64", "--lr", ",".join(SWEEP_LRS[:m]),
                                                    "--device", device], needs=("cache-sst2",))
    # 6: every other CUDA path once
    inputs = out / "inputs.jsonl"
    rows = (glue / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:201]
    inputs.write_text("".join(json.dumps({"sentence": r.split("\t")[0]}) + "\n" for r in rows))
    step("train-sst2", 120, train("--from-cache", str(sst), "--epochs", "1"), needs=("cache-sst2",))
    single = next((p.parent for p in (runs / "all-MiniLM-L6-v2-sst2").glob("*/model.safetensors")), runs / "none")
    step("predict", 60, tool("predict-side") + ["--model", str(mini), "--checkpoint", str(single), "--device", device,
                                                "--input", str(inputs), "--output", str(out / "predictions.jsonl"),
                                                "--quiet"], needs=("train-sst2",))
    step("cache-rte", 60, cache("--task", "rte", "--model", str(mini), "--limit", "300"))
    step("train-multi", 90, train("--multi-task", "--from-cache", str(sst), "--from-cache", str(rte), "--epochs", "1"),
         needs=("cache-sst2", "cache-rte"))
    step("cache-t5", 90, cache("--task", "rte", "--model", str(t5), "--init", "random", "--limit", "200"))
    step("train-t5", 60, train("--from-cache", str(t5_rte), "--epochs", "1"), needs=("cache-t5",))
    shared = "cuda:0" if device.startswith("cuda") else device  # two ranks on the one GPU, on purpose
    step("torchrun", 120, [py, "-m", "torch.distributed.run", "--nproc-per-node", "2"] + tool("train-side")
         + ["--from-cache", str(rte), "--lr", "3e-4,1e-3", "--seeds", "0,1", "--epochs", "1", "--out",
            str(runs / "torchrun"), "--device", shared, "--quiet"], needs=("cache-rte",))
    step("verify", 60, tool("cache-inspect") + [str(sst), "--verify"], needs=("cache-sst2",))
    # 7: the profile
    step("profile", 90, [py, "scripts/bench/throughput.py", str(sst), "--device", device, "--batches", "20", "--profile"],
         needs=("cache-sst2",))
    summary = summarise(checks, out, sst_tokens)
    failed = [n for n, s in checks.status.items() if s != 0]
    checks.say(f"\ndone in {time.monotonic() - began:.0f} s; targets: {summary['targets']}; "
               f"{'failed or skipped: ' + ', '.join(failed) if failed else 'every step passed'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
