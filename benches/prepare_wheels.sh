#!/usr/bin/env bash
# Fill benches/wheels/ (git-ignored) with the wheels benches/gpu_run.sh installs offline on a
# GPU machine that has Python 3.12 and its own torch/triton but no network: binary wheels
# only, for CPython 3.12 on x86-64 Linux, without dependencies (torch, triton and numpy are
# the machine's own). Run it where a package index is reachable:
#
#   bash benches/prepare_wheels.sh            # then carry benches/wheels with the tree
#
# A package with no such wheel is reported and skipped (gpu_run.sh then benchmarks without it).
# Marlin is not among them: no wheel ships its kernels independently of a torch build.
set -uo pipefail
cd "$(dirname "$0")"
DEST=wheels
mkdir -p "$DEST"
PY=${PYTHON:-python3}
# cma, gguf: project dependencies; pytest-xdist (+ execnet): parallel GPU tests;
# hypothesis (+ sortedcontainers): the test suite; bitsandbytes, gemlite, hqq: peers.
PKGS=("cma==4.5.0" "gguf==0.19.0" "pytest-xdist==3.8.0" "execnet==2.1.2" "hypothesis==6.170.15"
      "sortedcontainers==2.4.0" "bitsandbytes==0.50.2" "gemlite==0.6.0.post2" "hqq==0.2.8.post1")
status=0
for pkg in "${PKGS[@]}"; do
  if "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform any -d "$DEST" "$pkg"; then
    echo "ok       $pkg"
  else
    echo "skipped  $pkg (no binary wheel for CPython 3.12 / x86-64 Linux)"
    status=1
  fi
done
ls -l "$DEST"
exit $status
