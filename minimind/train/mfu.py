"""Peak FLOP/s of the training device, the denominator of MFU (model FLOPs utilisation).

GPUs: dense bf16/fp16 tensor-core peaks from the vendors' datasheets. CPUs and unknown GPUs: measured on the
spot with a large fp32 (or requested dtype) matmul, which is the ceiling a training step can approach.
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 peak TFLOP/s by device-name substring, from vendor datasheets.
GPU_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10": 125.0, "4090": 165.2, "3090": 71.0, "A6000": 154.8, "V100": 125.0, "T4": 65.0,
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                         seconds: float = 0.5) -> float:
    """Sustained FLOP/s of an n×n matmul on `device` (best of repeated timing windows)."""
    # a private generator: measuring must not move the global RNG that dropout and resume depend on
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    for _ in range(2):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The FLOP/s MFU is measured against on this device and dtype."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return measure_matmul_flops(device, dtype)
