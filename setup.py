"""Build script. The compiled extension (CMake + ninja) is added by the CUDA/CPU kernel
work; without it the package is pure Python (reference and Triton backends)."""
from setuptools import setup

setup()
