"""Build script: the compiled extension ``qra_kernels._C`` is built by CMake + ninja.

Environment:

* ``QRA_CUDA_ARCHS`` — CUDA architectures, default ``"80;86;89;90"``;
* ``QRA_NO_CUDA=1`` — build the CPU extension only (also what happens without ``nvcc``);
* ``QRA_NO_EXTENSION=1`` — no compiled extension at all (pure Python, like a machine
  without a C++ compiler);
* ``QRA_REQUIRE_CUDA=1`` / ``QRA_REQUIRE_EXTENSION=1`` — a failed (CUDA) build is an error
  instead of a warning and a fallback (CI uses the first);
* ``QRA_BUILD_DIR`` — where CMake builds (default: setuptools' build_temp; a fresh
  directory forces a from-scratch compile, as .ci/wheel.sh does);
* ``CMAKE_BUILD_PARALLEL_LEVEL`` — parallel compile jobs (default: the CPU count).

Without a C++ compiler or CMake the package installs as pure Python: the reference and
Triton backends still work and ``build_info()`` reports ``cpu_extension: False``.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;86;89;90"


def _find_cxx():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _find_cmake():
    try:  # the `cmake` PyPI package (a build requirement in pyproject.toml)
        import cmake
        path = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("cmake")


def _find_nvcc():
    if _env_flag("QRA_NO_CUDA"):
        return None
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds the extension with CMake; a failed build never fails the install.

    A failed CUDA build is retried as a CPU-only build, and a failed CPU build leaves a
    pure-Python install, each with a warning — unless ``QRA_REQUIRE_CUDA=1`` (CI: the CUDA
    sources must compile) or ``QRA_REQUIRE_EXTENSION=1`` is set, which make it an error.
    """

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self._build_with_fallback(ext)
                built.append(ext)
            except (subprocess.CalledProcessError, OSError) as e:
                if _env_flag("QRA_REQUIRE_EXTENSION") or _env_flag("QRA_REQUIRE_CUDA"):
                    raise
                _warn(f"building {ext.name} failed ({e}); installing pure Python "
                      "(reference and Triton backends only)")
        # Only what was built is an output (install, wheel and editable installs read this).
        self.extensions = built

    def _build_with_fallback(self, ext):
        nvcc = _find_nvcc()
        if nvcc is None:
            return self.build_extension(ext, None)
        try:
            return self.build_extension(ext, nvcc)
        except (subprocess.CalledProcessError, OSError) as e:
            if _env_flag("QRA_REQUIRE_CUDA"):
                raise
            _warn(f"the CUDA build failed ({e}); retrying with the CPU kernel only")
            return self.build_extension(ext, None)

    def build_extension(self, ext, nvcc=None):
        cmake = _find_cmake()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # Separate trees: a CPU-only retry must not reuse a cache configured for CUDA.
        base = Path(os.environ.get("QRA_BUILD_DIR") or self.build_temp).resolve()
        build_dir = base / ("cmake-cuda" if nvcc else "cmake-cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import pybind11
            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        if shutil.which("ninja") or _ninja_from_pypi():
            args += ["-G", "Ninja"]
            ninja = _ninja_from_pypi()
            if ninja:
                args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if nvcc:
            archs = os.environ.get("QRA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            args += ["-DQRA_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DQRA_CUDA_ARCHS={archs}"]
            print(f"qra: building the CPU and CUDA kernels for sm {archs} with {nvcc}")
        else:
            args.append("-DQRA_WITH_CUDA=OFF")
            print("qra: building the CPU kernel only (QRA_NO_CUDA set or no nvcc found)")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _warn(msg):
    print(f"qra: WARNING: {msg}", file=sys.stderr)


def _ninja_from_pypi():
    try:
        import ninja
        path = Path(ninja.BIN_DIR) / "ninja"
        return str(path) if path.exists() else None
    except ImportError:
        return None


def _ext_modules():
    if _env_flag("QRA_NO_EXTENSION"):
        print("qra: QRA_NO_EXTENSION set: pure-Python install")
        return []
    if _find_cxx() is None or _find_cmake() is None:
        _warn("no C++ compiler or CMake found: pure-Python install "
              "(reference and Triton backends only)")
        return []
    return [CMakeExtension("qra_kernels._C")]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
