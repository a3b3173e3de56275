"""A small image data set made on the spot, and a model that learns it: what the demo and the CLI example use.

Each sample is a 28x28 grayscale picture of a circle, a square, a triangle or a cross, at a random place
and size, with noise: nothing is downloaded, yet a model has something real to learn (accuracy climbs
from 25 % to well over 90 % in a few epochs). Each sample is stored as one blob: a label byte followed
by the 784 pixel bytes.

- :func:`make_shapes` draws samples; :func:`upload_shapes` writes them to a container, one blob each;
- :func:`decode` is the ``transform`` that turns a :class:`~azstoragetorch.datasets.Blob` back into
  ``(image, label)`` (a BlobDataModule config names it as ``shapes.decode``);
- :class:`ShapesClassifier` is a small convolutional network for them.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from azstoragetorch.datasets import Blob
from azstoragetorch.io import BlobIO

SIDE = 28
CLASSES = ("circle", "square", "triangle", "cross")


def make_shapes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (uint8, ``count x 28 x 28``) and their labels (int64), drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (count,), generator=generator)
    size = torch.randint(5, 11, (count, 1, 1), generator=generator).float()
    centre_y = torch.randint(10, 18, (count, 1, 1), generator=generator).float()
    centre_x = torch.randint(10, 18, (count, 1, 1), generator=generator).float()
    y, x = torch.meshgrid(torch.arange(SIDE).float(), torch.arange(SIDE).float(), indexing="ij")
    dy, dx = y - centre_y, x - centre_x
    circle = dx**2 + dy**2 <= size**2
    square = (dx.abs() <= size * 0.8) & (dy.abs() <= size * 0.8)
    triangle = (dy >= -size) & (dy <= size) & (dx.abs() <= (dy + size) / 2)
    cross = ((dx.abs() <= size / 4) & (dy.abs() <= size)) | ((dy.abs() <= size / 4) & (dx.abs() <= size))
    shapes = torch.stack([circle, square, triangle, cross], dim=1)  # count x 4 x 28 x 28
    masks = shapes[torch.arange(count), labels]
    noise = torch.rand(count, SIDE, SIDE, generator=generator) * 60
    images = (masks.float() * 180 + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def encode(image: torch.Tensor, label: int) -> bytes:
    return bytes([label]) + image.numpy().tobytes()


def decode(blob: Blob) -> tuple[torch.Tensor, int]:
    """A dataset ``transform``: the blob's image as a float tensor (1 x 28 x 28, in [0, 1]) and its label."""
    with blob.reader() as reader:
        raw = reader.read()
    image = torch.frombuffer(bytearray(raw[1:]), dtype=torch.uint8).reshape(1, SIDE, SIDE)
    return image.float() / 255, raw[0]


def upload_shapes(folder_url: str, count: int, seed: int, credential: Any = None, threads: int = 16) -> int:
    """Write ``count`` samples as blobs ``<folder_url>/<n>.shape``; returns the bytes written."""
    images, labels = make_shapes(count, seed)
    base, mark, query = folder_url.partition("?")

    def put(index: int) -> int:
        data = encode(images[index], int(labels[index]))
        with BlobIO(f"{base.rstrip('/')}/{index:05d}.shape{mark}{query}", "wb", credential=credential) as blob:
            blob.write(data)
        return len(data)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(put, range(count)))


class ShapesClassifier(pl.LightningModule):
    """Two convolutions and a linear layer; logs ``train_loss``, ``val_loss`` and ``val_accuracy``."""

    def __init__(self, channels: int = 16, learning_rate: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, len(CLASSES)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(images)
        return logits

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_index: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels), prog_bar=True)
        self.log("val_accuracy", (logits.argmax(dim=1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
