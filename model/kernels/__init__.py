"""kvserve's own CPU kernels, each giving a row the same bits whatever else its batch holds:
GGUF Q4_1 / Q8_0 weights x float32 activations (q8_dot.cpp), dense float32 matmul in one fixed
order (dense_mm.cpp), and paged attention one query row at a time (paged_attention.cpp).

Built by `make install` (`python -m model.kernels.build`) into model/kernels/_build/, never at import
or run time. `available()` loads the library on first use and says whether its ops
(`torch.ops.kvserve.q4_1_mm`, `q8_0_mm`) can run; `unavailable_reason()` says why not: not built,
built for another torch, built for CPU features this machine lacks, or failed to load. Without it
the ATen forms (model/weight_forms.py) remain. The forms on these ops are in model/kernel_forms.py.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = tuple(HERE / name for name in ("q8_dot.cpp", "dense_mm.cpp", "paged_attention.cpp", "rms_norm.cpp"))
BUILD_DIR = HERE / "_build"
BUILD_INFO = BUILD_DIR / "build.json"
LIBRARY_NAME = "kvserve_kernels"
BUILD_HINT = "run `make install` or `python -m model.kernels.build`"


def build_problem(build_dir: Path, torch_version: str, cpu_flags: set[str] | None) -> str | None:
    """Why the library in `build_dir` must not be loaded here (None: it may be)."""
    library, info_file = build_dir / f"{LIBRARY_NAME}.so", build_dir / "build.json"
    if not library.exists() or not info_file.exists():
        return f"the kernel library is not built ({library} missing): {BUILD_HINT}"
    info = json.loads(info_file.read_text())
    if info.get("torch") != torch_version:
        return f"the kernel library was built for torch {info.get('torch')}, this is {torch_version}: {BUILD_HINT}"
    missing = sorted(set(info.get("cpu_features", [])) - cpu_flags) if cpu_flags is not None else []
    if missing:
        return (f"the kernel library was built with -march={info.get('march')} and needs CPU features "
                f"{', '.join(missing)} that this CPU lacks: rebuild here ({BUILD_HINT})")
    return None


@functools.cache
def _load() -> str | None:
    """None once the library is loaded, else why it cannot be."""
    import torch

    from model.dtypes import cpu_flags

    problem = build_problem(BUILD_DIR, torch.__version__, cpu_flags() or None)  # empty: unreadable, not checked
    if problem is not None:
        return problem
    try:
        torch.ops.load_library(str(BUILD_DIR / f"{LIBRARY_NAME}.so"))
    except OSError as e:
        return f"the kernel library failed to load ({e}): {BUILD_HINT}"
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def build_info() -> dict[str, object]:
    """What `python -m model.kernels.build` recorded (torch, -march, flags, SIMD path); {} if not built."""
    return json.loads(BUILD_INFO.read_text()) if BUILD_INFO.exists() else {}
