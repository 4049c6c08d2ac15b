"""Entry point for ``python -m analysis``."""

import os
import sys

# Idle OpenMP threads sleep instead of spinning, which keeps a busy CPU from slowing the
# model several-fold; set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from analysis.cli import main

sys.exit(main())
