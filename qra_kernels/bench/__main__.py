"""``python -m qra_kernels.bench [--quick] --out DIR`` — the same as ``qra bench``."""
import sys

from . import main

sys.exit(main())
