"""TransferOptions: one frozen value that refuses every bad option with words that name it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any
from unittest import mock

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


def test_from_keywords_takes_each_field_from_the_argument_of_its_name() -> None:
    hook = print
    retry = RetryOptions(retry_total=1)
    arguments = {"self": object(), "credential": False, "max_concurrency": 3, "retry": retry, "progress_hook": hook}
    options = TransferOptions.from_keywords(arguments, verify_checksum=False)
    # Fields the arguments lack keep their defaults; arguments that are not fields are left out.
    assert options == TransferOptions(max_concurrency=3, verify_checksum=False, retry=retry, progress_hook=hook)


def test_from_keywords_checks_as_the_constructor_does() -> None:
    with pytest.raises(TypeError, match=r"^retry must be an azstoragetorch\.retry\.RetryOptions .*not dict\.$"):
        TransferOptions.from_keywords({"retry": {"retry_total": 3}})


_RETRY = RetryOptions(retry_total=1)
# A value for each transfer keyword, none of them the default, so that one an entry point drops shows.
_GIVEN = {
    "max_concurrency": 3,
    "block_size": 1024,
    "validate_content": True,
    "verify_checksum": False,
    "retry": _RETRY,
    "progress_hook": print,
}


def _blobio_options(**keywords: Any) -> TransferOptions:
    opened: list[TransferOptions] = []
    with mock.patch.object(BlobIO, "_start", lambda self, url, mode, credential, options, *_: opened.append(options)):
        BlobIO(_URL, "rb", **keywords)
    return opened[0]


def _checkpoint_io_options(**keywords: Any) -> TransferOptions:
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    return AzureBlobCheckpointIO(credential=False, **keywords)._transfer


def _dcp_reader_options(**keywords: Any) -> TransferOptions:
    from azstoragetorch.integrations.dcp import BlobStorageReader

    return BlobStorageReader(_URL, **keywords).fs.options  # type: ignore[attr-defined, no-any-return]


def _dcp_writer_options(**keywords: Any) -> TransferOptions:
    from azstoragetorch.integrations.dcp import BlobStorageWriter

    return BlobStorageWriter(_URL, **keywords).fs.options  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    ("entry_point", "keywords", "expected"),
    [
        (_blobio_options, _GIVEN, _GIVEN),
        (_checkpoint_io_options, _GIVEN, _GIVEN),
        # The DCP reader's verify_checksum=False is BlobIO's False; its True, BlobIO's None.
        (_dcp_reader_options, _GIVEN, _GIVEN),
        (_dcp_reader_options, {**_GIVEN, "verify_checksum": True}, {**_GIVEN, "verify_checksum": None}),
        # A writer verifies nothing it reads.
        (_dcp_writer_options, {k: v for k, v in _GIVEN.items() if k != "verify_checksum"}, _GIVEN),
    ],
    ids=["BlobIO", "AzureBlobCheckpointIO", "BlobStorageReader", "BlobStorageReader-verify", "BlobStorageWriter"],
)
def test_every_entry_point_carries_each_transfer_keyword_it_takes(
    entry_point: Callable[..., TransferOptions], keywords: dict[str, Any], expected: dict[str, Any]
) -> None:
    options = entry_point(**keywords)
    assert {name: getattr(options, name) for name in expected} == expected


@pytest.mark.parametrize(
    "entry_point", [_blobio_options, _checkpoint_io_options, _dcp_reader_options, _dcp_writer_options]
)
def test_every_entry_point_refuses_a_bad_retry_naming_it(entry_point: Callable[..., TransferOptions]) -> None:
    with pytest.raises(TypeError, match=r"^retry must be an azstoragetorch\.retry\.RetryOptions .*not dict\.$"):
        entry_point(retry={"retry_total": 3})


def test_the_data_module_refuses_a_bad_retry_when_built() -> None:
    # Before setup() lists anything: a LightningCLI config with a bad retry fails at once.
    from azstoragetorch.integrations.lightning import BlobDataModule

    with pytest.raises(TypeError, match=r"^retry must be an azstoragetorch\.retry\.RetryOptions .*not dict\.$"):
        BlobDataModule(train=[_URL], credential=False, retry={"retry_total": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", ["from_container_url", "from_blob_urls"])
@pytest.mark.parametrize("dataset", ["BlobDataset", "IterableBlobDataset"])
def test_the_datasets_refuse_a_bad_retry_before_any_request(dataset: str, factory: str) -> None:
    # The clients take retry as given, so each factory checks it; an unchecked dict would fail later,
    # deep inside a request, with an error that does not name it.
    import azstoragetorch.datasets

    create = getattr(getattr(azstoragetorch.datasets, dataset), factory)
    with (
        mock.patch("azstoragetorch._client.AzStorageTorchContainerClient.list_blobs") as listing,
        pytest.raises(TypeError, match=r"^retry must be an azstoragetorch\.retry\.RetryOptions .*not dict\.$"),
    ):
        create("https://account.blob.core.windows.net/container", credential=False, retry={"retry_total": 3})
    listing.assert_not_called()
