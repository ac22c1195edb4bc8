"""Build llama.cpp's `llama-server` from the llama-cpp-python source distribution, once.

    python -m benchmarks.llama_server_build      # prints the binary's path

The sdist on PyPI vendors llama.cpp (vendor/llama.cpp). It is fetched with pip (no other
download), built with cmake for this CPU (`GGML_NATIVE`, static, no curl), and the binary is
cached under `.llama_server/` (git-ignored); later calls return the cached binary at once.
About 6-10 minutes on 2 cores. Only the benchmark uses it; nothing in the product does.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path(__file__).resolve().parent.parent / ".llama_server"
BINARY = CACHE / "bin" / "llama-server"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def build_llama_server(jobs: int = 2) -> Path:
    """The cached llama-server binary, built first if it is not there."""
    if BINARY.is_file():
        return BINARY
    src = CACHE / "src"
    src.mkdir(parents=True, exist_ok=True)
    sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", LLAMA_CPP_PYTHON,
              "-d", str(src)])
        sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    root = src / sdists[-1].name.removesuffix(".tar.gz")
    if not root.is_dir():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(src, filter="data")
    llama_cpp = root / "vendor" / "llama.cpp"
    _run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
          "-DCMAKE_BUILD_TYPE=Release"], cwd=llama_cpp)
    _run(["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"], cwd=llama_cpp)
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(llama_cpp / "build" / "bin" / "llama-server", BINARY)
    return BINARY


if __name__ == "__main__":
    print(build_llama_server())
