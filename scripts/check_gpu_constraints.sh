#!/usr/bin/env bash
# Check on PyPI that the GPU image's versions (docker/constraints-gpu.txt) still resolve together, for the image's
# platform (Linux x86_64, the Python of the Dockerfile's base image), without downloading any large wheel (pip reads
# the published metadata only). From the repository root:
#     bash scripts/check_gpu_constraints.sh
# Fails (exit 1) when a pin is not exact, a pin's published requirements conflict with the others or with the
# package's own dependencies, torch's triton pin differs from ours, or torch's CUDA major version differs from the
# base image's nvcc. Needs network access to PyPI; builds a small .venv-gpu-check (torch's CPU wheel) to read
# mamba-ssm's metadata, whose setup.py imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."

constraints=docker/constraints-gpu.txt
venv=.venv-gpu-check
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "check_gpu_constraints: FAIL: $*" >&2; exit 1; }

pins=$(grep -Ev '^\s*(#|$)' "$constraints")
for pin in $pins; do
  [[ "$pin" =~ ^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+$ ]] || fail "$constraints: '$pin' is not an exact pin (name==version)"
done
version_of() { echo "$pins" | sed -n "s/^$1==//p"; }
torch_pin=$(version_of torch); triton_pin=$(version_of triton); mamba_pin=$(version_of mamba-ssm)
[ -n "$torch_pin" ] && [ -n "$triton_pin" ] && [ -n "$mamba_pin" ] || fail "$constraints must pin torch, triton and mamba-ssm"

base=$(sed -n 's/^FROM \(nvidia\/cuda:[^ ]*\).*/\1/p' Dockerfile)
[[ "$base" == *-devel-* ]] || fail "Dockerfile: the base image '$base' is not a CUDA -devel image (mamba-ssm may need nvcc)"
cuda_major=$(echo "$base" | sed -n 's/^nvidia\/cuda:\([0-9]*\)\..*/\1/p')
case "$base" in
  *ubuntu24.04*) python=3.12 glibc=2_39 ;;
  *ubuntu22.04*) python=3.10 glibc=2_35 ;;
  *) fail "Dockerfile: unknown Python for base image '$base' (add it to $0)" ;;
esac

if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_pin" setuptools wheel packaging ninja
fi
# PyPI itself: no pip configuration files, no PIP_* settings (local mirrors, find-links, constraints) of this machine.
pip=(env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p') PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" --disable-pip-version-check)
platforms=()  # the image's glibc and every older manylinux tag (pip does not widen an explicit --platform itself)
for v in $(seq "${glibc#2_}" -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform linux_x86_64)

# 1. mamba-ssm is published as source only: read its requirements (its setup.py needs torch, from the venv).
MAMBA_SKIP_CUDA_BUILD=TRUE "${pip[@]}" install -q --dry-run --ignore-installed --no-deps --no-build-isolation \
  --report "$work/mamba.json" "mamba-ssm==$mamba_pin" >/dev/null || fail "mamba-ssm==$mamba_pin: no such release on PyPI?"
# 2. The whole set with mamba-ssm's requirements and ours, as wheels for the image's platform and Python.
mapfile -t reqs < <("$venv/bin/python" - "$work/mamba.json" <<'PY'
import json, sys, tomllib
from packaging.requirements import Requirement
mamba = json.load(open(sys.argv[1]))["install"][0]["metadata"].get("requires_dist", [])
ours = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for text in mamba + ours:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": ""}):  # skip extras of mamba-ssm (causal-conv1d, dev)
        print(text)
PY
)
"${pip[@]}" install -q --dry-run --ignore-installed --only-binary=:all: --python-version "$python" "${platforms[@]}" \
  --target "$work/target" --report "$work/all.json" \
  -c "$constraints" "torch==$torch_pin" "triton==$triton_pin" "${reqs[@]}" >/dev/null \
  || fail "the pins in $constraints do not resolve with mamba-ssm's and tim4rec-pl's requirements (Python $python)"
# 3. torch's own pins: the same triton, and the CUDA major version of the image's nvcc.
"$venv/bin/python" - "$work/all.json" "$triton_pin" "$cuda_major" <<'PY' || fail "torch's requirements disagree with the image"
import json, re, sys
report, triton_pin, cuda_major = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
meta = {item["metadata"]["name"].lower(): item["metadata"] for item in report["install"]}
torch_reqs = meta["torch"].get("requires_dist", [])
triton = [r for r in torch_reqs if re.match(r"triton\b", r)]
cuda = [r for r in torch_reqs if re.match(r"(cuda-toolkit|nvidia-cuda-runtime)", r)]
found = {m.group(1) for r in cuda for m in [re.search(r"-cu(\d+)\b", r) or re.search(r"==(\d+)\.", r)] if m}
print(f"torch {meta['torch']['version']} requires: {'; '.join(r.split(';')[0] for r in triton + cuda)}")
if not triton or not all(f"=={triton_pin}" in r for r in triton):
    sys.exit(f"torch pins {triton}, not triton=={triton_pin}")
if found != {cuda_major}:
    sys.exit(f"torch is built with CUDA {sorted(found)}, but the image's nvcc is CUDA {cuda_major}")
PY
n=$("$venv/bin/python" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['install']))" "$work/all.json")
echo "check_gpu_constraints: OK: torch==$torch_pin triton==$triton_pin mamba-ssm==$mamba_pin resolve with $n packages" \
     "(Python $python, manylinux_${glibc}_x86_64, base image $base, CUDA $cuda_major)"
