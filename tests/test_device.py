"""minimind/device.py: device names, dtype names and the CPU description other layers share."""

from __future__ import annotations

import builtins

import pytest
import torch

from minimind import device
from minimind.errors import UserError


def test_device_names():
    assert device.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device torch knows"):
        device.resolve_device("toaster")
    assert device.dtype_name("bfloat16") == "bf16" and device.dtype_name("FP32") == "fp32"


def test_cpu_info_reads_model_and_flags(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu avx2 avx512f\n\n"
                    "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu avx2 avx512f\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    device.cpu_info.cache_clear()
    try:
        info = device.cpu_info()
        assert info.model == "Example CPU 9000" and info.flags == {"fpu", "avx2", "avx512f"}
    finally:
        device.cpu_info.cache_clear()


def test_cpu_info_without_proc_has_no_flags(monkeypatch):
    def missing(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(builtins, "open", missing)
    device.cpu_info.cache_clear()
    try:
        assert device.cpu_info().flags == frozenset()
    finally:
        device.cpu_info.cache_clear()
