"""``python -m embforge.cli`` (as ``python -m embforge``)."""

import sys

from embforge.cli import main

sys.exit(main())
