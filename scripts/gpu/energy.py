"""Run a command and report what it cost the GPU: wall seconds, energy (NVML's counter) and the most
device memory in use while it ran (NVML, sampled every 50 ms; the whole device, every process).

    python scripts/gpu/energy.py -- cache-activations --task sst2 --model MODEL --device cuda

Prints one line, `gpu_energy: {...}` (JSON), after the command's own output; exits with its status.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    import pynvml  # nvidia-ml-py

    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command:
        print("usage: gpu_energy.py -- COMMAND...", file=sys.stderr)
        return 2
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = [pynvml.nvmlDeviceGetMemoryInfo(handle).used]
    running = True

    def sample():
        while running:
            used.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    energy0, began = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()  # millijoules
    sampler.start()
    status = subprocess.call(command)
    seconds = time.perf_counter() - began
    joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - energy0) / 1000
    running = False
    sampler.join()
    print("gpu_energy: " + json.dumps({"command": " ".join(command[:3]), "seconds": round(seconds, 2),
                                       "joules": round(joules, 1), "mean_watts": round(joules / seconds, 1),
                                       "idle_memory_mib": used[0] // 2**20,
                                       "peak_memory_mib": max(used) // 2**20, "status": status}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
