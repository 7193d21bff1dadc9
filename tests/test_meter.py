"""side_train/meter.py on a fake NVML (tests/fake_nvml): energy above idle from the counter, from power
readings where the device has no counter, and null with the reason when readings fail or NVML is missing;
a GPU is found by its UUID."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from side_train.meter import EnergyMeter, Gpu

FAKE = Path(__file__).resolve().parent / "fake_nvml" / "pynvml.py"


@pytest.fixture
def nvml(monkeypatch):
    spec = importlib.util.spec_from_file_location("pynvml", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_energy_above_idle_from_the_counter(nvml):
    gpu = Gpu("1234-abcd")
    assert gpu.handle is not None and gpu.note is None  # found by UUID
    meter = EnergyMeter(gpu, idle_watts=100.0)
    meter.start()
    time.sleep(0.3)
    out = meter.stop()
    assert out["energy_source"] == "energy counter"
    assert out["energy_joules"] == pytest.approx(150 * out["wall_seconds"], rel=0.1)  # the fake draws 150 W
    assert out["energy_above_idle_joules"] == pytest.approx(50 * out["wall_seconds"], rel=0.3)


def test_power_readings_stand_in_for_a_missing_counter_and_a_failure_is_never_zero(nvml, monkeypatch):
    def no_counter(handle):
        raise nvml.NVMLError("not supported")

    monkeypatch.setattr(nvml, "nvmlDeviceGetTotalEnergyConsumption", no_counter)
    meter = EnergyMeter(Gpu("1234"), idle_watts=None)
    meter.start()
    time.sleep(0.6)  # the last reading's interval is not counted: a long interval keeps that small
    out = meter.stop()
    assert out["energy_source"] == "power readings every 50 ms"
    assert out["energy_joules"] == pytest.approx(100 * out["wall_seconds"], rel=0.3)
    assert out["energy_above_idle_joules"] is None  # no idle power measured: nothing to subtract from

    calls = []

    def failing(handle):
        calls.append(1)
        if len(calls) > 1:
            raise nvml.NVMLError("GPU is lost")
        return 100_000

    monkeypatch.setattr(nvml, "nvmlDeviceGetPowerUsage", failing)
    meter = EnergyMeter(Gpu("1234"), idle_watts=50.0)
    meter.start()
    time.sleep(0.3)
    out = meter.stop()
    assert out["energy_joules"] is None and "power sampling stopped" in out["energy_note"]


def test_without_nvml_energy_is_null_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    gpu = Gpu("1234")
    assert gpu.handle is None and "no NVML" in gpu.note and gpu.idle_watts(0.1) is None
    meter = EnergyMeter(gpu, idle_watts=None)
    meter.start()
    out = meter.stop()
    assert out["energy_joules"] is None and "no NVML" in out["energy_note"]


def test_an_unknown_uuid_falls_back_to_nvml_numbering_and_says_so(nvml, monkeypatch):
    def unknown(uuid):
        raise nvml.NVMLError("not found")

    monkeypatch.setattr(nvml, "nvmlDeviceGetHandleByUUID", unknown)
    gpu = Gpu("1234")
    assert gpu.handle is not None and "NVML knows no GPU-1234" in gpu.note and "index 0" in gpu.note
    assert gpu.idle_watts(0.2) == pytest.approx(100)
