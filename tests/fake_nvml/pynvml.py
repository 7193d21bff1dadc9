"""A stand-in for nvidia-ml-py's pynvml, for dry runs of scripts/gpu/checks.py on a CPU: one device drawing
100 W, whose energy counter counts 150 W from import (so that energy above idle is positive)."""
import time

_STARTED = time.monotonic()


class NVMLError(Exception):
    pass


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetHandleByIndex(index):
    if index != 0:
        raise NVMLError(f"no device {index}")
    return "fake-gpu-0"


def nvmlDeviceGetHandleByUUID(uuid):
    return "fake-gpu-0"


def nvmlDeviceGetPowerUsage(handle):
    return 100_000  # milliwatts


def nvmlDeviceGetTotalEnergyConsumption(handle):
    return int((time.monotonic() - _STARTED) * 150_000)  # millijoules
