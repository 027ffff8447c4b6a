#!/usr/bin/env bash
# One prepared GPU session: everything the first (and every later) H100/H200 run should do,
# each step under its own time limit, the whole in at most 8 minutes, results in $OUT.
#
#   bash benches/gpu_run.sh [--out DIR] [--dry-run]
#
# The machine: Python 3.12 with its own torch and triton, nvcc, no network. Packages it may
# lack (cma, gguf, pytest-xdist, the peers bitsandbytes / GemLite / HQQ) travel beside the
# tree as wheels in benches/wheels/ (git-ignored; filled beforehand by
# benches/prepare_wheels.sh) and are installed offline, --no-deps, only if missing.
#
# Steps (limit, seconds):
#   env      (15)  python, torch, triton, nvcc, nvidia-smi           -> env.log
#   install  (45)  missing packages from benches/wheels              -> install.log
#   build   (150)  the extension for sm_90 only, in place            -> build.log
#   static   (30)  SASS gate and counts of the built kernels (sm_90) -> static.json
#   tests   (130)  pytest -m gpu, 4 workers (xdist) when available   -> tests.log, junit.xml
#   bench    (95)  Llama-3-8B q/gate/down projections, M 1/16/256/4096 (decode first), bits
#                  2/3/4/8, ranks 0/16: qra cuda + triton vs cuBLAS bf16, tinygemm,
#                  bitsandbytes NF4, GemLite (those that install); a JSON per M -> bench-m*.json
#   compare  (15)  measured beside predicted (benches/results/static-*.json) -> compare.json
# 480 s of limits in all. A step that fails or runs out of time (SIGINT: pytest still writes
# its report) is recorded in summary.json and the next step runs.
#
# --dry-run runs the same steps on a CPU in well under a minute: the toolchain checks, a
# CMake configure instead of the build, the GPU tests collected (not run) plus an
# interpreter smoke test, the benchmark on tiny shapes with the reference backends. CI runs
# it (tests/qra_kernels/bench/test_gpu_run.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n 2,30p "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-${OUT_DIR:-$ROOT/benches/results/gpu-run-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
STEPS=()

# step NAME LIMIT COMMAND...: run under `timeout`, log to $OUT/NAME.log, record rc and time.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== [$((SECONDS - START))s] $name (limit ${limit}s)"
  # Steps are shell functions: `timeout` runs them in a child bash (functions and variables
  # exported below).
  timeout --signal=INT --kill-after=5 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  [ $rc -eq 124 ] && echo "   $name: time limit reached" >> "$OUT/$name.log"
  echo "   rc=$rc in ${dt}s (log: $OUT/$name.log)"
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit_s\": $limit}")
  return 0
}

env_step() {
  "$PY" - <<'PY'
import json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ("torch", "triton", "numpy"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({e})"
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = torch.cuda.get_device_capability(0)
except Exception:  # noqa: BLE001
    pass
for tool in ("nvcc", "nvidia-smi"):
    path = shutil.which(tool)
    info[tool] = path
    if path:
        args = [path, "--version"] if tool == "nvcc" else [path, "--query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total,driver_version", "--format=csv"]
        info[tool + "_out"] = subprocess.run(args, capture_output=True, text=True).stdout.strip()[-400:]
print(json.dumps(info, indent=1))
PY
}

install_step() {
  "$PY" - "$ROOT/benches/wheels" "$DRY" <<'PY'
import importlib.util, pathlib, subprocess, sys
wheels, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
# import name -> distribution name of the wheels prepare_wheels.sh downloads
wanted = {"cma": "cma", "gguf": "gguf", "xdist": "pytest_xdist", "execnet": "execnet",
          "bitsandbytes": "bitsandbytes", "gemlite": "gemlite", "hqq": "hqq",
          "hypothesis": "hypothesis", "sortedcontainers": "sortedcontainers"}
missing = [dist for mod, dist in wanted.items() if importlib.util.find_spec(mod) is None]
print("missing:", missing or "nothing")
files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
print("wheels beside the tree:", [f.name for f in files] or "none")
todo = [f for f in files if any(f.name.lower().startswith(d.lower() + "-") for d in missing)]
if not todo:
    sys.exit(0)
cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, todo)]
if dry:
    cmd.insert(4, "--dry-run")
print(" ".join(cmd))
sys.exit(subprocess.run(cmd).returncode)
PY
}

