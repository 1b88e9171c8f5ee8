"""``python -m msdnet_ops ...`` is the ``msdnet`` command (see :mod:`msdnet_ops.cli`)."""
import sys

from .cli import main

sys.exit(main())
