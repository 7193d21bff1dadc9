"""What a run costs: peak memory, and on an NVIDIA GPU the energy it drew above idle.

Memory: on a GPU, torch's peak allocated and reserved bytes since `start()` (the allocator's reserve
is what the device really holds for the process, the CUDA context aside); on a CPU, the peak resident
set size above the process's size at `start()`.

Energy (NVML, the `nvidia-ml-py` package, imported only when asked for): the device's energy counter
where it has one, else its power readings integrated every 50 ms on a thread; minus the idle power
(measured beforehand, `Gpu.idle_watts`) times the seconds. The GPU is found by its UUID, which CUDA and
NVML agree on (their device indices need not). Where NVML is missing, or the device cannot report
(MIG slices, some VMs), energy is None and `energy_note` says why: never a silent 0.
"""
from __future__ import annotations

import resource
import threading
import time

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """The peak so far: allocated GPU memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class Gpu:
    """One GPU as NVML sees it; `note` says why a reading is unavailable (then `handle` is None)."""

    def __init__(self, uuid: str | None = None, index: int = 0):
        self.handle, self.note, self.nvml = None, None, None
        try:
            import pynvml
        except ImportError:
            self.note = "no NVML (pip install nvidia-ml-py)"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.note = f"NVML: {exc}"
            return
        if uuid:
            wanted = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(wanted)
                return
            except pynvml.NVMLError as exc:
                self.note = f"NVML knows no {wanted} ({exc}); "
        try:  # no CUDA device to ask for a UUID (a dry run), or NVML did not know it: NVML's own numbering
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.note = (self.note or "") + f"found by NVML index {index}, not by UUID"
        except pynvml.NVMLError as exc:
            self.note = (self.note or "") + f"NVML: {exc}"

    @classmethod
    def of(cls, device: torch.device) -> "Gpu":
        uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        return cls(uuid)

    def power_watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000  # milliwatts

    def energy_joules(self) -> float | None:
        """The device's energy counter, or None where it has none."""
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000  # millijoules
        except self.nvml.NVMLError:
            return None

    def idle_watts(self, seconds: float = 5.0) -> float | None:
        """The mean power over `seconds` of doing nothing (what every figure is measured above)."""
        if self.handle is None:
            return None
        readings = []
        end = time.perf_counter() + seconds
        try:
            while time.perf_counter() < end:
                readings.append(self.power_watts())
                time.sleep(0.05)
        except self.nvml.NVMLError as exc:
            self.note = f"power readings: {exc}"
            return None
        return sum(readings) / len(readings) if readings else None


class EnergyMeter:
    """Energy between start() and stop() on one Gpu: its counter, or its power integrated on a thread."""

    def __init__(self, gpu: Gpu, idle_watts: float | None = None):
        self.gpu, self.idle_watts = gpu, idle_watts
        self._thread, self._error, self._joules, self._samples = None, None, 0.0, 0

    def start(self) -> None:
        self.began = time.perf_counter()
        self._counter = self.gpu.energy_joules() if self.gpu.handle is not None else None
        if self.gpu.handle is not None and self._counter is None:
            self._running = True
            self._thread = threading.Thread(target=self._integrate, daemon=True)
            self._thread.start()

    def _integrate(self) -> None:
        last = time.perf_counter()
        try:
            while self._running:
                time.sleep(0.05)
                now = time.perf_counter()
                self._joules += self.gpu.power_watts() * (now - last)
                self._samples += 1
                last = now
        except Exception as exc:  # reported by stop(), never a silent 0
            self._error = f"power sampling stopped: {type(exc).__name__}: {exc}"

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.began
        joules, source, note = None, None, self.gpu.note
        if self.gpu.handle is None:
            pass
        elif self._thread is None:
            end = self.gpu.energy_joules()
            joules, source = (end - self._counter if end is not None else None), "energy counter"
        else:
            self._running = False
            self._thread.join()
            if self._error or not self._samples:
                note = self._error or "no power reading in the interval"
            else:
                joules, source = self._joules, "power readings every 50 ms"
        above = None if joules is None or self.idle_watts is None else joules - self.idle_watts * seconds
        return {"energy_joules": joules, "energy_above_idle_joules": above, "idle_watts": self.idle_watts,
                "energy_source": source, "energy_note": note, "wall_seconds": seconds}


class Meter:
    """Peak memory and energy of what runs between start() and stop() in this process, on `device`."""

    def __init__(self, device: torch.device, idle_watts: float | None = None):
        self.device = device
        self.energy = EnergyMeter(Gpu.of(device), idle_watts) if device.type == "cuda" else None

    def start(self) -> None:
        self.began = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # per run: a sweep's runs do not inherit a peak
            self.energy.start()
        else:
            self.baseline = peak_memory_bytes(self.device)

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                    "memory_kind": "cuda max_memory_allocated", **self.energy.stop()}
        return {"peak_memory_bytes": peak_memory_bytes(self.device) - self.baseline, "peak_reserved_bytes": None,
                "memory_kind": "peak RSS above baseline", "energy_joules": None, "energy_above_idle_joules": None,
                "idle_watts": None, "energy_source": None, "energy_note": "not measured on a CPU",
                "wall_seconds": time.perf_counter() - self.began}
