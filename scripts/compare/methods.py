"""READ against the methods a user would pick instead (the paper's Table 1, Table 2's recurrence ablation
and Figure 2), on exactly the rows and splits of one READ cache per invocation:

    python scripts/compare/methods.py --cache caches/all-MiniLM-L6-v2/sst2 --model models/all-MiniLM-L6-v2 \\
        --data-dir ../shared/data/glue --results results/minilm.jsonl --out results/minilm

Methods (`METHODS`): the paper's READ from the cache (train-side's own training, `--recurrence`), READ
without recurrence (train-side's default), READ online (the backbone run live for every batch), full
fine-tuning, BitFit, LoRA and prompt tuning (PEFT), and a linear probe. Each configuration (method,
learning rate, seed) trains in a fresh process, so its peak memory is its own; every finished one is
appended to the --results JSON-lines file and skipped when the command is run again, so a study can be
run in pieces. After the runs, the tables, plots and a JSON summary are rebuilt from everything in that
file (`report.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when run from anywhere

# method -> (learning rates (the probe: inverse regularisation C), seeds used, epochs option)
METHODS = {
    "read": ("read_lrs", "seeds", "read_epochs"),
    "read-norec": ("read_lrs", "seeds", "read_epochs"),
    "read-online": ("read_lrs", "one_seed", "read_epochs"),
    "full": ("full_lrs", "one_seed", "epochs"),
    "bitfit": ("bitfit_lrs", "one_seed", "epochs"),
    "lora": ("lora_lrs", "one_seed", "epochs"),
    "prompt": ("prompt_lrs", "one_seed", "epochs"),
    "probe": ("probe_c", "one_seed", None),  # deterministic (lbfgs): more seeds would repeat it
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path, help="a READ cache (one task); every method trains on its rows")
    p.add_argument("--model", help="the backbone the cache was made from (folder or hub id)")
    p.add_argument("--data-dir", type=Path, help="GLUE's tsv layout, for read-online")
    p.add_argument("--methods", default="read,read-norec,read-online,full,bitfit,lora,prompt,probe")
    p.add_argument("--results", type=Path, default=Path("results/compare.jsonl"), help="JSON lines, appended")
    p.add_argument("--out", type=Path, default=Path("results/compare"), help="tables, plots and JSON summary")
    p.add_argument("--seeds", default="0,1,2", help="READ's seeds; the other methods use the first")
    p.add_argument("--read-lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--read-width", type=int, default=None, help="READ's side width (train-side's default)")
    p.add_argument("--read-epochs", type=int, default=None, help="READ's epochs (train-side's default)")
    p.add_argument("--read-memory-gb", type=float, default=None,
                   help="READ's memory budget for cached activations (train-side --memory-gb)")
    p.add_argument("--full-lrs", default="5e-5,1e-4")
    p.add_argument("--bitfit-lrs", default="1e-3,3e-3")
    p.add_argument("--lora-lrs", default="5e-4,1e-3")
    p.add_argument("--prompt-lrs", default="3e-3,3e-2")
    p.add_argument("--probe-c", default="0.01,0.1,1")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the methods that back-propagate through "
                                                         "the backbone")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                   help="every method's (train-side --precision): tf32 on a GPU, fp32 on the CPU by default")
    p.add_argument("--idle-watts", type=float, default=None,
                   help="the GPU's idle power, measured beforehand: energy is reported above it")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and plots from --results")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.report_only and not (args.cache and args.model):
        p.error("--cache and --model are needed (or --report-only)")
    return args


def jobs(args, task: str, backbone: str) -> list[dict]:
    """Every (method, configuration, seed) this invocation asks for."""
    import torch

    seeds = [int(s) for s in args.seeds.split(",") if s]
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device.split(":")[0]
    precision = ("tf32" if kind == "cuda" else "fp32") if args.precision == "auto" else args.precision
    found = []
    for method in args.methods.split(","):
        grid_option, seed_option, epochs_option = METHODS[method]
        for value in _floats(getattr(args, grid_option)):
            config = {"c" if method == "probe" else "lr": value}
            if epochs_option:
                epochs = getattr(args, epochs_option)
                if epochs is not None:
                    config["epochs"] = epochs
            if method.startswith("read") and args.read_width:
                config["width"] = args.read_width
            for seed in (seeds if seed_option == "seeds" else seeds[:1]):
                found.append({"backbone": backbone, "task": task, "method": method, "config": config, "seed": seed,
                              "device_kind": kind, "precision": precision})
    return found


def key(job: dict) -> str:
    """What makes a result: a GPU run is not the CPU run of the same configuration (results files made before
    device and precision were recorded count as the CPU's, in fp32)."""
    return json.dumps([job["backbone"], job["task"], job["method"], job["config"], job["seed"],
                       job.get("device_kind", "cpu"), job.get("precision", "fp32")], sort_keys=True)


def done_keys(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    return {key(json.loads(line)) for line in results.read_text().splitlines() if line.strip()}


def run_job(job: dict, args) -> dict:
    """One configuration in a fresh process (its own peak memory); its last stdout line is the result."""
    payload = {**job, "cache": str(args.cache), "model": args.model, "data_dir": str(args.data_dir or ""),
               "batch_size": args.batch_size, "device": args.device, "read_memory_gb": args.read_memory_gb,
               "idle_watts": args.idle_watts}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(payload)], stdout=subprocess.PIPE,
                          text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {**job, "status": f"failed: exit {proc.returncode}"}
    return {**job, **json.loads(lines[-1]), "status": "ok"}


def worker(payload: dict) -> dict:
    """Runs in the fresh process: train one configuration and measure it."""
    import torch
    import transformers  # noqa: F401  imported before the meter starts, for every method alike

    import baselines
    from cache_store import CacheReader
    from cache_store.runtime import resolve_device
    from side_train.meter import Meter
    from side_train.train import train  # noqa: F401  (ditto)

    if payload["method"] in ("lora", "prompt"):
        import peft  # noqa: F401  (ditto)

    device = resolve_device(payload["device"])
    cache = CacheReader(payload["cache"])
    meter = Meter(device, payload.get("idle_watts"))
    method, config, seed = payload["method"], payload["config"], payload["seed"]
    meter.start()
    if method == "probe":
        result = baselines.train_probe(cache, config["c"], seed)
    elif method.startswith("read"):
        result = _train_read(payload, cache)
    else:
        result = baselines.train_backprop(method, payload["model"], cache, config["lr"], seed,
                                          config.get("epochs", 5), payload["batch_size"], payload["device"], {},
                                          precision=payload["precision"])
    measured = meter.stop()
    backbone = result.get("backbone_parameters") or backbone_parameters(payload["model"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {**result, **measured, "backbone_parameters": backbone,
            "trainable_percent": 100 * result["trainable"] / backbone, "device": name}


def _train_read(payload: dict, cache) -> dict:
    from side_train.config import RunConfig
    from side_train.train import train

    config, method = payload["config"], payload["method"]
    options = {k: config[k] for k in ("width", "epochs") if k in config}
    if "epochs" in options:
        options["patience"] = options["epochs"]  # the whole budget: the best epoch is chosen afterwards
    run = RunConfig(lr=config["lr"], seed=payload["seed"], recurrence=method != "read-norec", **options)
    if method == "read-online":
        source = _online_source(payload, cache)
    else:
        source = Path(payload["cache"])
    memory = payload["read_memory_gb"]
    with tempfile.TemporaryDirectory() as out:
        metrics = train(source, [run], Path(out), device=payload["device"], progress=False, log=lambda line: None,
                        memory_bytes=int(memory * 2**30) if memory else None, precision=payload["precision"])[0]
    if metrics["status"] != "ok":
        raise RuntimeError(metrics["status"])
    best = metrics["best_epoch"]
    return {"validation": metrics["best_validation"], "test": metrics["test"], "best_epoch": best,
            "validation_curve": metrics["validation"], "train_loss": metrics["train_loss"],
            "epochs": metrics["epochs_run"], "epoch_seconds": metrics["sweep_epoch_seconds"],
            "trainable": metrics["parameters"]}


def _online_source(payload: dict, cache):
    """The live backbone on the cache's own rows (checked: the same source rows, in the same order)."""
    import numpy as np

    from pipeline.live import open_online

    manifest = cache.manifest
    backbone = manifest["backbone"]
    source = open_online(payload["model"], manifest["task"]["name"], Path(payload["data_dir"]),
                         manifest["split_protocol"]["limit"], backbone["init"], backbone["init_seed"] or 0,
                         payload["device"], manifest["max_length"], manifest["attention"])
    for name in ("train", "validation", "test"):
        if not np.array_equal(source.split(name).example_index, cache.split(name).example_index):
            raise RuntimeError(f"read-online: the {name} rows differ from the cache's; give the --data-dir "
                               "the cache was made from")
    return source


def backbone_parameters(model: str) -> int:
    """The backbone's parameter count, from its config alone (no weights are loaded)."""
    import torch
    import transformers

    from pipeline.backbones import FAMILIES

    config = transformers.AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = getattr(transformers, FAMILIES[config.model_type].auto_class).from_config(config)
    return sum(p.numel() for p in net.parameters())


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    args = parse(argv)
    if not args.report_only:
        from cache_store import CacheReader

        cache = CacheReader(args.cache)
        manifest = cache.manifest
        backbone = manifest["backbone"]["name"] + ("-random" if manifest["backbone"]["init"] == "random" else "")
        todo = jobs(args, manifest["task"]["name"], backbone)
        done = done_keys(args.results)
        pending = [j for j in todo if key(j) not in done]
        print(f"{len(todo)} configuration(s), {len(todo) - len(pending)} already in {args.results}", file=sys.stderr)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(pending, 1):
            began = time.perf_counter()
            result = run_job(job, args)
            if result["status"] == "ok":  # a failed one is tried again next time
                with open(args.results, "a") as handle:  # one whole line per finished configuration
                    handle.write(json.dumps(result) + "\n")
            print(f"[{i}/{len(pending)}] {job['task']} {job['method']} {job['config']} seed {job['seed']}: "
                  + (f"validation {result['validation']:.2f} test {result['test']:.2f}" if result["status"] == "ok"
                     else result["status"]) + f" ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    from report import write_report

    for path in write_report(args.results, args.out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
