"""CPU runtime settings (tim4rec_pl.cpu_runtime): applied by the CLI before torch loads, user settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tim4rec_pl import cpu_runtime

# Prints what the module applied, the OpenMP policy torch's OpenMP saw, and how many bytes a 64 MiB allocation
# put into mmap'ed blocks (glibc's mallinfo2: 0 when large buffers come from the heap).
_PROBE = """
import ctypes, json, os, sys
import {module}
import tim4rec_pl.cpu_runtime as rt
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
buf = bytearray(64 * 2**20)
print(json.dumps({{"applied": rt.applied, "omp": os.environ.get("OMP_WAIT_POLICY"),
                  "mmapped": libc.mallinfo2().hblkhd - before, "torch_loaded": "torch" in sys.modules}}))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION").split()[0] != "glibc",
    reason="mallopt/mallinfo2 are glibc's",
)


def _probe(module: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT", "TIM4REC_CPU"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_glibc
def test_cli_applies_settings_before_torch_loads():
    got = _probe("tim4rec_pl.cli")
    assert got["torch_loaded"]  # the CLI did load torch ...
    assert got["applied"]["OMP_WAIT_POLICY"] == "PASSIVE"  # ... but only after the policy was set
    assert got["omp"] == "PASSIVE"
    assert got["mmapped"] == 0  # large buffers come from the heap
    assert got["applied"]["MALLOC_MMAP_MAX_"] == "0"


@linux_glibc
def test_switch_off_and_user_settings_win():
    off = _probe("tim4rec_pl.cpu_runtime", TIM4REC_CPU_TUNING="0")
    assert off["applied"] == {} and off["omp"] is None
    assert off["mmapped"] >= 64 * 2**20  # glibc's default: a 64 MiB buffer is its own mmap
    mine = _probe("tim4rec_pl.cpu_runtime", OMP_WAIT_POLICY="ACTIVE", MALLOC_MMAP_MAX_="65536")
    assert mine["omp"] == "ACTIVE" and "OMP_WAIT_POLICY" not in mine["applied"]
    assert "MALLOC_MMAP_MAX_" not in mine["applied"]
    assert mine["mmapped"] >= 64 * 2**20  # the user's mmap limit was kept


def test_configure_on_a_given_environment():
    import torch  # noqa: F401  (loaded, as in any process that trains)

    env: dict[str, str] = {"MALLOC_TOP_PAD_": "4096"}
    done = cpu_runtime.configure(env)
    assert "OMP_WAIT_POLICY" not in done  # torch is loaded in this process: too late for OpenMP
    assert env["MALLOC_TOP_PAD_"] == "4096" and "MALLOC_TOP_PAD_" not in done
    if cpu_runtime._glibc() is not None:
        assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == str(64 * 2**30)
    assert cpu_runtime.configure({"TIM4REC_CPU_TUNING": "off"}) == {}
