"""``python -m worldstereo_core``: see :mod:`worldstereo_core.cli`."""
import sys

from .cli import main

sys.exit(main())
