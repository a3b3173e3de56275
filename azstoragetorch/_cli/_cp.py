"""``cp``: the copies planned, run in parallel, and all of them stopped at a failure or a signal."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from azstoragetorch._cli._access import _container_and_prefix, _is_url, _UsageError
from azstoragetorch._cli._ls import DCP_METADATA
from azstoragetorch._cli._output import _MiB, _Progress, _size
from azstoragetorch._cli._plan import _Copy, _download_plan, _Refused, _upload_plan
from azstoragetorch._cli._signals import _Interrupted, _StopSignals
from azstoragetorch._cli._transfer import (
    _download_one,
    _open_destination,
    _remove_old_metadata,
    _Transfers,
    _upload_one,
)
from azstoragetorch._client import AzStorageTorchContainerClient, TransferStats

# How long the first Ctrl-C waits for transfers to notice that they must stop before the process exits
# without them: a transfer blocked on a slow or throttled request would otherwise hold it for minutes.
_STOP_GRACE_SECONDS = 1.0


def command_cp(args: argparse.Namespace, out: TextIO) -> int:
    source_is_url, destination_is_url = _is_url(args.source), _is_url(args.destination)
    if source_is_url == destination_is_url:
        raise _UsageError("cp copies between a container and a local path: exactly one of SRC and DST must be a URL.")
    refused: list[_Refused] = []
    root: pathlib.Path | None = None
    if source_is_url:
        client, prefix = _container_and_prefix(args.source, args.anonymous)
        # "DST/" is a folder, as it is to cp, even before it exists (pathlib drops the slash).
        into_folder = args.destination.endswith(("/", os.sep))
        root, copies, refused = _download_plan(client, prefix, pathlib.Path(args.destination), into_folder)
    else:
        client, prefix = _container_and_prefix(args.destination, args.anonymous)
        copies, refused = _upload_plan(pathlib.Path(args.source), client, prefix)
    for refusal in refused:
        print(f"azstoragetorch: {refusal}", file=sys.stderr)
    # From here to the end, transfer threads may run: a Ctrl-C is noted, and acted on by the main
    # thread at the points where it stops them (see _StopSignals).
    stops = _StopSignals()
    with stops.noted():
        return _copy_all(args, out, client, root, copies, refused, stops)


def _copy_all(
    args: argparse.Namespace,
    out: TextIO,
    client: AzStorageTorchContainerClient,
    root: pathlib.Path | None,
    copies: list[_Copy],
    refused: list[_Refused],
    stops: _StopSignals,
) -> int:
    transfers = _Transfers()
    progress = _Progress(sum(copy.size or 0 for copy in copies), enabled=not args.no_progress)
    started = time.perf_counter()
    copied = moved = retries = 0
    folder = _open_destination(root) if root is not None else None

    def copy_one(copy: _Copy) -> TransferStats:
        if folder is not None:
            return _download_one(copy, folder, client.credential, progress.hook(), transfers, not args.no_verify)
        return _upload_one(copy, client.credential, progress.hook(), transfers)

    try:
        # A DCP checkpoint's .metadata goes last, so that a reader never sees it before the shards.
        last = [copy for copy in copies if copy.destination.rsplit("/", 1)[-1].startswith(DCP_METADATA)]
        first = [copy for copy in copies if copy not in last]
        if folder is not None and first:
            for copy in last:
                _remove_old_metadata(folder, copy)
        for batch in (first, last):
            for outcome in _run_all(batch, copy_one, args.parallel, transfers, stops):
                if isinstance(outcome, _Refused):
                    print(f"azstoragetorch: {outcome}", file=sys.stderr)
                    refused.append(outcome)
                    continue
                copied += 1
                moved += outcome.bytes
                retries += outcome.retries
    finally:
        progress.close()
        if folder is not None:
            os.close(folder)
    stops.check()  # a Ctrl-C once every transfer had finished: the copy is whole, the summary not shown
    seconds = time.perf_counter() - started
    rate = moved / _MiB / seconds if seconds > 0 else 0.0
    print(
        f"Copied {copied} file{'s' if copied != 1 else ''}, {_size(moved)} in {seconds:.1f} s "
        f"({rate:.1f} MiB/s, {retries} retries)" + (f"; refused {len(refused)} (named above)" if refused else ""),
        file=out,
    )
    return 1 if refused else 0


def _run_all(
    copies: Sequence[_Copy],
    copy_one: Callable[[_Copy], TransferStats],
    parallel: int,
    transfers: _Transfers,
    stops: _StopSignals | None = None,
) -> list[TransferStats | _Refused]:
    """Run ``copy_one`` on every copy, ``parallel`` at a time, and return the outcomes.

    The first failure stops every other transfer (each stops between two pieces and cleans up after
    itself) and is raised once they have. Ctrl-C (noted by ``stops``, or raised as KeyboardInterrupt
    where no one notes it) stops them too, removes every unfinished download at once, and waits at
    most a moment for them (see :func:`azstoragetorch._cli._main._main`).
    """
    stops = stops or _StopSignals()
    pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="azstoragetorch-cp")
    futures: list[concurrent.futures.Future[TransferStats]] = []
    outcomes: list[TransferStats | _Refused] = []
    try:
        for copy in copies:  # Ctrl-C may come while the first transfers already run
            stops.check()
            futures.append(pool.submit(copy_one, copy))
        # The pool runs the copies in the order given: only the first ``parallel`` unfinished ones
        # can be running, so only they are waited on (a folder of many files costs no more).
        window: list[concurrent.futures.Future[TransferStats]] = []
        following = iter(futures)
        while window or len(outcomes) < len(futures):
            window.extend(itertools.islice(following, parallel - len(window)))
            done = stops.wait(window)
            window = [future for future in window if future not in done]
            for future in done:
                try:
                    outcomes.append(future.result())
                except _Refused as refusal:
                    outcomes.append(refusal)
    except KeyboardInterrupt as interruption:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C is still this interruption
            transfers.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            concurrent.futures.wait(futures, timeout=_STOP_GRACE_SECONDS)
        signum = interruption.signum if isinstance(interruption, _Interrupted) else stops.signum
        raise _Interrupted(signum) from None
    except BaseException:
        transfers.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        # The failure is raised once the others have stopped; a Ctrl-C meanwhile leaves at once.
        try:
            while not all(future.done() for future in futures):
                stops.wait([future for future in futures if not future.done()])
        except KeyboardInterrupt as interruption:
            signum = interruption.signum if isinstance(interruption, _Interrupted) else stops.signum
            raise _Interrupted(signum) from None
        raise
    pool.shutdown()
    return outcomes
