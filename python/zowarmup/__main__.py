"""``python -m zowarmup`` = the ``zowarmup`` command (see :mod:`zowarmup.cli`)."""
import sys

from .cli import main

sys.exit(main())
