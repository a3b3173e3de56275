"""BlobDataModule with a real Trainer against Azurite: splits, epochs, mid-epoch resume, DDP, CLI, bad input."""

from __future__ import annotations

import json
import pathlib
import sys
from collections import Counter
from typing import Any

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import get_worker_info

from azstoragetorch.datasets import IterableBlobDataset
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, BlobDataModule, BlobSplit
from azstoragetorch.integrations.lightning._data_module import _IterableSplitLoader as IterableSplitLoader
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support._launch import run_job
from tests.e2e.support.lightning_helpers import IdRecorder, decode_id, trainer, upload_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice for small data sets

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]
DECODE = "tests.e2e.support.lightning_helpers.decode_id"


def data_module(train: Any, credential: Any, **options: Any) -> BlobDataModule:
    settings: dict[str, Any] = {"transform": DECODE, "batch_size": 4, "credential": credential, "seed": 5}
    return BlobDataModule(train=train, **(settings | options))


# -- splits, epochs, shuffling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iterable", "num_workers", "persistent"),
    [(False, 0, False), (True, 0, False), (True, 2, False), (True, 2, True), (False, 2, True)],
    ids=["map", "iterable", "iterable-2-workers", "iterable-persistent", "map-persistent"],
)
def test_every_sample_once_per_epoch_in_a_new_order(
    container: Container,
    account_credential: AzureNamedKeyCredential,
    iterable: bool,
    num_workers: int,
    persistent: bool,
) -> None:
    source = upload_ids(container, "train", 20)
    val = upload_ids(container, "val", 6)
    data = data_module(
        BlobSplit(source, iterable=iterable),
        account_credential,
        val=val,
        num_workers=num_workers,
        persistent_workers=persistent,
    )
    model = IdRecorder()

    trainer(max_epochs=3, enable_checkpointing=False).fit(model, datamodule=data)

    for epoch in range(3):
        assert sorted(model.seen[epoch]) == list(range(20)), epoch
    assert len({tuple(model.seen[epoch]) for epoch in range(3)}) == 3  # shuffled anew every epoch


