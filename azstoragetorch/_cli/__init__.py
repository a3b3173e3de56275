"""The ``azstoragetorch`` command; ``main`` is its entry point."""

from azstoragetorch._cli._transfer import ACCOUNT_KEY_VARIABLE as ACCOUNT_KEY_VARIABLE
from azstoragetorch._cli._transfer import main as main
