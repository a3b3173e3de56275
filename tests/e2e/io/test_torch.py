"""torch.save / torch.load through BlobIO: the main use of the library."""

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential
from torch import nn

from azstoragetorch.io import BlobIO
from tests.conftest import Container


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU()
        )
        self.head = nn.Linear(32 * 28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("block_size", [64 * 1024, 8 * 1024 * 1024])
def test_state_dict_round_trip(
    container: Container, account_credential: AzureNamedKeyCredential, block_size: int
) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    url = container.blob_url("checkpoints/epoch=3.ckpt")
    with BlobIO(url, "wb", credential=account_credential, block_size=block_size) as f:
        torch.save(checkpoint, f)
    with BlobIO(url, "rb", credential=account_credential, block_size=block_size) as f:
        loaded = torch.load(f)
    restored = SmallNet()
    restored.load_state_dict(loaded["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    assert loaded["epoch"] == 3
    assert loaded["optimizer"]["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    batch = torch.randn(4, 3, 32, 32)
    model.eval(), restored.eval()
    assert torch.equal(model(batch), restored(batch))


def test_whole_module_round_trip(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    model = SmallNet().eval()
    url = container.blob_url("module.pt")
    with BlobIO(url, "wb", credential=account_credential) as f:
        torch.save(model, f)
    with BlobIO(url, "rb", credential=account_credential) as f:
        loaded = torch.load(f, weights_only=False)
    assert isinstance(loaded, SmallNet)
    batch = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(batch), loaded(batch))


def test_large_tensors_and_mmap_free_load(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    tensors = {f"layer{i}": torch.randn(512, 1024) for i in range(12)}  # 24 MiB, several blocks
    tensors["bias"] = torch.randn(7)
    url = container.blob_url("big.pt")
    with BlobIO(url, "wb", credential=account_credential, block_size=4 * 1024 * 1024) as f:
        torch.save(tensors, f)
    with BlobIO(url, "rb", credential=account_credential, block_size=4 * 1024 * 1024, max_concurrency=4) as f:
        loaded = torch.load(f)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