@pytest.mark.parametrize(("iterable", "trust"), [(True, False), (False, True)], ids=["iterable", "map-trusted"])
def test_a_cache_dir_keeps_every_split_blob_for_later_epochs(
    container: Container,
    account_credential: AzureNamedKeyCredential,
    tmp_path: pathlib.Path,
    iterable: bool,
    trust: bool,
) -> None:
    source = upload_ids(container, "train", 20)
    data = data_module(
        BlobSplit(source, iterable=iterable),
        account_credential,
        val=upload_ids(container, "val", 6),
        transform="tests.e2e.support.lightning_helpers.decode_id_read",
        num_workers=2,
        cache_dir=tmp_path / "cache",
        cache_max_bytes=10**6,
        cache_trust_listing=trust,
    )
    model = IdRecorder()

    trainer(max_epochs=2, enable_checkpointing=False).fit(model, datamodule=data)

    for epoch in range(2):
        assert sorted(model.seen[epoch]) == list(range(20)), epoch
    assert len([path for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")]) == 26


def test_the_order_is_reproducible_from_the_seed(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    source = upload_ids(container, "train", 20)
    orders = []
    for _ in range(2):
        model = IdRecorder()
        trainer(max_epochs=2, enable_checkpointing=False).fit(
            model, datamodule=data_module(BlobSplit(source, iterable=True), account_credential)
        )
        orders.append(model.seen)
    assert orders[0] == orders[1]


def test_splits_given_as_blob_url_lists_and_per_split_transforms(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    upload_ids(container, "train", 8)
    urls = [container.blob_url(f"train/{index:04d}") for index in (1, 3, 5)]
    data = BlobDataModule(
        train=BlobSplit(urls, transform=decode_id), transform="json.loads", batch_size=2, credential=account_credential
    )
    model = IdRecorder()

    trainer(max_epochs=1, enable_checkpointing=False).fit(model, datamodule=data)

    assert sorted(model.seen[0]) == [1, 3, 5]


def test_validate_test_and_predict_use_their_splits(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    for split, count in (("val", 5), ("test", 6), ("pred", 7)):
        upload_ids(container, split, count)
    data = BlobDataModule(
        val=container.blob_url("val"),
        test=BlobSplit(container.blob_url("test"), iterable=True),
        predict=container.blob_url("pred"),
        transform=DECODE,
        batch_size=4,
        credential=account_credential,
    )

    run = trainer()
    assert run.validate(IdRecorder(), datamodule=data)[0]["val_seen"] == sum(range(5))
    predictions = run.predict(IdRecorder(), datamodule=data)
    assert sorted(int(i) for batch in predictions for i in batch["id"]) == list(range(7))
    assert [len(batch["id"]) for batch in data.test_dataloader()] == [4, 2]


def test_the_iterable_loader_knows_its_exact_length() -> None:
    # Lightning fetches a batch ahead from loaders without a length, which would put the saved loader
    # state a batch ahead of the model; so the length has to be exactly what the loader yields.
    for count in (0, 1, 7, 8, 9, 20, 23):
        for world_size in (1, 2, 3):
            for balance in (False, True):
                for rank in range(world_size):
                    dataset = IterableBlobDataset(fake(count), lambda blob: blob, balance_ranks=balance)
                    loader = IterableSplitLoader(
                        dataset,
                        blob_count=count,
                        epoch_of=lambda: None,
                        rank_of=lambda rank=rank, world_size=world_size: (rank, world_size),
                        batch_size=3,
                        collate_fn=list,
                    )
                    dataset._rank_at_pickling = (rank, world_size)
                    assert len(loader) == len(list(loader)), (count, world_size, rank, balance)


def fake(count: int) -> list[Any]:
    return [f"blob-{index}" for index in range(count)]


def test_the_iterable_loader_length_counts_each_workers_batches(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # 10 blobs over 3 workers: 4, 3 and 3 samples, so batches of 4 give 1 + 1 + 1 batches, not ceil(10/4) = 3
    # by luck; with batches of 3: 2 + 1 + 1 = 4, where the whole count would say 4 too; 2 gives 2 + 2 + 2 = 6.
    source = upload_ids(container, "train", 10)
    data = data_module(BlobSplit(source, iterable=True), account_credential, batch_size=2, num_workers=3)
    data.setup("fit")
    loader = data.train_dataloader()
    assert len(loader) == len(list(loader)) == 6


# -- resuming in the middle of an epoch ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("iterable", "num_workers"),
    [(True, 0), (True, 2), (False, 0), (False, 2)],
    ids=["iter", "iter-w2", "map", "map-w2"],
)
def test_resuming_mid_epoch_neither_repeats_nor_skips(
    container: Container,
    azurite: Azurite,
    account_credential: AzureNamedKeyCredential,
    iterable: bool,
    num_workers: int,
) -> None:
    source = upload_ids(container, "train", 40)
    plugin = AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url)
    dirpath = container.blob_url("checkpoints")

    def run(max_steps: int, ckpt_path: str | None) -> IdRecorder:
        model = IdRecorder()
        checkpoints = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=3, save_top_k=-1, save_last=True)
        data = data_module(BlobSplit(source, iterable=iterable), account_credential, num_workers=num_workers)
        trainer(max_epochs=2, max_steps=max_steps, plugins=[plugin], callbacks=[checkpoints]).fit(
            model, datamodule=data, ckpt_path=ckpt_path
        )
        return model

    stopped = run(13, None)  # 10 steps an epoch: the last checkpoint is at step 12, two batches into epoch 1
    resumed = run(-1, "last")

    assert sorted(stopped.seen[0]) == list(range(40))
    before_checkpoint = stopped.seen[1][:8]
    assert sorted(before_checkpoint + resumed.seen[1]) == list(range(40))
    assert resumed.seen[1][:4] == stopped.seen[1][8:12]  # the batch after the checkpoint comes again, in order


def test_a_changed_split_is_noticed_on_resume(
    container: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential
) -> None:
    source = upload_ids(container, "train", 12)
    plugin = AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url)
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("checkpoints"), save_last=True)
    data = data_module(source, account_credential)
    trainer(plugins=[plugin], callbacks=[checkpoints]).fit(IdRecorder(), datamodule=data)
    container.upload("train/9999", (9999).to_bytes(4, "little"))

    resumed = trainer(
        max_epochs=2, plugins=[plugin], callbacks=[ModelCheckpoint(dirpath=container.blob_url("checkpoints"))]
    )
    with pytest.warns(UserWarning, match="The blobs of the train split differ"):
        resumed.fit(IdRecorder(), datamodule=data_module(source, account_credential), ckpt_path="last")


# -- DDP ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iterable", "count", "num_workers"),
    [(True, 24, 2), (False, 24, 0), (True, 25, 0)],
    ids=["iterable-2-workers", "map", "iterable-uneven"],
)
def test_ddp_ranks_share_each_epoch(
    container: Container, tmp_path: pathlib.Path, iterable: bool, count: int, num_workers: int
) -> None:
    source = upload_ids(container, "train", count)
    command = [sys.executable, "-m", "tests.e2e.support.lightning_data_run", "--train", source, "--out", str(tmp_path)]
    command += ["--num-workers", str(num_workers)] + (["--iterable"] if iterable else [])

    result = run_job(command, cwd=REPOSITORY)

    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"]  # no rank waited for the other
    for epoch in ("0", "1"):
        per_rank = [set(rank["seen"][epoch]) for rank in ranks]
        everything = Counter(ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch])
        assert set(everything) == set(range(count))
        if count % 2 == 0:
            assert not per_rank[0] & per_rank[1]
            assert all(times == 1 for times in everything.values())  # exactly once over the ranks
        else:
            assert sum(everything.values()) == count + 1  # one blob repeated to keep the ranks in step
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled between epochs


