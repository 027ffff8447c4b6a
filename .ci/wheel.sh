#!/usr/bin/env bash
# CI step: build the wheel with the CUDA kernels for sm_80 and sm_90 from scratch (this is
# the compile check of the CUDA sources: QRA_REQUIRE_CUDA=1 turns a CUDA compile error into
# a failure instead of the CPU-only fallback), install it in a fresh virtual environment
# with torch 2.13.0, import it there (no GPU needed), and check what build_info() reports
# and that the extension links neither torch nor a shared CUDA runtime; then the static gate of
# the CUDA kernels on that very build (qra_kernels/bench/static.py: no local memory, registers
# within budget; per-kernel counts to $QRA_STATIC_JSON when set).
#
#   .ci/wheel.sh            # ~6-8 min on 2 cores (see the report in the PR)
# Needs: nvcc, a C++ compiler, cmake, ninja and pybind11 in the current environment
# (pip install -e ".[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qra-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

export QRA_CUDA_ARCHS="80;90" QRA_REQUIRE_CUDA=1 QRA_BUILD_DIR="$WORK/build"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
start=$SECONDS
python -m pip wheel "$ROOT" --no-deps --no-build-isolation -w "$WORK/dist" -q
echo "wheel.sh: wheel built in $((SECONDS - start)) s: $(ls "$WORK"/dist)"

python -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q torch==2.13.0 numpy
"$PY" -m pip install -q --no-deps "$WORK"/dist/qra-*.whl

# The static gate reads the SASS of the built extension (sm_80 and sm_90) with the cuobjdump
# Triton ships: run by this environment's Python, on the installed wheel's binary.
SO=$(ls "$WORK"/venv/lib/python*/site-packages/qra_kernels/_C*.so)
python -m qra_kernels.bench.static --cuda-binary "$SO" --check --table \
  --out "${QRA_STATIC_JSON:-$WORK/static.json}"

cd "$WORK"  # away from the source tree, so the installed package is the one imported
"$PY" - <<'PYEOF'
import pathlib
import subprocess

import torch

import qra_kernels as qk
from qra_kernels import _C

assert pathlib.Path(qk.__file__).is_relative_to(pathlib.Path(torch.__file__).parents[1]), \
    f"imported {qk.__file__}, not the installed wheel"
info = qk.build_info()
print("wheel.sh: build_info() =", info)
assert info["cpu_extension"] is True, info
assert info["cuda_compiled"] is True, info
assert sorted(info["cuda_archs"]) == ["80", "90"], info
assert "cpu" in info["backends"], info

# No torch ABI coupling and no shared CUDA runtime: the wheel runs with any torch build.
needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True,
                        check=True).stdout
bad = [lib for lib in ("libtorch", "libc10", "libcudart") if lib in needed]
assert not bad, f"_C links {bad}:\n{needed}"

# The installed CPU kernel computes what the reference computes.
torch.manual_seed(0)
qw = qk.quantize_weight(torch.randn(96, 160), 3, group_size=32, method="rtn")
x, a, b = torch.randn(2, 160), torch.randn(7, 160), torch.randn(96, 7)
ys = {}
for name in ("cpu", "reference"):
    qk.set_backend(name)
    ys[name] = qk.qra_linear(x, qw, a, b, scaling=0.5)
torch.testing.assert_close(ys["cpu"], ys["reference"], rtol=1e-4, atol=1e-4)
print("wheel.sh: OK")
PYEOF
