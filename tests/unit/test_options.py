"""TransferOptions: one frozen value that refuses every bad option with words that name it."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from azstoragetorch._options import MAX_BLOCK_SIZE, TransferOptions, check_int, check_progress_hook
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions
from tests.unit.fakes import InMemoryBlobClient

_URL = "https://account.blob.core.windows.net/container/blob"


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"max_concurrency": 0}, ValueError, r"^max_concurrency must be a positive int, got 0\.$"),
        ({"max_concurrency": True}, ValueError, r"^max_concurrency must be a positive int, got True\.$"),
        ({"max_concurrency": "8"}, ValueError, r"^max_concurrency must be a positive int, got '8'\.$"),
        ({"block_size": -1}, ValueError, r"^block_size must be a positive int, got -1\.$"),
        ({"block_size": 1.5}, ValueError, r"^block_size must be a positive int, got 1\.5\.$"),
        ({"block_size": MAX_BLOCK_SIZE + 1}, ValueError, r"^block_size must be at most 4194304000 bytes \(4000 MiB\)"),
        (
            {"retry": {"retry_total": 3}},
            TypeError,
            r"^retry must be an azstoragetorch\.retry\.RetryOptions .*not dict\.$",
        ),
        ({"progress_hook": "print"}, TypeError, r"^progress_hook must be a callable \(or None\), not str\.$"),
    ],
)
def test_a_bad_option_is_refused_naming_it(changes: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        TransferOptions(**changes)


def test_a_copy_with_changes_is_checked_again() -> None:
    options = TransferOptions(max_concurrency=4)
    assert dataclasses.replace(options, block_size=1024) == TransferOptions(max_concurrency=4, block_size=1024)
    with pytest.raises(ValueError, match="max_concurrency must be a positive int"):
        dataclasses.replace(options, max_concurrency=0)


def test_the_value_is_frozen() -> None:
    options = TransferOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.block_size = 1  # type: ignore[misc]


def test_the_defaults_are_blobios() -> None:
    parameters = inspect.signature(BlobIO).parameters
    for field in dataclasses.fields(TransferOptions):
        assert getattr(TransferOptions(), field.name) == parameters[field.name].default, field.name


def test_good_values_are_kept_as_given() -> None:
    given = {
        "max_concurrency": 2,
        "block_size": MAX_BLOCK_SIZE,
        "validate_content": True,
        "verify_checksum": False,
        "retry": RetryOptions(retry_total=1),
        "progress_hook": print,
    }
    options = TransferOptions(**given)
    assert {name: getattr(options, name) for name in given} == given


def test_check_int_names_the_bounds() -> None:
    with pytest.raises(ValueError, match=r"^workers must be an int of at least 0, got -1\.$"):
        check_int("workers", -1, minimum=0)
    with pytest.raises(ValueError, match=r"^prefetch must be an int from 1 to 4, got 5\.$"):
        check_int("prefetch", 5, maximum=4)
    check_int("workers", 0, minimum=0)


def test_check_progress_hook_is_the_check_transfer_options_makes() -> None:
    message = r"^progress_hook must be a callable \(or None\), not int\.$"
    with pytest.raises(TypeError, match=message):
        check_progress_hook(1)
    with pytest.raises(TypeError, match=message):
        TransferOptions(progress_hook=1)  # type: ignore[arg-type]
    check_progress_hook(None)
    check_progress_hook(print)


def test_blobio_refuses_any_other_keyword_naming_it() -> None:
    with pytest.raises(TypeError, match=r"^BlobIO\(\) got unexpected keyword arguments: blob_client, extra$"):
        BlobIO(_URL, "wb", blob_client=InMemoryBlobClient(), extra=1)


def test_blobio_checks_its_keywords_before_any_request() -> None:
    with pytest.raises(TypeError, match="progress_hook must be a callable"):
        BlobIO(_URL, "rb", credential=False, progress_hook=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrency must be a positive int"):
        BlobIO(_URL, "rb", credential=False, max_concurrency=0)


def test_blobio_open_writes_through_the_client_it_is_given_with_the_options_given() -> None:
    client = InMemoryBlobClient()
    options = TransferOptions(block_size=4, max_concurrency=1)
    with BlobIO._open(_URL, "wb", options=options, client=client) as blob:  # type: ignore[arg-type]
        blob.write(b"0123456789")
    assert client.committed == b"0123456789"
    assert client.committed_block_sizes == [4, 4, 2]


def test_blobio_open_refuses_verify_checksum_for_a_writer() -> None:
    options = TransferOptions(verify_checksum=True)
    with pytest.raises(ValueError, match="verify_checksum checks what is read"):
        BlobIO._open(_URL, "wb", options=options, client=InMemoryBlobClient())  # type: ignore[arg-type]
