"""WriteSession: the first failed step fails the writer for good, and leaving a ``with`` block
reports the failure that came first."""

from __future__ import annotations

import pytest

from azstoragetorch._client import BlockUploader, Recorder
from azstoragetorch._options import TransferOptions
from azstoragetorch._write_session import WriteSession, raise_first_failure_behind
from azstoragetorch.exceptions import FatalBlobIOWriteError
from tests.unit.fakes import InMemoryBlobClient


def session(client: InMemoryBlobClient) -> WriteSession:
    uploader = BlockUploader(client, TransferOptions(block_size=4, max_concurrency=1))  # type: ignore[arg-type]
    return WriteSession(uploader, Recorder())


def test_a_failed_step_fails_every_later_one_with_the_first_cause_and_nothing_is_committed() -> None:
    client = InMemoryBlobClient(fail_stage_at=0)
    writes = session(client)
    with pytest.raises(FatalBlobIOWriteError) as first:
        writes.write(memoryview(b"0123456789"))
        writes.flush()
    cause = first.value.underlying_exception
    assert isinstance(cause, ConnectionError)
    with pytest.raises(FatalBlobIOWriteError) as later:
        writes.commit(10)
    assert later.value.underlying_exception is cause
    assert client.committed is None and client.put_blob_calls == client.commit_calls == 0


def test_an_interrupted_step_goes_on_unchanged_and_leaves_nothing_to_commit() -> None:
    client = InMemoryBlobClient()
    writes = session(client)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writes.run(interrupted)
    assert writes.fatal_error is not None
    with pytest.raises(FatalBlobIOWriteError):
        writes.commit(0)
    assert client.committed is None


def test_the_hook_hears_the_final_size_before_the_commit() -> None:
    client = InMemoryBlobClient()
    heard: list[tuple[int, int | None, bytes | None]] = []
    uploader = BlockUploader(client, TransferOptions(block_size=4, max_concurrency=1))  # type: ignore[arg-type]
    writes = WriteSession(uploader, Recorder(lambda done, total: heard.append((done, total, client.committed))))
    writes.write(memoryview(b"abcdef"))
    writes.commit(6)
    assert heard[-1] == (6, 6, None)  # nothing committed yet when the hook's last call came
    assert client.committed == b"abcdef"


def _raised_while_handling(earlier: BaseException, later: Exception) -> Exception:
    try:
        try:
            raise earlier
        except BaseException:
            raise later  # noqa: B904  # the implicit context is what is being tested
    except Exception as error:
        return error


def test_an_error_raised_while_handling_an_interruption_gives_way_to_it() -> None:
    interruption = KeyboardInterrupt()
    error = _raised_while_handling(interruption, RuntimeError("unexpected pos"))
    with pytest.raises(KeyboardInterrupt) as raised:
        raise_first_failure_behind(error, since=None, fatal_error=None)
    assert raised.value is interruption


def test_an_interruption_handled_before_the_block_began_is_not_the_blocks() -> None:
    interruption = KeyboardInterrupt()
    error = _raised_while_handling(interruption, RuntimeError("the block's own failure"))
    raise_first_failure_behind(error, since=interruption, fatal_error=None)  # nothing to replace it with


def test_an_error_raised_while_handling_the_upload_failure_gives_way_to_it() -> None:
    cause = ConnectionError("upload failed")
    fatal = FatalBlobIOWriteError(cause)
    error = _raised_while_handling(fatal, RuntimeError("unexpected pos"))
    with pytest.raises(FatalBlobIOWriteError) as raised:
        raise_first_failure_behind(error, since=None, fatal_error=fatal)
    assert raised.value.underlying_exception is cause and raised.value.__cause__ is cause
    # A failure that is not the upload's own aftermath is left as it is.
    raise_first_failure_behind(RuntimeError("unrelated"), since=None, fatal_error=fatal)
