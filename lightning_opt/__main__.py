"""``python -m lightning_opt ...`` is the ``lightning-opt`` command."""

import sys

from lightning_opt.cli import main

sys.exit(main())
