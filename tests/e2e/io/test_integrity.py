"""Checksums end to end: the CRC-32 writers record, readers that verify it, and per-request MD5s.

The fault proxy flips bytes in flight, in downloads and in uploads, to show that corruption is
detected (and, where a retry can get good bytes, survived), never loaded or committed.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import zlib

import pytest
import torch

import azstoragetorch
from azstoragetorch.exceptions import ChecksumMismatchError, FatalBlobIOWriteError
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.cli.test_cli import cli
from tests.e2e.support.fault_proxy import Corrupt, FaultProxy, SeenRequest

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB


def recorded_crc32(container: Container, name: str) -> int | None:
    value = container.client.get_blob_client(name).get_blob_properties().metadata.get("azstoragetorch_crc32")
    return None if value is None else int(value, 16)


def gets(seen: SeenRequest) -> bool:
    return seen.operation == "GetBlob"


# -- what writers record --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, BLOCK - 1, BLOCK, 5 * BLOCK + 7], ids=["empty", "1", "block-1", "block", "5-blocks"]
)
def test_every_write_records_the_crc32_of_the_whole_blob(container: Container, azurite: Azurite, size: int) -> None:
    data = os.urandom(size)
    with BlobIO(container.blob_url("b"), "wb", credential=azurite.credential, block_size=BLOCK) as writer:
        for start in range(0, size, 10_000):
            writer.write(data[start : start + 10_000])

    assert recorded_crc32(container, "b") == zlib.crc32(data)


# -- readers that verify it -------------------------------------------------------------------------


def write(container: Container, azurite: Azurite, name: str, data: bytes) -> str:
    url = container.blob_url(name)
    with BlobIO(url, "wb", credential=azurite.credential, block_size=BLOCK) as writer:
        writer.write(data)
    return url


@pytest.mark.parametrize("pattern", ["whole", "small-reads", "jumps", "start-only"], ids=lambda name: name)
def test_a_verifying_reader_accepts_the_blob_however_it_is_read(
    container: Container, azurite: Azurite, pattern: str
) -> None:
    data = os.urandom(2 * MiB + 123)
    url = write(container, azurite, "b", data)

    with BlobIO(
        url, "rb", credential=azurite.credential, block_size=BLOCK, max_concurrency=4, verify_checksum=True
    ) as reader:
        if pattern == "whole":
            assert reader.read() == data
        elif pattern == "small-reads":
            assert b"".join(iter(lambda: reader.read(7777), b"")) == data
        elif pattern == "jumps":  # as torch.load does: the end first, then back to the start
            reader.seek(-100, os.SEEK_END)
            assert reader.read() == data[-100:]
            reader.seek(MiB)
            assert reader.read(10) == data[MiB : MiB + 10]
            reader.seek(0)
            assert reader.read(500) == data[:500]
        else:
            assert reader.read(10) == data[:10]  # close() fetches the rest to finish the check


def test_torch_load_through_a_verifying_reader(container: Container, azurite: Azurite) -> None:
    state = {"w": torch.randn(300, 300), "b": torch.arange(1000)}
    url = container.blob_url("model.pt")
    with BlobIO(url, "wb", credential=azurite.credential, block_size=BLOCK) as writer:
        torch.save(state, writer)

    with BlobIO(url, "rb", credential=azurite.credential, block_size=BLOCK, verify_checksum=True) as reader:
        loaded = torch.load(reader)

    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])


@pytest.fixture
def corrupted_in_flight(container: Container, azurite: Azurite, proxy: FaultProxy) -> tuple[str, bytes]:
    """A 1 MiB blob that the proxy serves with one byte changed: its URL through the proxy, and its bytes."""
    data = os.urandom(MiB)
    url = write(container, azurite, "b", data)
    proxy.add_fault(gets, Corrupt(offset=40_000), times=None)
    return proxy.url(url), data


def test_corruption_in_a_download_is_detected_by_the_crc32(
    azurite: Azurite, corrupted_in_flight: tuple[str, bytes]
) -> None:
    url, data = corrupted_in_flight

    with pytest.raises(ChecksumMismatchError, match="CRC-32 of the whole blob") as error:
        with BlobIO(url, "rb", credential=azurite.credential, verify_checksum=True) as reader:
            corrupted = reader.read()
        assert corrupted != data  # the bytes were read, but close() refuses them

    assert url in str(error.value)


def test_corruption_in_a_torch_load_is_detected_not_loaded(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    tensor = torch.randn(256, 1024)
    url = container.blob_url("model.pt")
    with BlobIO(url, "wb", credential=azurite.credential) as writer:
        torch.save({"w": tensor}, writer)
    size = container.client.get_blob_client("model.pt").get_blob_properties().size
    proxy.add_fault(gets, Corrupt(offset=size // 2), times=None)  # inside the tensor's bytes

    with (
        pytest.raises(ChecksumMismatchError),
        BlobIO(proxy.url(url), "rb", credential=azurite.credential, verify_checksum=True) as reader,
    ):
        torch.load(reader)


def test_without_verification_the_same_corruption_goes_unnoticed(
    azurite: Azurite, corrupted_in_flight: tuple[str, bytes]
) -> None:
    # What the checksum is for: TLS would catch this on the wire, a bad NIC or proxy might not.
    url, data = corrupted_in_flight

    with BlobIO(url, "rb", credential=azurite.credential, verify_checksum=False) as reader:
        assert reader.read() != data


def test_a_blob_without_a_recorded_crc32_cannot_be_verified(container: Container, azurite: Azurite) -> None:
    container.upload("sdk-written", b"written by another tool")

    with pytest.raises(ValueError, match="no recorded CRC-32"):
        BlobIO(container.blob_url("sdk-written"), "rb", credential=azurite.credential, verify_checksum=True)
    with pytest.raises(ValueError, match="verify_checksum checks what is read"):
        BlobIO(container.blob_url("x"), "wb", credential=azurite.credential, verify_checksum=True)


# -- per-request MD5s -----------------------------------------------------------------------------------


def test_validated_reads_refetch_a_corrupted_range(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    data = os.urandom(3 * MiB)
    url = write(container, azurite, "b", data)
    proxy.add_fault(gets, Corrupt(offset=1000), times=2)  # the first two responses are damaged

    with BlobIO(proxy.url(url), "rb", credential=azurite.credential, validate_content=True) as reader:
        assert reader.read() == data

    assert all(seen.headers.get("x-ms-range-get-content-md5") == "true" for seen in proxy.requests if gets(seen))


def test_a_range_fetched_again_counts_once_in_the_crc32_checked_by_default(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    # The CRC-32 is taken as a range's body arrives; a damaged range fetched again must not leave
    # its damaged bytes in it (nor a body resumed after a break its bytes twice).
    data = os.urandom(2 * MiB)
    url = write(container, azurite, "b", data)
    later_ranges = lambda seen: gets(seen) and not seen.headers.get("x-ms-range", "").startswith("bytes=0-")  # noqa: E731
    proxy.add_fault(later_ranges, Corrupt(offset=1000), times=2)

    with BlobIO(proxy.url(url), "rb", credential=azurite.credential, block_size=BLOCK, validate_content=True) as reader:
        assert reader.read() == data

    assert reader.stats.verified_blobs == 1


@pytest.mark.usefixtures("no_backoff")
def test_validated_reads_give_up_on_a_range_that_never_arrives_intact(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    url = write(container, azurite, "b", os.urandom(MiB))
    proxy.add_fault(gets, Corrupt(offset=1000), times=None)

    with pytest.raises(ChecksumMismatchError, match="MD5 of a range"):
        BlobIO(proxy.url(url), "rb", credential=azurite.credential, validate_content=True).read()


@pytest.mark.usefixtures("no_backoff")  # every retry is damaged too
def test_validated_uploads_are_refused_when_corrupted_and_nothing_is_committed(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    container.upload("b", b"the previous content")
    proxy.add_fault(lambda seen: seen.operation == "PutBlock", Corrupt(offset=10, request=True), times=None)

    with (
        pytest.raises(FatalBlobIOWriteError, match=r"Md5Mismatch|400"),
        BlobIO(
            proxy.url(container.blob_url("b")),
            "wb",
            credential=azurite.credential,
            block_size=BLOCK,
            validate_content=True,
        ) as writer,
    ):
        writer.write(os.urandom(3 * BLOCK))

    assert container.download("b") == b"the previous content"


def test_an_unvalidated_upload_corrupted_in_flight_is_caught_by_the_recorded_crc32(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    # Without validate_content the service stores the damaged block; the CRC-32 recorded from the
    # bytes the writer meant to send still tells a verifying reader.
    data = os.urandom(3 * BLOCK)
    proxy.add_fault(lambda seen: seen.operation == "PutBlock", Corrupt(offset=10, request=True), times=1)
    with BlobIO(proxy.url(container.blob_url("b")), "wb", credential=azurite.credential, block_size=BLOCK) as writer:
        writer.write(data)

    with (
        pytest.raises(ChecksumMismatchError),
        BlobIO(container.blob_url("b"), "rb", credential=azurite.credential, verify_checksum=True) as reader,
    ):
        reader.read()


def test_checksum_errors_survive_pickling_from_a_dataloader_worker(container: Container) -> None:
    error = ChecksumMismatchError(container.blob_url("b"), "CRC-32 of the whole blob", "0000abcd", "0000abce")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


# -- the other paths ------------------------------------------------------------------------------------


def test_a_corrupted_lightning_checkpoint_is_refused_by_a_verifying_plugin(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    plugin = AzureBlobCheckpointIO(credential=azurite.credential, account_url=proxy.url(azurite.account_url))
    verifying = AzureBlobCheckpointIO(
        credential=azurite.credential, account_url=proxy.url(azurite.account_url), verify_checksum=True
    )
    url = proxy.url(container.blob_url("last.ckpt"))
    plugin.save_checkpoint({"state_dict": {"w": torch.randn(128, 1024)}}, url)
    proxy.add_fault(gets, Corrupt(offset=300_000), times=None)

    with pytest.raises(ChecksumMismatchError):
        verifying.load_checkpoint(url)


def test_a_corrupted_dcp_shard_is_refused_by_a_verifying_reader(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter

    state = {f"w{index}": torch.randn(64, 1024) for index in range(4)}
    url = proxy.url(container.blob_url("dcp"))
    dcp.save(state, storage_writer=BlobStorageWriter(url, credential=azurite.credential))
    proxy.add_fault(lambda seen: gets(seen) and seen.path.endswith(".distcp"), Corrupt(offset=500_000), times=None)
    target = {name: torch.empty_like(tensor) for name, tensor in state.items()}

    with pytest.raises(CheckpointException, match="ChecksumMismatchError"):
        dcp.load(target, storage_reader=BlobStorageReader(url, credential=azurite.credential, verify_checksum=True))


def test_a_dataset_transform_can_verify_what_it_reads(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    from azstoragetorch.datasets import BlobDataset

    url = write(container, azurite, "sample", os.urandom(200_000))
    dataset = BlobDataset.from_blob_urls(proxy.url(url), credential=azurite.credential, transform=read_verified)
    assert len(dataset[0]) == 200_000
    proxy.add_fault(gets, Corrupt(offset=150_000), times=None)

    with pytest.raises(ChecksumMismatchError):
        dataset[0]


def read_verified(blob: object) -> bytes:
    with blob.reader(verify_checksum=True) as reader:  # type: ignore[attr-defined]
        data: bytes = reader.read()
    return data


# -- verified by default: bytes changed behind the recorded CRC-32 -------------------------------------
#
# Each path that reads a whole blob or shard file refuses one whose bytes no longer match the CRC-32
# recorded when it was written, without being asked to; verify_checksum=False (--no-verify) reads it.


def save_model(container: Container, azurite: Azurite, name: str, state: dict[str, torch.Tensor]) -> str:
    url = container.blob_url(name)
    with BlobIO(url, "wb", credential=azurite.credential, block_size=BLOCK) as writer:
        torch.save(state, writer)
    return url


def test_torch_load_refuses_a_tampered_checkpoint_by_default(container: Container, azurite: Azurite) -> None:
    state = {"w": torch.randn(512, 1024)}  # the middle byte of the blob is one of w's
    url = save_model(container, azurite, "model.pt", state)
    container.tamper("model.pt")

    with (
        pytest.raises(ChecksumMismatchError, match="CRC-32 of the whole blob") as error,
        BlobIO(url, "rb", credential=azurite.credential, block_size=BLOCK) as reader,
    ):
        torch.load(reader)
    assert error.value.blob_url == url

    with BlobIO(url, "rb", credential=azurite.credential, block_size=BLOCK, verify_checksum=False) as reader:
        tampered = torch.load(reader)
    assert not torch.equal(tampered["w"], state["w"])  # what the default check keeps from being used
    assert reader.stats.verified_blobs == reader.stats.unverified_blobs == 0


def test_a_whole_read_is_verified_and_counted(container: Container, azurite: Azurite) -> None:
    data = os.urandom(3 * MiB + 5)
    url = write(container, azurite, "b", data)
    before = azstoragetorch.stats()

    with BlobIO(url, "rb", credential=azurite.credential, block_size=BLOCK) as reader:
        assert b"".join(iter(lambda: reader.read(100_000), b"")) == data

    assert reader.stats.verified_blobs == 1 and reader.stats.unverified_blobs == 0
    assert azstoragetorch.stats().minus(before).verified_blobs == 1


def test_a_blob_without_a_recorded_crc32_is_read_unverified_and_says_so(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    container.upload("foreign.pt", b"written by another tool")
    sas = container.blob_sas("foreign.pt")
    before = azstoragetorch.stats()

    with (
        caplog.at_level(logging.DEBUG, logger="azstoragetorch"),
        BlobIO(f"{container.blob_url('foreign.pt')}?{sas}", "rb") as reader,
    ):
        assert reader.read() == b"written by another tool"

    assert reader.stats.unverified_blobs == 1 and reader.stats.verified_blobs == 0
    assert azstoragetorch.stats().minus(before).unverified_blobs == 1
    said = [record.getMessage() for record in caplog.records if "CRC-32" in record.getMessage()]
    assert said == [f"{container.blob_url('foreign.pt')} has no recorded CRC-32: read unverified"]
    assert sas.split("sig=")[1].split("&")[0] not in caplog.text


def test_a_part_read_is_not_refused_nor_completed_to_check_it(
    container: Container, azurite: Azurite, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * MiB)
    url = write(container, azurite, "b", data)

    with (
        caplog.at_level(logging.DEBUG, logger="azstoragetorch"),
        BlobIO(url, "rb", credential=azurite.credential, block_size=BLOCK) as reader,
    ):
        reader.seek(MiB)
        assert reader.read(1000) == data[MiB : MiB + 1000]
        reader.seek(-10, os.SEEK_END)
        assert reader.read() == data[-10:]

    assert reader.stats.bytes < len(data) // 2  # nothing more was downloaded for a check
    assert reader.stats.verified_blobs == reader.stats.unverified_blobs == 0
    assert f"{url} was read in part: its CRC-32 was not checked" in caplog.text


def test_the_lightning_plugin_refuses_a_tampered_checkpoint_by_default(container: Container, azurite: Azurite) -> None:
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    plugin = AzureBlobCheckpointIO(credential=azurite.credential, account_url=azurite.account_url, log_stats=False)
    url = container.blob_url("last.ckpt")
    weights = torch.randn(512, 1024)
    plugin.save_checkpoint({"state_dict": {"w": weights}}, url)
    container.tamper("last.ckpt")

    with pytest.raises(ChecksumMismatchError, match=r"last\.ckpt"):
        plugin.load_checkpoint(url)

    opted_out = AzureBlobCheckpointIO(
        credential=azurite.credential, account_url=azurite.account_url, log_stats=False, verify_checksum=False
    )
    assert not torch.equal(opted_out.load_checkpoint(url)["state_dict"]["w"], weights)


def save_dcp(container: Container, azurite: Azurite, folder: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Three equal tensors in one shard file, so that its middle byte is one of the second's."""
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageWriter

    state = {f"w{index}": torch.randn(256, 1024) for index in range(3)}
    dcp.save(state, storage_writer=BlobStorageWriter(container.blob_url(folder), credential=azurite.credential))
    shards = [b.name for b in container.client.list_blobs(name_starts_with=f"{folder}/") if b.name.endswith(".distcp")]
    return state, shards


