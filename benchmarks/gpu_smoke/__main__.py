"""``python -m benchmarks.gpu_smoke``."""

import sys

from .main import main

sys.exit(main())
