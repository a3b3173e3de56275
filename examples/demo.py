"""Checkpoint a real model to Blob Storage and back, against a local Azurite emulator.

This is what ``make demo`` runs. It needs no Azure account and nothing from the network:

1. start Azurite (the blob service of Microsoft's storage emulator) on a free loopback port;
2. build a small transformer language model (21 M parameters, 84 MB of float32) and train
   it for a few steps on one batch of random tokens, so that the weights move away from their initial values;
3. save its ``state_dict`` through :class:`~azstoragetorch.io.BlobIO` with :func:`torch.save`, load
   it back into a freshly built model with :func:`torch.load`, and check that every tensor and the
   model's output on a batch are identical;
4. do the same with the whole ``nn.Module`` (pickled, so loading needs ``weights_only=False``).

It prints the checkpoint sizes and throughput and ends with ``demo OK``; any mismatch exits with
status 1. Run it from the repository root: ``.venv/bin/python examples/demo.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from azure.storage.blob import BlobServiceClient
from torch import nn

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite

VOCAB_SIZE = 8192
MODEL_DIM = 512
LAYERS = 4
HEADS = 8
SEQUENCE_LENGTH = 64
BATCH_SIZE = 8
TRAINING_STEPS = 3
CONTAINER = "checkpoints"


class TinyLanguageModel(nn.Module):
    """A decoder-only transformer: token and position embeddings, causal encoder layers, output head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, MODEL_DIM)
        self.positions = nn.Embedding(SEQUENCE_LENGTH, MODEL_DIM)
        layer = nn.TransformerEncoderLayer(
            MODEL_DIM, HEADS, dim_feedforward=4 * MODEL_DIM, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(MODEL_DIM)
        self.head = nn.Linear(MODEL_DIM, VOCAB_SIZE, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.layers(hidden, mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(hidden))
        return logits


def random_batch(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQUENCE_LENGTH), generator=generator)


def train(model: TinyLanguageModel, steps: int) -> None:
    """A few steps of next-token prediction on one batch of random tokens: enough to move every weight."""
    tokens = random_batch(torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(1, steps + 1):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"  training step {step}/{steps}: loss {loss.item():.3f}")
    model.eval()


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def save(obj: object, url: str, azurite: Azurite) -> int:
    """Write ``obj`` to the blob with torch.save; returns the checkpoint's size in bytes."""
    with BlobIO(url, "wb", credential=azurite.credential) as blob:
        torch.save(obj, blob)
        return blob.tell()


def load(url: str, azurite: Azurite, *, weights_only: bool) -> Any:
    with BlobIO(url, "rb", credential=azurite.credential) as blob:
        return torch.load(blob, weights_only=weights_only)


def report(label: str, size: int, seconds: float) -> None:
    print(f"  {label:<28} {size / 1e6:8.1f} MB in {seconds:6.2f} s = {size / 1e6 / seconds:7.1f} MB/s")


def mismatches(expected: TinyLanguageModel, actual: nn.Module, batch: torch.Tensor) -> list[str]:
    """Every difference between the two models' tensors and outputs, as readable messages."""
    problems = []
    want, got = expected.state_dict(), actual.state_dict()
    if want.keys() != got.keys():
        problems.append(f"state_dict keys differ: {sorted(want.keys() ^ got.keys())}")
    for name in want.keys() & got.keys():
        if want[name].dtype != got[name].dtype or not torch.equal(want[name], got[name]):
            problems.append(f"tensor {name} differs")
    with torch.no_grad():
        if not torch.equal(expected(batch), actual(batch)):
            problems.append("outputs on the check batch differ")
    return problems


def main() -> int:
    torch.manual_seed(0)
    model = TinyLanguageModel()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"Model: {parameters / 1e6:.1f} M parameters ({parameters * 4 / 1e6:.1f} MB as float32)")
    train(model, TRAINING_STEPS)
    check_batch = random_batch(torch.Generator().manual_seed(2))
    problems: list[str] = []

    print("Starting Azurite ...")
    with Azurite() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container(CONTAINER)

        url = azurite.blob_url(CONTAINER, "demo/state_dict.pt")
        print(f"State dict -> {url}")
        size, seconds = timed(lambda: save(model.state_dict(), url, azurite))
        report("save (torch.save)", size, seconds)
        torch.manual_seed(1234)  # a different initialisation, so that loading has to change every weight
        restored = TinyLanguageModel().eval()
        state, seconds = timed(lambda: load(url, azurite, weights_only=True))
        report("load (torch.load)", size, seconds)
        restored.load_state_dict(state)
        problems += [f"state dict: {problem}" for problem in mismatches(model, restored, check_batch)]

        url = azurite.blob_url(CONTAINER, "demo/module.pt")
        print(f"Whole module -> {url}")
        size, seconds = timed(lambda: save(model, url, azurite))
        report("save (torch.save)", size, seconds)
        module, seconds = timed(lambda: load(url, azurite, weights_only=False))
        report("load (torch.load)", size, seconds)
        if not isinstance(module, TinyLanguageModel):
            problems.append(f"whole module: loaded a {type(module).__name__}, not a TinyLanguageModel")
        else:
            problems += [f"whole module: {problem}" for problem in mismatches(model, module.eval(), check_batch)]
        print("Stopping Azurite ...")

    if problems:
        for problem in problems:
            print(f"MISMATCH {problem}", file=sys.stderr)
        print("demo FAILED", file=sys.stderr)
        return 1
    print("All tensors and outputs match.")
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