def test_dcp_load_refuses_a_tampered_shard_file_by_default(container: Container, azurite: Azurite) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from azstoragetorch.integrations.dcp import BlobStorageReader

    state, shards = save_dcp(container, azurite, "dcp")
    assert len(shards) == 1
    url = container.blob_url("dcp")
    intact = BlobStorageReader(url, credential=azurite.credential)
    dcp.load({name: torch.empty_like(tensor) for name, tensor in state.items()}, storage_reader=intact)
    assert intact.stats is not None and intact.stats.verified_blobs == 1
    container.tamper(shards[0])
    target = {name: torch.empty_like(tensor) for name, tensor in state.items()}

    with pytest.raises(CheckpointException, match=f"ChecksumMismatchError.*{container.blob_url(shards[0])}"):
        dcp.load(target, storage_reader=BlobStorageReader(url, credential=azurite.credential))

    dcp.load(target, storage_reader=BlobStorageReader(url, credential=azurite.credential, verify_checksum=False))
    assert not torch.equal(target["w1"], state["w1"]) and torch.equal(target["w0"], state["w0"])


def test_dcp_reads_a_shard_file_without_a_recorded_crc32_unverified_and_says_so(
    container: Container, azurite: Azurite, caplog: pytest.LogCaptureFixture
) -> None:
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageReader

    state, shards = save_dcp(container, azurite, "dcp")
    container.upload(shards[0], container.download(shards[0]))  # copied by another tool: no metadata
    reader = BlobStorageReader(container.blob_url("dcp"), credential=azurite.credential)
    target = {name: torch.empty_like(tensor) for name, tensor in state.items()}

    with caplog.at_level(logging.DEBUG, logger="azstoragetorch"):
        dcp.load(target, storage_reader=reader)

    assert all(torch.equal(target[name], tensor) for name, tensor in state.items())
    assert reader.stats is not None and (reader.stats.unverified_blobs, reader.stats.verified_blobs) == (1, 0)
    assert f"{container.blob_url(shards[0])} has no recorded CRC-32: read unverified" in caplog.text


