"""``python -m azstoragetorch``: see :mod:`azstoragetorch._cli`."""

import sys

from azstoragetorch._cli import main

sys.exit(main())
