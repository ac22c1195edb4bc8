"""`python -m model.kernels.build [--march native]`: compile the kernels (model/kernels/*.cpp) into
model/kernels/_build/ with torch's C++ extension tooling (ninja), for the torch installed here.

Run by `make install` and the Dockerfile, never at import or serve time. Writes build.json beside
the library: the torch version it was built for and the CPU features the compiler was allowed
(`-march`), which the loader (model/kernels/__init__.py) checks before it loads the library. An
image built for other machines passes a portable `--march`, e.g. x86-64-v3 (AVX2, FMA, F16C).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from model.kernels import BUILD_DIR, BUILD_INFO, LIBRARY_NAME, SOURCES

# compiler macro -> the /proc/cpuinfo flag the CPU must show for code built with it
CPU_FEATURES = {
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__BMI2__": "bmi2",
    "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX512DQ__": "avx512dq",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16", "__AVXVNNI__": "avx_vnni",
}


def compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def cpu_features(march: str) -> list[str]:
    """The CPU flags code compiled with -march=`march` may use (from the compiler's own macros)."""
    defined = subprocess.run([compiler(), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                             check=True, capture_output=True, text=True).stdout
    return sorted(flag for macro, flag in CPU_FEATURES.items() if f"#define {macro} " in defined)


def flags(march: str) -> list[str]:
    # -ffp-contract=off: no fused multiply-add the source did not ask for, so every path rounds alike
    return ["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]


def build(march: str) -> str:
    import torch
    from torch.utils import cpp_extension

    try:
        import ninja  # the PyPI package (a dependency): its binary need not be on PATH
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # cpp_extension then looks for ninja on PATH and says so if there is none
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    BUILD_INFO.unlink(missing_ok=True)  # a failed build leaves no stale description behind
    cflags = flags(march)
    features = cpu_features(march) if platform.machine() in ("x86_64", "AMD64") else []
    start = time.perf_counter()
    cpp_extension.load(name=LIBRARY_NAME, sources=[str(s) for s in SOURCES], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                       build_directory=str(BUILD_DIR), is_python_module=False, verbose=False)
    path = torch.ops.kvserve.simd_path()
    info = {"torch": torch.__version__, "march": march, "cflags": cflags, "cpu_features": features, "simd_path": path}
    BUILD_INFO.write_text(json.dumps(info, indent=1) + "\n")
    return (f"kvserve kernels: built {BUILD_DIR / (LIBRARY_NAME + '.so')} in {time.perf_counter() - start:.1f} s "
            f"({path} path, {compiler()} {' '.join(cflags)}, torch {torch.__version__})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default=os.environ.get("KVSERVE_KERNEL_MARCH", "native"),
                        help="the compiler's -march (default native; env KVSERVE_KERNEL_MARCH)")
    args = parser.parse_args(argv)
    print(build(args.march), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