def test_a_partial_dcp_load_is_not_refused_for_what_it_did_not_read(
    container: Container, azurite: Azurite, caplog: pytest.LogCaptureFixture
) -> None:
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageReader

    state, shards = save_dcp(container, azurite, "dcp")
    reader = BlobStorageReader(container.blob_url("dcp"), credential=azurite.credential)
    target = {"w2": torch.empty_like(state["w2"])}

    with caplog.at_level(logging.DEBUG, logger="azstoragetorch"):
        dcp.load(target, storage_reader=reader)

    assert torch.equal(target["w2"], state["w2"])
    assert reader.stats is not None and reader.stats.verified_blobs == 0
    assert f"{container.blob_url(shards[0])} was read in part: its CRC-32 was not checked" in caplog.text


def test_cp_refuses_to_download_a_tampered_blob_by_default(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    url = write(container, azurite, "model.pt", os.urandom(300_000))
    container.tamper("model.pt")
    target = tmp_path / "model.pt"

    refused = cli("cp", url, str(target), "--no-progress")

    assert refused.returncode == 1
    assert "CRC-32 of the whole blob" in refused.stderr and url in refused.stderr
    assert not target.exists()

    taken = cli("cp", url, str(target), "--no-progress", "--no-verify")
    assert taken.returncode == 0, taken.stderr
    assert target.read_bytes() == container.download("model.pt")
