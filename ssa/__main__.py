"""``python -m ssa train …``: see :mod:`ssa.cli`."""

import sys

from .cli import main

sys.exit(main())
