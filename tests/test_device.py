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


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_of(monkeypatch, caplog):
    """`--dtype bf16` (and `--rollout-dtype bf16`) on a CPU without AVX-512 BF16 or AMX runs every matmul through
    float32 conversions: the run goes on, with one warning saying so; with the instructions, no warning."""
    import logging

    from minimind.train.distributed import resolve_dtype

    cpu = torch.device("cpu")
    for flags, warned in ((frozenset({"avx2", "fma"}), True), (frozenset({"avx2", "avx512_bf16"}), False)):
        monkeypatch.setattr(device, "cpu_info", lambda flags=flags: device.CpuInfo("test", flags))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minimind.device"):
            assert resolve_dtype("bf16", cpu) == torch.bfloat16
            assert resolve_dtype("fp32", cpu) == torch.float32
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == warned, messages
        if warned:
            assert messages[0].startswith("--dtype bf16: this CPU has no bf16 instructions")
