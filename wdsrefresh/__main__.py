"""``python -m wdsrefresh``: the ``wdsrefresh`` command."""

import sys

from .cli import main

sys.exit(main())