build_step() {
  if [ $DRY -eq 1 ]; then
    # The CMake configure of the sm_90 build (CMakeLists, nvcc, the architecture flag), no compile.
    if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
      local dir
      dir=$(mktemp -d)
      "$PY" - "$dir" <<'PY'
import subprocess, sys
import pybind11
try:
    import cmake
    exe = cmake.CMAKE_BIN_DIR + "/cmake"
except ImportError:
    exe = "cmake"
cmd = [exe, "-S", ".", "-B", sys.argv[1], "-DQRA_WITH_CUDA=ON", "-DQRA_CUDA_ARCHS=90",
       f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
print(" ".join(cmd))
sys.exit(subprocess.run(cmd).returncode)
PY
      local rc=$?
      rm -rf "$dir"
      return $rc
    fi
    echo "no nvcc: the CUDA build is skipped in this dry run"
    return 0
  fi
  QRA_CUDA_ARCHS=90 QRA_REQUIRE_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    QRA_BUILD_DIR="$ROOT/build/gpu-run" "$PY" setup.py build_ext --inplace
}

static_step() {
  local so
  so=$(ls "$ROOT"/qra_kernels/_C*.so 2>/dev/null | head -1)
  local args=(--out "$OUT/static.json" --table)
  if [ -n "$so" ] && "$PY" -c "import qra_kernels._C as c, sys; sys.exit(0 if c.build_info()['cuda_compiled'] else 1)"; then
    # sm_90 only: what the GPU run builds, and in a dry run (CI's extension carries more
    # architectures) it keeps the SASS read well inside the step's limit.
    args+=(--cuda-binary "$so" --cuda-arch sm_90)
  else
    echo "the extension here has no CUDA kernels: Triton only"
  fi
  if [ $DRY -eq 0 ]; then args+=(--triton model --model); fi
  "$PY" -m qra_kernels.bench.static "${args[@]}"
}

tests_step() {
  local xdist=()
  "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 4 --dist loadfile)
  if [ $DRY -eq 1 ]; then
    # Collect every GPU test (imports, parametrization), then a few interpreted kernels.
    "$PY" -m pytest -m gpu --collect-only -q tests/qra_kernels -p no:cacheprovider | tail -3 &&
      "$PY" -m pytest -q -p no:cacheprovider tests/qra_kernels/triton/test_forward.py \
        -k "test_every_bits_and_group and 64 and (gemv or decode16)"
    return $?
  fi
  "$PY" -m pytest -m gpu -q -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT/junit.xml" \
    tests/qra_kernels
}

bench_step() {
  if [ $DRY -eq 1 ]; then
    "$PY" -m qra_kernels.bench --device cpu --models tiny --ms 1,16 --bits 4 --ranks 0,16 \
      --implementations qra:reference,qra:cpu,torch_dense_bf16 --no-e2e --no-png \
      --min-time 0.01 --max-copies 2 --out "$OUT" --name bench-dry
    return $?
  fi
  local rc=0
  # One file per M: a time limit keeps what was measured before it.
  for m in 1 16 256 4096; do
    "$PY" -m qra_kernels.bench --device cuda --models Llama-3-8B \
      --layers q_proj,gate_proj,down_proj --ms "$m" --bits 2,3,4,8 --ranks 0,16 \
      --implementations qra:cuda,qra:triton,torch_dense_bf16,torch_int4pack_tinygemm,bitsandbytes_nf4,gemlite \
      --no-e2e --no-png --min-time 0.02 --out "$OUT" --name "bench-m$m" || rc=$?
  done
  return $rc
}

compare_step() {
  "$PY" - "$OUT" "$ROOT/benches/results" <<'PY'
import glob, json, pathlib, sys
from qra_kernels.bench import model
out, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
static = sorted(results.glob("static-*.json"))
bench = [json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))]
if not static or not bench:
    print("nothing to compare:", [p.name for p in static], len(bench)); sys.exit(0)
pred = json.loads(static[-1].read_text()).get("model", {}).get("predictions", [])
rows = [r for b in bench for r in b["rows"]]
gpu = (bench[0]["machine"].get("gpu") or {}).get("name", "")
cmp = model.compare(pred, rows, gpu)
(out / "compare.json").write_text(json.dumps({"static": static[-1].name, "gpu": gpu, "rows": cmp}, indent=1))
print(f"{len(cmp)} measured cases set beside their prediction ({static[-1].name})")
PY
}

export ROOT DRY OUT PY
export -f env_step install_step build_step static_step tests_step bench_step compare_step
step env 15 env_step
step install 45 install_step
step build 150 build_step
step static 30 static_step
step tests 130 tests_step
step bench 95 bench_step
step compare 15 compare_step

TOTAL=$((SECONDS - START))
{
  echo "{\"dry_run\": $DRY, \"total_seconds\": $TOTAL, \"out\": \"$OUT\", \"steps\": ["
  for i in "${!STEPS[@]}"; do
    [ "$i" -gt 0 ] && echo ","
    echo -n "  ${STEPS[$i]}"
  done
  echo "]}"
} > "$OUT/summary.json"
echo "== done in ${TOTAL}s: $OUT/summary.json"
FAILED=$(grep -c '"rc": [1-9]' "$OUT/summary.json" || true)
[ "$FAILED" -eq 0 ]
