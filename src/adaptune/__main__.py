"""``python -m adaptune``: the same as the ``adaptune`` command."""

import sys

from .cli import main

sys.exit(main())
