"""The GPU image's versions live in one constraints file that the Dockerfile installs and the interpreter check uses;
each pin is exact and inside the range the `gpu` extra allows. (Whether the set resolves on PyPI is checked by
scripts/check_gpu_constraints.sh, which needs the network.)"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "docker/constraints-gpu.txt"


def _pins() -> dict[str, str]:
    lines = [line.strip() for line in (ROOT / CONSTRAINTS).read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("#")]
    for req in reqs:
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{req} is not an exact pin"
    return {req.name: next(iter(req.specifier)).version for req in reqs}


def test_constraints_pin_the_gpu_stack_exactly() -> None:
    pins = _pins()
    assert set(pins) == {"torch", "triton", "mamba-ssm"}
    extra = re.search(r"^gpu = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for text in re.findall(r'"([^"]+)"', extra):  # the gpu extra accepts the pinned versions
        req = Requirement(text)
        assert req.specifier.contains(pins[req.name]), f"{req} excludes the pinned {pins[req.name]}"


def test_dockerfile_installs_the_constraints_on_a_devel_image() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    assert "-devel" in base  # nvcc, for mamba-ssm's CUDA extension when no prebuilt wheel matches
    installs = [line for line in docker.splitlines() if "pip install" in line]
    assert installs and all(f"-c {CONSTRAINTS}" in line for line in installs)  # every pip install is constrained
    assert f"COPY {CONSTRAINTS}" in docker
    assert any('".[gpu]"' in line and "--no-build-isolation" in line for line in installs)
    assert not re.search(r"(torch|triton|mamba-ssm)[=<>~]=", docker)  # no second copy of a version


def test_interpreter_check_uses_the_same_constraints() -> None:
    script = (ROOT / "scripts" / "triton_check.sh").read_text()
    assert f"constraints={CONSTRAINTS}" in script and '-c "$constraints"' in script
    assert not re.search(r"(torch|triton|mamba-ssm)==", script)
