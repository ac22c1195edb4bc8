"""Dtype names, and what `auto` means on the machine at hand.

`auto_dtype(device)` is bfloat16 where the hardware computes it well (a CPU with AVX-512 BF16 or
AMX, a CUDA GPU with bf16), else float32: on AVX2-only CPUs bfloat16 matmuls run 10-300x slower.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"invalid dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX-512 BF16 or AMX)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_summary() -> str:
    """One line for logs and benchmark reports: torch's CPU capability and the relevant flags."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    flags = cpu_flags()
    have = [f for f in wanted if f in flags]
    return f"torch capability {torch.backends.cpu.get_cpu_capability()}; flags: {' '.join(have) or 'unknown'}"


def auto_dtype(device: str) -> str:
    """bfloat16 where it is fast (CPU with AVX-512 / AMX bf16 instructions, or a CUDA GPU with bf16), else float32."""
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if ("AVX512" in capability or "AMX" in capability) and cpu_has_bf16():
        return "bfloat16"
    return "float32"
