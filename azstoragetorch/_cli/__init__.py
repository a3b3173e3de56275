"""``python -m azstoragetorch`` (and the ``azstoragetorch`` command): list, verify and copy checkpoints.

- ``ls URL``: the checkpoints under a container URL (and prefix): Lightning/``torch.save`` files
  (``.ckpt``, ``.pt``, ``.pth``) and DCP checkpoints (a folder with a ``.metadata``), one line each.
- ``verify URL``: check a blob, or every file of a DCP checkpoint, against its recorded CRC-32.
- ``cp SRC DST``: copy a blob or a folder (a DCP checkpoint) between a container and a local folder.

Credentials are the library's: a SAS token in the URL, else the account key in ``AZURE_STORAGE_KEY``
(as the Azure CLI reads it), else :class:`azure.identity.DefaultAzureCredential`; ``--anonymous``
sends no credential. Output names URLs without their SAS token. Exit codes: 0 success, 1 failure
(or a blob ``cp`` refused, or, for ``verify``, a file that does not match), 2 bad arguments,
130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from azstoragetorch._cli._access import ACCOUNT_KEY_VARIABLE as ACCOUNT_KEY_VARIABLE
from azstoragetorch._cli._main import main as main
