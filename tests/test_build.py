"""The build (setup.py + CMakeLists.txt): the wheel with the CUDA kernels for sm_80 and
sm_90 builds, installs in a fresh venv and imports (.ci/wheel.sh, slow: minutes of nvcc);
and the fallbacks never fail an install: a broken CUDA build falls back to the CPU
extension, and QRA_NO_EXTENSION=1 gives a pure-Python wheel."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def _build_wheel(tmp_path, **env):
    full_env = {**os.environ, "QRA_BUILD_DIR": str(tmp_path / "build"),
                "CMAKE_BUILD_PARALLEL_LEVEL": "2", **env}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist")],
                         env=full_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("qra-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_wheel_with_cuda_builds_installs_and_imports():
    # The CI compile check of the CUDA sources (sm_80 and sm_90) and the fresh-venv install.
    out = subprocess.run(["bash", str(ROOT / ".ci" / "wheel.sh")], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "wheel.sh: OK" in out.stdout


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_failed_cuda_build_falls_back_to_the_cpu_extension(tmp_path):
    # An architecture nvcc rejects makes the CUDA configure step fail: the install must go on
    # with the CPU kernel and say so.
    wheel, log = _build_wheel(tmp_path, QRA_CUDA_ARCHS="1")
    assert "retrying with the CPU kernel only" in log
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("qra_kernels/_C") and n.endswith(".so") for n in names), names


def test_no_extension_gives_a_pure_python_wheel(tmp_path):
    wheel, log = _build_wheel(tmp_path, QRA_NO_EXTENSION="1")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.endswith(".so") for n in names), names
    assert "qra_kernels/ops.py" in names and "qra_kernels/backends/cpu_backend.py" in names
