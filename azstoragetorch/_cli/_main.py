"""The command line: its arguments, which command runs, and the exit code of each way it ends."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from azure.core.exceptions import AzureError

from azstoragetorch._cli._access import ACCOUNT_KEY_VARIABLE, _UsageError
from azstoragetorch._cli._cp import command_cp
from azstoragetorch._cli._ls import command_ls
from azstoragetorch._cli._signals import _Interrupted, _sigterm_as_ctrl_c
from azstoragetorch._cli._verify import command_verify
from azstoragetorch._client import redact
from azstoragetorch.exceptions import AZStorageTorchError


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but its errors, which quote the arguments given, show no SAS token."""

    def error(self, message: str) -> NoReturn:
        super().error(redact(message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="azstoragetorch",
        description="List, verify and copy PyTorch checkpoints in Azure Blob Storage.",
        epilog=(
            f"Credentials: a SAS token in the URL, else the account key in {ACCOUNT_KEY_VARIABLE}, "
            "else DefaultAzureCredential (az login, managed identity, ...)."
        ),
    )
    parser.add_argument("--anonymous", action="store_true", help="send no credential (public containers)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list the checkpoints under a container URL or prefix")
    ls.add_argument("url", metavar="URL")
    verify = commands.add_parser("verify", help="check a blob or a DCP checkpoint against its recorded CRC-32")
    verify.add_argument("url", metavar="URL")
    cp = commands.add_parser("cp", help="copy a blob or a DCP checkpoint between a container and a local folder")
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.add_argument(
        "--parallel", type=_parallel, default=4, help=f"files copied at once (default 4, at most {_MAX_PARALLEL})"
    )
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    cp.add_argument("--no-verify", action="store_true", help="do not check downloads against their recorded CRC-32")
    return parser


# Each file copied at once holds a thread, its own parallel requests and tens of MiB of buffers:
# thousands at once would exhaust threads or memory long before they made a copy faster.
_MAX_PARALLEL = 64


def _parallel(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {_MAX_PARALLEL}, not {text!r}")
    return value


_COMMANDS = {"ls": command_ls, "verify": command_verify, "cp": command_cp}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with _sigterm_as_ctrl_c() as received:
        return _main(parser, args, received)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, received: list[int]) -> int:
    try:
        code = _COMMANDS[args.command](args, sys.stdout)
        sys.stdout.flush()  # here, so that a closed standard output is handled below
        return code
    except BrokenPipeError:
        # Whoever read standard output stopped (``azstoragetorch ls URL | head``): stop quietly, as
        # other command-line tools do, and keep the interpreter's own last flush from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _UsageError as error:
        parser.error(str(error))  # exits with 2 after the usage line
    except ValueError as error:  # a malformed URL, and the like
        parser.error(str(error))
    except (AzureError, AZStorageTorchError, OSError) as error:
        print(f"azstoragetorch: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        signum = interruption.signum if isinstance(interruption, _Interrupted) else None
        code = 128 + (signum or received[0])  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
        # Standard error may be gone (``2>&1 | less``, quit): the exit below must happen anyway.
        with contextlib.suppress(OSError, ValueError):
            print(f"azstoragetorch: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr)
        if isinstance(interruption, _Interrupted):
            # Transfer threads (ours, or the requests of a BlobIO that stopped without waiting for
            # them) may still wait on the service, and the interpreter would wait for them at exit:
            # minutes, when throttled. They were told to stop, and none can commit a blob or leave
            # a file any more, so leaving now is what makes the first Ctrl-C work.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)
        return code
    return 1