# -- bad input ----------------------------------------------------------------------------------------


def test_no_split_is_an_error_at_setup() -> None:
    with pytest.raises(ValueError, match="no split to load"):
        BlobDataModule().setup("fit")


def test_a_stage_without_its_split_is_an_error_that_names_it(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    data = BlobDataModule(val=upload_ids(container, "val", 2), transform=DECODE, credential=account_credential)
    with pytest.raises(ValueError, match=r"trainer\.fit\(\) needs the train split.*only: val"):
        trainer().fit(IdRecorder(), datamodule=data)
    with pytest.raises(ValueError, match=r"trainer\.test\(\) needs the test split"):
        trainer().test(IdRecorder(), datamodule=data)


def test_a_split_that_cannot_be_listed_names_the_split_and_url_without_sas(
    azurite: Azurite, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    missing = BlobDataModule(train=f"{azurite.container_url('no-such-container')}/train", credential=account_credential)
    read_only = f"{container.url}/train?{container.container_sas(read=True)}"  # may read, may not list
    refused = BlobDataModule(val=read_only, credential=False)

    with pytest.raises(ResourceNotFoundError, match="The train split could not be listed") as not_found:
        missing.setup("fit")
    with pytest.raises(ClientAuthenticationError, match="The val split could not be listed") as not_allowed:
        refused.setup("validate")

    assert azurite.container_url("no-such-container") in str(not_found.value)
    assert container.url in str(not_allowed.value)
    assert "sig=" not in str(not_allowed.value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"train": 42}, TypeError, "train split must be a container URL"),
        ({"train": []}, TypeError, "train split must be a container URL"),
        (
            {"train": "https://a.blob.core.windows.net/c", "transform": "no.such.module.fn"},
            ValueError,
            "could not be imported",
        ),
        ({"train": "https://a.blob.core.windows.net/c", "collate_fn": "json"}, ValueError, "does not name a callable"),
        (
            {"train": "https://a.blob.core.windows.net/c", "batch_size": 0},
            ValueError,
            "batch_size must be a positive int",
        ),
        ({"train": "https://a.blob.core.windows.net/c", "persistent_workers": True}, ValueError, "num_workers > 0"),
        ({"train": "https://a.blob.core.windows.net/c", "credential": "key"}, TypeError, "Unsupported credential"),
    ],
)
def test_bad_arguments_are_rejected_when_created(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        BlobDataModule(**options)


def test_a_malformed_split_url_is_a_value_error_at_setup() -> None:
    with pytest.raises(ValueError, match="must start with https://"):
        BlobDataModule(train="ftp://example.com/data", credential=False).setup("fit")


def test_workers_see_the_transform_by_import_path(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    source = upload_ids(container, "train", 6)
    data = data_module(
        BlobSplit(source, iterable=True),
        account_credential,
        num_workers=2,
        collate_fn="tests.e2e.lightning.test_datamodule.worker_ids",
    )
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert sorted(worker for batch in batches for worker in batch) == [0, 0, 0, 1, 1, 1]
    assert torch.utils.data.get_worker_info() is None


def worker_ids(samples: list[Any]) -> list[int]:
    """A collate_fn, named by import path above, that says which worker made each sample."""
    info = get_worker_info()
    return [info.id if info is not None else -1 for _ in samples]
