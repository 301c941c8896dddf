"""``python -m adaptune.cli``: the same as the ``adaptune`` command (torchrun launches it this way)."""

import sys

from . import main

sys.exit(main())
